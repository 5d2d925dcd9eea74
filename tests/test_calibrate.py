"""Temperature scaling: recovers a known temperature, lowers NLL/ECE of an over-confident model, per-label
temperatures for multi-label tasks, and the checkpoint round trip (weights untouched, Predictor uses it)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from _quadrant import make_images, write_run
from PIL import Image

from medmix.calibrate import T_MAX, T_MIN, calibrate, calibration_metrics, fit_temperature, stored_temperature
from medmix.checkpoint import load_checkpoint, save_checkpoint
from medmix.cli import main
from medmix.data.tasks import BINARY, MULTI_CLASS, MULTI_LABEL, ORDINAL
from medmix.inference import probabilities
from medmix.errors import ConfigError, MedmixError
from medmix.predict import Predictor


def calibrated_logits(n: int, c: int, seed: int, scale: float = 1.5) -> tuple[np.ndarray, np.ndarray]:
    """Logits of a perfectly calibrated model: labels are drawn from softmax(logits)."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0.0, scale, (n, c))
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    y = (p.cumsum(1) > rng.random((n, 1))).argmax(1)
    return z, y


# ----------------------------------------------------------------------------------------------- fitting
@pytest.mark.parametrize("task,c", [(MULTI_CLASS, 5), (BINARY, 2), (ORDINAL, 4)])
def test_recovers_the_temperature_of_scaled_calibrated_logits(task, c):
    z, y = calibrated_logits(4000, c, seed=c)
    assert fit_temperature(5.0 * z, y, task) == pytest.approx(5.0, rel=0.1)
    assert fit_temperature(z, y[:, None], task) == pytest.approx(1.0, rel=0.1)  # (N, 1) labels as medmnist
    assert fit_temperature(torch.from_numpy(0.5 * z).float(), torch.from_numpy(y), task) == pytest.approx(
        0.5, rel=0.1)


def test_scaling_lowers_nll_and_ece_of_an_over_confident_model():
    z, y = calibrated_logits(3000, 4, seed=1)
    over = 5.0 * z
    t = fit_temperature(over, y, MULTI_CLASS)
    before = calibration_metrics(over, y, MULTI_CLASS)
    after = calibration_metrics(over, y, MULTI_CLASS, t)
    assert after["nll"] < before["nll"] - 0.2
    assert after["ece"] < before["ece"] / 3
    # the argmax (the prediction) is unchanged
    assert (probabilities(torch.tensor(over), MULTI_CLASS, t).argmax(1).numpy() == over.argmax(1)).all()


def test_multi_label_gets_one_temperature_per_label():
    rng = np.random.default_rng(0)
    true_t = np.array([0.5, 2.0, 5.0])
    z = rng.normal(0.0, 2.0, (4000, 3))
    y = (rng.random(z.shape) < 1 / (1 + np.exp(-z))).astype(np.float32)
    temps = fit_temperature(z * true_t, y, MULTI_LABEL)
    assert isinstance(temps, list) and len(temps) == 3
    np.testing.assert_allclose(temps, true_t, rtol=0.15)
    before = calibration_metrics(z * true_t, y, MULTI_LABEL)
    after = calibration_metrics(z * true_t, y, MULTI_LABEL, temps)
    assert after["nll"] < before["nll"] and after["ece"] < before["ece"]


def test_probabilities_divide_each_label_by_its_temperature():
    logits = torch.tensor([[2.0, 2.0, 2.0], [-4.0, 0.0, 4.0]])
    got = probabilities(logits, MULTI_LABEL, [1.0, 2.0, 4.0])
    np.testing.assert_allclose(got, torch.sigmoid(logits / torch.tensor([1.0, 2.0, 4.0])), atol=1e-7)
    np.testing.assert_allclose(probabilities(logits, MULTI_LABEL, torch.tensor([2.0, 2.0, 2.0])),
                               probabilities(logits, MULTI_LABEL, 2.0), atol=1e-7)
    np.testing.assert_allclose(probabilities(logits, MULTI_CLASS, 2), torch.softmax(logits / 2, 1), atol=1e-7)


