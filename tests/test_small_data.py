"""Splits too small for what is fitted on them: one warning line each and the safe choice (no temperature, the last
epoch, a pooled OOD threshold, multi-label thresholds left at 0.5), recorded in the run."""
from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import TINY_TRAIN, write_class_folders

from medmix.cli import main
from medmix.engine import train, tune_thresholds
from medmix.small_data import (MIN_PER_SIDE_FOR_THRESHOLD, MIN_VAL_FOR_MODEL_SELECTION, MIN_VAL_FOR_OOD_THRESHOLD,
                               MIN_VAL_FOR_TEMPERATURE)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """48 images in 3 class folders: the stratified 70/15/15 split leaves 7 for validation."""
    root = tmp_path_factory.mktemp("tiny")
    write_class_folders(root / "data", counts=(16, 16, 16))
    return train(dataset=str(root / "data"), out=str(root / "run"), **{**TINY_TRAIN, "epochs": 3, "patience": 1})


def test_tiny_validation_split_falls_back_and_says_so(tiny_run, capfd):
    doc = json.loads((tiny_run.run_dir / "metrics.json").read_text())
    assert doc["val"]["n"] == 7 < MIN_VAL_FOR_MODEL_SELECTION <= MIN_VAL_FOR_TEMPERATURE
    warnings = doc["warnings"]
    assert len(warnings) == 3 and all("validation split has 7 images" in w for w in warnings)
    # no early stop on 7 images (patience 1 would otherwise have stopped by chance), and the last epoch is kept
    assert doc["epochs_run"] == 3 and doc["best_epoch"] == 3
    from medmix.checkpoint import load_checkpoint

    _, meta, _ = load_checkpoint(tiny_run.run_dir / "best_model.pth")
    assert meta["temperature"] == 1.0 and "calibration" not in meta
    assert meta["ood"]["split"] == "train+val" and 7 < MIN_VAL_FOR_OOD_THRESHOLD
    assert meta["warnings"] == warnings


def test_tiny_validation_split_warnings_are_one_line_each(tmp_path, capsys):
    write_class_folders(tmp_path / "data", counts=(16, 16, 16))
    rc = main(["train", "--dataset", str(tmp_path / "data"), "--epochs", "1", "--batch-size", "16", "--precision",
               "fp32", "--out", str(tmp_path / "run"), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 0
    lines = [ln for ln in err.splitlines() if ln.startswith("medmix: warning: ")]
    assert len(lines) == 3, err
    assert any("no confidence temperature fitted (T = 1)" in ln for ln in lines)


def test_calibrate_refuses_a_tiny_validation_split(tiny_run, capsys):
    before = (tiny_run.run_dir / "best_model.pth").read_bytes()
    rc = main(["calibrate", str(tiny_run.run_dir)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "too few to fit a temperature" in err[0]
    assert (tiny_run.run_dir / "best_model.pth").read_bytes() == before


def test_multi_label_thresholds_need_enough_positives_and_negatives(capsys):
    rng = np.random.default_rng(0)
    n = 200
    labels = np.zeros((n, 2))
    labels[: MIN_PER_SIDE_FOR_THRESHOLD - 1, 0] = 1  # too few positives for label 0
    labels[: n // 2, 1] = 1
    probs = np.clip(labels * 0.3 + rng.uniform(0, 0.7, (n, 2)), 0, 1)
    meta: dict = {}
    t = tune_thresholds(probs, labels, ["rare", "common"], meta)
    assert t[0] == 0.5 and t[1] != 0.5
    assert "rare" in meta["warnings"][0] and "common" not in meta["warnings"][0]
    assert capsys.readouterr().err.startswith("medmix: warning: 1 label(s)")
