"""Trust data fitted at the end of training: the calibration temperature and the out-of-distribution warning
(Mahalanobis statistics in the checkpoint, threshold at 95% TPR on val, the flag on noise and constant images)."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from medmix import Predictor, ood
from medmix.calibrate import calibrate
from medmix.checkpoint import load_checkpoint, save_checkpoint
from medmix.cli import build_parser, main, train_kwargs
from medmix.data import load_dataset
from medmix.data.medmnist import ASSETS
from medmix.data.tasks import BINARY, MULTI_LABEL
from medmix.errors import ConfigError


@pytest.fixture(scope="module")
def breast():
    return load_dataset("breastmnist", data_dir=ASSETS)


def noise_images(n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [np.clip(rng.normal(rng.uniform(40, 200), rng.uniform(20, 70), (28, 28)), 0, 255).astype(np.uint8)
            for _ in range(n)]


# ----------------------------------------------------------------------------------------------- scores
def test_energy_score_is_minus_t_logsumexp():
    z = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
    np.testing.assert_allclose(ood.energy_score(z), -torch.logsumexp(z, 1).numpy(), rtol=1e-12)
    np.testing.assert_allclose(ood.energy_score(z, 2.0), -2.0 * torch.logsumexp(z / 2.0, 1).numpy(), rtol=1e-12)
    np.testing.assert_allclose(ood.energy_score(z, task=MULTI_LABEL),
                               -torch.nn.functional.softplus(z).sum(1).numpy(), rtol=1e-12)
    # a confident (large-logit) row has lower energy, i.e. looks more in-distribution
    assert ood.energy_score(z)[0] < ood.energy_score(z)[1]


def test_mahalanobis_matches_the_direct_formula_and_separates_far_points():
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1, 2], 200)
    centres = rng.normal(0, 3, (3, 8))
    f = centres[y] + rng.normal(0, 1, (600, 8))
    stats = ood.fit_mahalanobis(f, y, BINARY)
    means, prec = stats[ood.EXTRA_MEANS].double().numpy(), stats[ood.EXTRA_PRECISION].double().numpy()
    assert means.shape == (3, 8) and prec.shape == (8, 8) and np.allclose(prec, prec.T, atol=1e-4)
    x = rng.normal(0, 3, (5, 8))
    direct = np.array([min((v - m) @ prec @ (v - m) for m in means) for v in x])
    np.testing.assert_allclose(ood.mahalanobis_score(x, stats), direct, rtol=1e-6)
    near = centres[[0, 1, 2]] + rng.normal(0, 1, (3, 8))
    far = centres[[0, 1, 2]] + 12.0
    assert ood.mahalanobis_score(far, stats).min() > ood.mahalanobis_score(near, stats).max()
    # multi-label: one Gaussian for all images
    one = ood.fit_mahalanobis(f, (rng.random((600, 4)) < 0.5).astype(int), MULTI_LABEL)
    assert one[ood.EXTRA_MEANS].shape == (1, 8)


def test_threshold_keeps_the_requested_share_in_distribution():
    s = np.random.default_rng(1).normal(size=1000)
    t = ood.threshold_at_tpr(s, 0.95)
    assert (s <= t).sum() == 951 == np.ceil(0.95 * 1001)  # the split-conformal rank, not 950 (= 95 % of 1000)
    # the guarantee it buys: over many draws, a fresh score from the same distribution passes >= 95 % of the time
    rng = np.random.default_rng(2)
    covered = [rng.normal() <= ood.threshold_at_tpr(rng.normal(size=78), 0.95) for _ in range(4000)]
    assert np.mean(covered) >= 0.95 - 2 * np.sqrt(0.05 * 0.95 / 4000)
    plain = [rng.normal() <= np.sort(rng.normal(size=78))[int(np.ceil(0.95 * 78)) - 1] for _ in range(4000)]
    assert np.mean(plain) < np.mean(covered)  # the plain quantile under-covers on 78 images
    assert ood.threshold_at_tpr([3.0], 0.95) == 3.0
    with pytest.raises(ConfigError):
        ood.threshold_at_tpr([])


def test_pixel_std_is_zero_for_constant_images_of_any_colour():
    const = torch.zeros(2, 3, 8, 8, dtype=torch.uint8)
    const[0] = 200
    const[1, 0], const[1, 1], const[1, 2] = 10, 120, 250  # a coloured constant image
    assert np.allclose(ood.pixel_std(const), 0.0)
    assert ood.pixel_std(torch.randint(0, 256, (1, 1, 8, 8), dtype=torch.uint8))[0] > 30


# ----------------------------------------------------------------------------------------------- train end
def test_temperature_is_fitted_and_stored_at_train_end(trained_run):
    _, meta, _ = load_checkpoint(trained_run.run_dir)
    t = meta["temperature"]
    assert isinstance(t, float) and t is not None and 0.01 <= t <= 100
    c = meta["calibration"]
    assert c["split"] == "val" and c["n"] == 78 and c["n_bins"] == 15
    assert c["nll_after"] <= c["nll_before"] + 1e-9  # fitted on exactly these logits: never worse
    assert all(np.isfinite(c[k]) for k in ("ece_before", "ece_after"))
    assert meta["train_config"]["calibrate"] is True and meta["train_config"]["ood"] is True


def test_ood_block_and_statistics_round_trip_with_weights_only_loading(trained_run):
    path = trained_run.run_dir / "best_model.pth"
    payload = torch.load(path, map_location="cpu", weights_only=True)  # no pickled objects: tensors and text only
    assert set(payload["extras"]) == {ood.EXTRA_MEANS, ood.EXTRA_PRECISION, ood.EXTRA_GATE_MEANS,
                                      ood.EXTRA_GATE_PRECISION}
    state, meta, ts, extras = load_checkpoint(path, extras=True)
    assert len(load_checkpoint(path)) == 3  # the old 3-tuple is unchanged
    block = meta["ood"]
    assert block["method"] == ood.DEFAULT_SCORE == "mahalanobis" and block["tpr"] == 0.95
    assert set(block["thresholds"]) == {"mahalanobis", "energy"} and block["threshold"] == block["thresholds"][
        "mahalanobis"]
    assert block["n_fit"] == 546 and block["n_val"] == 78 and block["min_pixel_std"] > 0
    d = block["feature_dim"]
    assert extras[ood.EXTRA_MEANS].shape == (2, d) and extras[ood.EXTRA_PRECISION].shape == (d, d)
    for k in extras:
        assert torch.equal(extras[k], payload["extras"][k])
    # re-saving (what `medmix calibrate` does) keeps them bit-identical
    copy = path.with_name("copy.pth")
    try:
        save_checkpoint(copy, state, meta, ts, extras)
        _, _, _, again = load_checkpoint(copy, extras=True)
        assert all(torch.equal(again[k], extras[k]) for k in extras)
    finally:
        copy.unlink(missing_ok=True)


def test_threshold_is_fixed_at_95_percent_of_val(trained_run, breast):
    p = Predictor(trained_run.run_dir)
    _, res = p.logits_and_ood(breast.splits["val"].images)
    assert np.mean([r["in_distribution"] for r in res]) >= 0.94  # 95% by construction (78 images)
    assert max(r["ood_score"] for r in res) >= p.ood.threshold  # the threshold is an actual val score quantile
    _, res = p.logits_and_ood(breast.splits["test"].images)
    assert np.mean([r["in_distribution"] for r in res]) >= 0.85


def test_ood_flag_fires_on_noise_and_constant_images(trained_run, breast):
    p = Predictor(trained_run.run_dir)
    noise = p.predict(noise_images(20))
    assert all(r["in_distribution"] is False for r in noise)
    assert min(r["ood_score"] for r in noise) > p.ood.threshold
    const = p.predict([np.full((28, 28), v, np.uint8) for v in (0, 40, 128, 200, 255)])
    assert all(r["in_distribution"] is False for r in const)
    own = p.predict(list(breast.splits["val"].images[:, 0].numpy()))
    assert np.mean([r["in_distribution"] for r in own]) >= 0.9


def test_predict_json_and_text_carry_the_flag(trained_run, tmp_path, capsys):
    from PIL import Image

    Image.fromarray(noise_images(1)[0]).save(tmp_path / "noise.png")
    assert main(["predict", str(trained_run.run_dir), str(tmp_path / "noise.png"), "--json"]) == 0
    (r,) = json.loads(capsys.readouterr().out)
    assert r["in_distribution"] is False and isinstance(r["ood_score"], float)
    assert main(["predict", str(trained_run.run_dir), str(tmp_path / "noise.png")]) == 0
    assert "out of distribution" in capsys.readouterr().out


def test_energy_score_can_be_chosen(trained_run):
    p = Predictor(trained_run.run_dir, ood_method="energy")
    assert p.ood.method == "energy" and not p.ood.needs_features
    (r,) = p.predict([noise_images(1)[0]])
    assert isinstance(r["ood_score"], float) and r["ood_score"] < 0  # an energy is a negative log-sum-exp


def test_checkpoints_without_ood_data_omit_the_fields(trained_run, tmp_path):
    import medmix

    run = tmp_path / "old"
    shutil.copytree(trained_run.run_dir, run)
    state, meta, ts = load_checkpoint(run)
    meta.pop("ood")
    save_checkpoint(run / "best_model.pth", state, meta, ts)  # no extras: as written before medmix.ood
    p = Predictor(run)
    assert p.ood is None
    (r,) = p.predict([noise_images(1)[0]])
    assert "in_distribution" not in r and "ood_score" not in r
    assert "ood_flagged" not in medmix.evaluate(run, split="val", precision="fp32")
    # statistics lost but the block kept: falls back to the energy score
    meta["ood"] = {"method": "mahalanobis", "threshold": 1.0, "thresholds": {"mahalanobis": 1.0, "energy": -0.5}}
    save_checkpoint(run / "best_model.pth", state, meta, ts)
    assert Predictor(run).ood.method == "energy"


def test_calibrate_keeps_the_ood_statistics(trained_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained_run.run_dir, run)
    _, _, _, before = load_checkpoint(run, extras=True)
    calibrate(run)
    _, meta, _, after = load_checkpoint(run, extras=True)
    assert set(after) == set(before) and all(torch.equal(after[k], before[k]) for k in before)
    assert "ood" in meta and Predictor(run).ood is not None


def test_train_flags_turn_the_fits_off(packed_data, tmp_path):
    from medmix.engine import train

    r = train(dataset=str(packed_data), model="hybrid_mixer_small", epochs=1, batch_size=16, precision="fp32",
              quiet=True, out=str(tmp_path / "plain"), calibrate=False, ood=False)
    _, meta, _, extras = load_checkpoint(r.run_dir, extras=True)
    assert meta["temperature"] == 1.0 and "calibration" not in meta and "ood" not in meta and extras == {}
    a = build_parser().parse_args(["train", "--dataset", "x", "--no-calibrate", "--no-ood"])
    kw = train_kwargs(a)
    assert kw["calibrate"] is False and kw["ood"] is False
    kw = train_kwargs(build_parser().parse_args(["train", "--dataset", "x"]))
    assert "calibrate" not in kw and "ood" not in kw  # the TrainConfig defaults (True) apply
