"""Ensembles and test-time augmentation as one checkpoint: the average is what the members say, views are chosen
on val, and predict / evaluate / explain / calibrate / export take the result like any run."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from medmix.cli import main
from medmix.data.medmnist import ASSETS
from medmix.engine import train
from medmix.ensemble import make_ensemble
from medmix.inference import predict_logits
from medmix.models.ensemble import view
from medmix.run import Run

KW = dict(dataset="breastmnist", data_dir=str(ASSETS), epochs=2, batch_size=64, lr=3e-3, precision="fp32", quiet=True)


@pytest.fixture(scope="module")
def members(tmp_path_factory, trained_run):
    root = tmp_path_factory.mktemp("members")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        other = train(model="cnn_transformer", seed=1, out=str(root / "b"), normalize="half", **KW)
    finally:
        torch.set_num_threads(threads)
    return [trained_run.run_dir, other.run_dir]


@pytest.fixture(scope="module")
def ensemble(members, tmp_path_factory):
    out = tmp_path_factory.mktemp("ens") / "ens"
    return make_ensemble(members, out, tta="hflip"), out


def member_probs(run_dir, images) -> torch.Tensor:
    r = Run.load(run_dir)
    z = predict_logits(r.build_model(), images, r.transform(), 256, "fp32")
    return torch.softmax(z / r.meta["temperature"], 1)


def test_the_ensemble_is_the_mean_of_its_members_calibrated_views(ensemble, members):
    summary, out = ensemble
    run = Run.load(out)
    images = run.training_data().splits["val"].images[:40]
    flipped = torch.flip(images, dims=(-1,))
    expected = torch.stack([member_probs(m, x) for m in members for x in (images, flipped)]).mean(0)
    z = predict_logits(run.build_model(), images, run.transform(), 256, "fp32")
    torch.testing.assert_close(torch.softmax(z, 1), expected, rtol=1e-4, atol=1e-5)
    assert summary["views"] == ["identity", "hflip"] and run.meta["model"] == "ensemble"
    assert set(json.loads((out / "ensemble.json").read_text())) >= {"members", "val", "test", "views"}
    assert run.meta.get("ood") and isinstance(run.meta["temperature"], float)


def test_shift_views_move_by_one_pixel():
    x = torch.arange(16.0).view(1, 1, 4, 4)
    up, down, left, right = view(x, "shift")
    assert torch.equal(up[..., 1:, :], x[..., :-1, :]) and torch.equal(down[..., :-1, :], x[..., 1:, :])
    assert torch.equal(left[..., 1:], x[..., :-1]) and torch.equal(right[..., :-1], x[..., 1:])


def test_auto_views_are_chosen_on_val_and_one_member_is_plain_tta(trained_run, tmp_path):
    r = make_ensemble([trained_run.run_dir], tmp_path / "tta", tta="auto")
    scores = r["view_scores_val"]
    assert len(scores) >= 4
    best = max(s["score"] for s in scores.values())
    assert scores[",".join(r["views"])]["score"] == best
    run = Run.load(tmp_path / "tta")
    assert len(run.meta["model_kwargs"]["members"]) == 1


def test_the_commands_take_an_ensemble(ensemble, tmp_path, capsys):
    _, out = ensemble
    img = tmp_path / "x.png"
    from PIL import Image

    Image.fromarray(np.asarray(Run.load(out).training_data().splits["test"].images[0, 0])).save(img)
    assert main(["predict", str(out), str(img), "--json"]) == 0
    pred = json.loads(capsys.readouterr().out)
    assert pred[0]["label"] in ("malignant", "normal, benign") and "in_distribution" in pred[0]
    assert main(["evaluate", str(out), "--json"]) == 0
    ev = json.loads(capsys.readouterr().out)
    assert ev["acc"] == pytest.approx(json.loads((out / "metrics.json").read_text())["test"]["acc"])
    assert main(["explain", str(out), str(img), "--out", str(tmp_path / "cam")]) == 0
    assert list((tmp_path / "cam").glob("*.png"))
    assert main(["calibrate", str(out), "--json"]) == 0
    capsys.readouterr()
    assert main(["export", str(out), "--onnx", str(tmp_path / "ens.onnx"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["max_abs_diff_probabilities"] < 1e-4


def test_mean_gradcam_averages_the_members(ensemble):
    from medmix.explain import cam_array

    _, out = ensemble
    run = Run.load(out)
    model = run.build_model()
    x = run.transform()(run.training_data().splits["val"].images[:4])
    maps = cam_array(model, x)
    assert maps.shape == (4, *x.shape[-2:]) and maps.min() >= 0 and maps.max() <= 1


def test_bad_ensembles_are_one_line(members, tmp_path, capsys, packed_run):
    cases = [(["ensemble", str(members[0]), str(packed_run.run_dir), "--out", str(tmp_path / "a")], "dataset"),
             (["ensemble", str(members[0]), "--tta", "rotate", "--out", str(tmp_path / "b")], "unknown test-time view"),
             (["ensemble", str(members[0]), "--out", str(members[0])], "already exists")]
    for argv, msg in cases:
        capsys.readouterr()
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("medmix: error:") and msg in err and err.count("\n") == 1, err
    assert not (tmp_path / "a").exists() and not (tmp_path / "a.partial").exists()


def test_split_seed_lets_several_seeds_of_a_packed_dataset_form_an_ensemble(packed_data, tmp_path, capsys):
    from conftest import TINY_TRAIN

    a = train(dataset=str(packed_data), seed=2, split_seed=5, out=str(tmp_path / "a"), **TINY_TRAIN)
    b = train(dataset=str(packed_data), seed=3, split_seed=5, out=str(tmp_path / "b"), **TINY_TRAIN)
    c = train(dataset=str(packed_data), seed=3, out=str(tmp_path / "c"), **TINY_TRAIN)  # split by --seed 3
    assert (a.run_dir / "split.json").read_text() == (b.run_dir / "split.json").read_text()
    assert main(["ensemble", str(a.run_dir), str(b.run_dir), "--out", str(tmp_path / "ab")]) == 0
    capsys.readouterr()
    assert main(["ensemble", str(a.run_dir), str(c.run_dir), "--out", str(tmp_path / "ac")]) == 2
    assert "--split-seed" in capsys.readouterr().err