def test_fit_stays_in_bounds_and_never_hurts():
    y = np.array([0, 1, 0, 1])
    separable = np.array([[3.0, -3.0], [-3.0, 3.0], [3.0, -3.0], [-3.0, 3.0]])
    t = fit_temperature(separable, y, BINARY)  # NLL keeps falling as T -> 0
    assert T_MIN <= t < 0.1
    assert T_MIN <= fit_temperature(-separable, y, BINARY) <= T_MAX  # always wrong: flat is best
    before = calibration_metrics(-separable, y, BINARY)["nll"]
    assert calibration_metrics(-separable, y, BINARY, fit_temperature(-separable, y, BINARY))["nll"] <= before


def test_fit_rejects_bad_input():
    z, y = calibrated_logits(10, 3, seed=0)
    with pytest.raises(ConfigError, match="labels must have shape"):
        fit_temperature(z, y[:5], MULTI_CLASS)
    with pytest.raises(ConfigError, match="lie in 0..2"):
        fit_temperature(z, y + 3, MULTI_CLASS)
    with pytest.raises(ConfigError, match="NaN"):
        fit_temperature(np.full((2, 2), np.nan), [0, 1], BINARY)
    with pytest.raises(ConfigError, match="unknown task"):
        fit_temperature(z, y, "regression")
    with pytest.raises(ConfigError, match=r"shape \(10, 3\)"):
        fit_temperature(z, y, MULTI_LABEL)
    with pytest.raises(ConfigError, match="shape"):
        fit_temperature(np.zeros(3), [0, 1, 0], BINARY)


def test_stored_temperature():
    assert stored_temperature({}) == 1.0 and stored_temperature({"temperature": 2}) == 2.0
    assert stored_temperature({"temperature": [1, 2.5]}) == [1.0, 2.5]


# ----------------------------------------------------------------------------------------------- round trip
@pytest.fixture
def overconfident(tmp_path):
    """The quadrant model (it learned the rule perfectly) judged on labels of which 20% are flipped, with its
    logits multiplied by 5: confidently wrong on a fifth of the validation images."""
    return write_run(tmp_path / "run", label_noise=0.2, head_scale=5.0)


def test_calibrate_round_trip(overconfident, tmp_path):
    ckpt = overconfident
    state0, meta0, _ = load_checkpoint(ckpt)
    images, _ = make_images(6, seed=21)
    before = Predictor(ckpt).predict(list(images))

    r = calibrate(ckpt.parent)  # a run directory
    assert r["checkpoint"] == str(ckpt) and r["split"] == "val" and r["n"] == 90 and r["n_bins"] == 15
    assert r["previous_temperature"] == 1.0 and r["temperature"] > 1.5
    assert r["nll_after"] < r["nll_before"] and r["ece_after"] < r["ece_before"]

    state1, meta1, _ = load_checkpoint(ckpt)
    assert state1.keys() == state0.keys()
    assert all(torch.equal(state0[k], state1[k]) and state0[k].dtype == state1[k].dtype for k in state0)
    assert meta1["temperature"] == r["temperature"]
    assert meta1["calibration"]["nll_after"] == r["nll_after"] and meta1["calibration"]["split"] == "val"
    assert {k: v for k, v in meta1.items() if k not in ("temperature", "calibration")} == \
        {k: v for k, v in meta0.items() if k not in ("temperature", "calibration")}
    for key in ("reliability_before", "reliability_after"):
        assert r[key].startswith(str(ckpt.parent)) and Image.open(r[key]).format == "PNG"
    assert not [p for p in ckpt.parent.iterdir() if p.name.startswith(".")]  # no temporary files left

    p = Predictor(ckpt)
    assert p.temperature == r["temperature"]
    after = p.predict(list(images))
    logits = p.model(p.transform(torch.from_numpy(images)[:, None])).detach()
    expect = torch.softmax(logits / r["temperature"], 1).max(1).values
    for b, a, e in zip(before, after, expect):
        assert a["label"] == b["label"]  # calibration never changes the answer
        assert a["confidence"] < b["confidence"] or b["confidence"] > 0.999999
        assert a["confidence"] == pytest.approx(float(e), abs=1e-5)
    assert np.mean([a["confidence"] for a in after]) < np.mean([b["confidence"] for b in before])

    again = calibrate(ckpt)  # refits from the raw logits: the same temperature
    assert again["previous_temperature"] == r["temperature"]
    assert again["temperature"] == pytest.approx(r["temperature"], rel=1e-4)
    assert again["nll_before"] == pytest.approx(r["nll_before"])


