"""Evaluation: the official MedMNIST ACC/AUC on the model's probabilities, the saved split reused for data
without official splits, and the ``--json`` contract."""
from __future__ import annotations

import json
import shutil
import warnings

import numpy as np
import pytest

import medmix
from medmix import Predictor
from medmix.cli import main
from medmix.data import load_dataset
from medmix.data.medmnist import ASSETS
from medmix.errors import ConfigError

evaluator = pytest.importorskip("medmnist.evaluator")


def official(labels: np.ndarray, probs: np.ndarray, task: str) -> tuple[float, float]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(evaluator.getACC(labels, probs, task)), float(evaluator.getAUC(labels, probs, task))


@pytest.mark.parametrize("split", ["test", "val"])
def test_metrics_match_the_official_evaluator(trained_run, split):
    m = medmix.evaluate(trained_run.run_dir, split=split, precision="fp32")
    data = load_dataset("breastmnist", data_dir=ASSETS).splits[split]
    probs = Predictor(trained_run.run_dir).probabilities(data.images).numpy()
    assert np.allclose(probs.sum(1), 1, atol=1e-5)
    acc, auc = official(data.labels.numpy()[:, None], probs, "binary-class")
    assert m["acc"] == pytest.approx(acc, abs=1e-12) and m["auc"] == pytest.approx(auc, abs=1e-12)
    assert m["n"] == len(data) and m["split"] == split and m["dataset"] == "breastmnist"
    assert m["model"] == "hybrid_mixer_small"
    assert np.array(m["confusion"]).sum() == len(data)
    for k in ("precision", "recall", "f1"):
        assert 0.0 <= m[k] <= 1.0
    if split == "test":  # the same numbers the training run reported
        assert m["acc"] == pytest.approx(trained_run.test["acc"]) and m["auc"] == pytest.approx(trained_run.test["auc"])


def test_evaluate_writes_confusion_png(trained_run, tmp_path):
    m = medmix.evaluate(trained_run.run_dir / "best_model.pth", split="val", out=tmp_path / "figs", precision="fp32")
    png = tmp_path / "figs" / "confusion_val.png"
    assert m["confusion_png"] == str(png) and png.read_bytes()[:4] == b"\x89PNG"


def test_bad_split_name(trained_run):
    with pytest.raises(ConfigError, match="split"):
        medmix.evaluate(trained_run.run_dir, split="holdout")


def test_saved_split_is_used(packed_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(packed_run.run_dir, run)
    split = json.loads((run / "split.json").read_text())
    m = medmix.evaluate(run, split="test", precision="fp32")
    assert m["n"] == len(split["test"])
    assert m["acc"] == pytest.approx(packed_run.test["acc"]) and m["auc"] == pytest.approx(packed_run.test["auc"])
    # evaluation follows the file, not a recomputed split: point "test" at five training images
    split["test"] = split["train"][:5]
    (run / "split.json").write_text(json.dumps(split))
    assert medmix.evaluate(run, split="test", precision="fp32")["n"] == 5


def test_evaluate_json_cli(trained_run, capsys):
    assert main(["evaluate", str(trained_run.run_dir), "--split", "test", "--json", "--precision", "fp32"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert {"acc", "auc", "precision", "recall", "f1", "split", "n"} <= set(out)
    assert out["split"] == "test" and out["n"] == 156
    assert out["acc"] == pytest.approx(trained_run.test["acc"])


def test_evaluate_human_cli(trained_run, capsys, tmp_path):
    assert main(["evaluate", str(trained_run.run_dir), "--split", "val", "--out", str(tmp_path),
                 "--precision", "fp32"]) == 0
    out = capsys.readouterr().out
    assert "ACC" in out and "AUC" in out and "malignant" in out and "confusion" in out
    assert (tmp_path / "confusion_val.png").is_file()


def test_public_api_stays_callable(trained_run):
    """``medmix.evaluate`` is the documented function, also after the implementing module was imported."""
    import medmix.evaluation
    from medmix.evaluation import evaluate as fn

    a = medmix.evaluate(trained_run.run_dir, split="val", precision="fp32")
    b = medmix.evaluate(trained_run.run_dir, split="val", precision="fp32")
    assert a["acc"] == b["acc"] == fn(trained_run.run_dir, split="val", precision="fp32")["acc"]


def test_folder_run_evaluates_on_its_own_split(folder_tree, tmp_path):
    from conftest import TINY_TRAIN

    from medmix.engine import train

    r = train(dataset=str(folder_tree), seed=5, out=str(tmp_path / "run"), **{**TINY_TRAIN, "epochs": 1})
    split = json.loads((r.run_dir / "split.json").read_text())
    assert len(split["train"]) == 42 and len(split["val"]) == 9 and len(split["test"]) == 9
    m = medmix.evaluate(r.run_dir, split="test", precision="fp32")
    assert m["n"] == 9 and m["acc"] == pytest.approx(r.test["acc"]) and m["auc"] == pytest.approx(r.test["auc"])
    assert m["dataset"] == folder_tree.name