def test_cli_calibrate(overconfident, capsys):
    assert main(["calibrate", str(overconfident), "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["temperature"] > 1.5 and r["nll_after"] < r["nll_before"]
    assert main(["calibrate", str(overconfident.parent)]) == 0
    out = capsys.readouterr().out
    assert "temperature" in out and "NLL" in out and "ECE" in out and "reliability" in out


def test_calibrate_without_its_data_fails_cleanly(overconfident, capsys):
    (overconfident.parent / "quadrant.npz").unlink()
    with pytest.raises(MedmixError):
        calibrate(overconfident)
    assert main(["calibrate", str(overconfident)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("medmix: error:") and len(err.strip().splitlines()) == 1
    assert load_checkpoint(overconfident)[1]["temperature"] == 1.0  # untouched


# ----------------------------------------------------------------------------------------------- multi-label
@pytest.fixture
def chest_ckpt(tmp_path, chest_npz):
    from medmix.data.medmnist import task_info
    from medmix.models import create_model

    path, _ = chest_npz
    from conftest import write_official_npz

    write_official_npz(path, 14, sizes=(40, 60, 10), multi_label=True)  # calibrate needs >= 50 val images
    info = task_info("chestmnist")
    kwargs = dict(num_classes=info.num_classes, in_chans=1, img_size=28)
    torch.manual_seed(0)
    model = create_model("hybrid_mixer_small", **kwargs)
    meta = {"model": "hybrid_mixer_small", "model_kwargs": kwargs, "task": info.to_dict(), "dataset": "chestmnist",
            "data_source": {"kind": "medmnist", "path": str(path), "size": 28}, "data_size": 28, "img_size": 28,
            "mean": [0.2], "std": [0.2], "temperature": 1.0}
    ckpt = tmp_path / "chest" / "best_model.pth"
    ckpt.parent.mkdir()
    save_checkpoint(ckpt, model, meta)
    return ckpt


def test_calibrate_multi_label_stores_one_temperature_per_label(chest_ckpt):
    r = calibrate(chest_ckpt)
    assert r["task"] == MULTI_LABEL and isinstance(r["temperature"], list) and len(r["temperature"]) == 14
    assert all(T_MIN <= t <= T_MAX for t in r["temperature"])
    assert r["nll_after"] <= r["nll_before"] + 1e-12
    assert load_checkpoint(chest_ckpt)[1]["temperature"] == r["temperature"]


def test_predictor_uses_per_label_temperatures(chest_ckpt):
    state, meta, _ = load_checkpoint(chest_ckpt)
    temps = [0.5 + 0.25 * k for k in range(14)]  # what calibrate() stores for a multi-label task
    save_checkpoint(chest_ckpt, state, {**meta, "temperature": temps})
    images, _ = make_images(2, seed=0)
    p = Predictor(chest_ckpt)
    got = p.predict(list(images))[0]
    logits = p.model(p.transform(torch.from_numpy(images)[:, None])).detach()
    expect = torch.sigmoid(logits / torch.tensor(temps))[0]
    assert got["confidence"] == pytest.approx(float(expect.max()), abs=1e-5)
