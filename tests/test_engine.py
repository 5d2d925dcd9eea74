"""Training: it learns, it repeats exactly with a seed, it writes a complete run directory (and never half of one),
and the paper's LogSoftmax + NLL loss trains exactly like cross-entropy."""
from __future__ import annotations

import csv
import json
import math

import pytest
import torch
from conftest import TINY_TRAIN, write_official_npz

from medmix.checkpoint import load_checkpoint
from medmix.data import BatchTransform, load_dataset
from medmix.data.medmnist import ASSETS
from medmix.engine import evaluate_split, train
from medmix.errors import ConfigError, UnknownNameError
from medmix.losses import build_loss
from medmix.models import create_model

TIMING = ("train_img_s", "epoch_seconds")
RUN_FILES = ("best_model.pth", "last.pth", "log.jsonl", "log.csv", "curves.png", "confusion_test.png",
             "metrics.json", "config.json")


def without_timing(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k not in TIMING} for row in history]


def test_two_epochs_improve_validation_loss(trained_run):
    """Against the untrained model (val loss ~ ln 2 with near-zero logits) the best epoch's val loss is clearly
    lower, and the training loss falls from epoch 1 (which includes the first, untrained steps) to epoch 2."""
    _, meta, _ = load_checkpoint(trained_run.run_dir / "best_model.pth")
    bundle = load_dataset("breastmnist", data_dir=ASSETS)
    torch.manual_seed(0)
    untrained = create_model(meta["model"], **meta["model_kwargs"])
    tf = BatchTransform(meta["img_size"], meta["mean"], meta["std"])
    loss = build_loss("ce", bundle.info.task, bundle.info.num_classes)
    base = evaluate_split(untrained, bundle.splits["val"], tf, bundle.info.task, bundle.info.class_names, loss)["loss"]
    assert abs(base - math.log(2)) < 0.15

    hist = trained_run.history
    assert [r["epoch"] for r in hist] == [1, 2]
    assert min(r["val_loss"] for r in hist) < base - 0.04, (base, hist)
    assert hist[1]["train_loss"] < hist[0]["train_loss"]
    assert all(math.isfinite(r["train_loss"]) and math.isfinite(r["val_loss"]) for r in hist)
    # the model is better than chance on the held-out test split
    assert trained_run.test["auc"] > 0.6 and trained_run.test["n"] == 156


def test_run_directory_is_complete(trained_run):
    run = trained_run.run_dir
    for name in RUN_FILES:
        assert (run / name).is_file() and (run / name).stat().st_size > 0, name
    assert not list(run.parent.glob("*.partial")) and not list(run.parent.glob("*.old"))
    assert not [p.name for p in run.iterdir() if ".tmp" in p.name]
    for png in ("curves.png", "confusion_test.png"):
        assert (run / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    rows = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    logged, kept = without_timing(rows), without_timing(trained_run.history)
    # row by row: pytest.approx compares flat mappings only (pytest 9 refuses a list of dicts)
    assert len(logged) == len(kept) and all(a.keys() == b.keys() for a, b in zip(logged, kept))
    for a, b in zip(logged, kept):
        assert a == pytest.approx(b)
    with open(run / "log.csv") as f:
        csv_rows = list(csv.DictReader(f))
    assert [int(r["epoch"]) for r in csv_rows] == [1, 2]
    assert float(csv_rows[1]["val_loss"]) == pytest.approx(rows[1]["val_loss"], rel=1e-5)

    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["dataset"] == "breastmnist" and metrics["best_epoch"] == trained_run.best_epoch
    assert metrics["test"]["acc"] == pytest.approx(trained_run.test["acc"])
    assert metrics["test"]["n"] == 156 and metrics["val"]["n"] == 78
    config = json.loads((run / "config.json").read_text())
    assert config["model"] == "hybrid_mixer_small" and config["epochs"] == 2 and config["seed"] == 0

    _, _, last_state = load_checkpoint(run / "last.pth")
    assert last_state is not None and last_state["epoch"] == 2 and "optimizer" in last_state


def test_same_seed_repeats_exactly_and_another_seed_differs(packed_run, packed_data, tmp_path):
    again = train(dataset=str(packed_data), seed=1, out=str(tmp_path / "again"), **TINY_TRAIN)
    assert without_timing(again.history) == without_timing(packed_run.history)
    for k in ("acc", "auc", "loss", "f1"):
        assert again.test[k] == packed_run.test[k] and again.val[k] == packed_run.val[k]
    a, _, _ = load_checkpoint(packed_run.run_dir / "best_model.pth")
    b, _, _ = load_checkpoint(again.run_dir / "best_model.pth")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (packed_run.run_dir / "split.json").read_text() == (again.run_dir / "split.json").read_text()

    other = train(dataset=str(packed_data), seed=2, out=str(tmp_path / "other"), **TINY_TRAIN)
    assert [r["train_loss"] for r in other.history] != [r["train_loss"] for r in packed_run.history]
    assert json.loads((other.run_dir / "split.json").read_text())["test"] != \
        json.loads((packed_run.run_dir / "split.json").read_text())["test"]


def test_nll_loss_trains_exactly_like_cross_entropy(packed_run, packed_data, tmp_path):
    """``--loss nll`` (LogSoftmax + NLLLoss, the paper's) and ``--loss ce`` give the same loss on the same logits,
    so the same seed gives the same run."""
    logits, y = torch.randn(16, 3, generator=torch.Generator().manual_seed(0)), torch.arange(16) % 3
    assert build_loss("nll", "multi-class", 3)(logits, y).item() == pytest.approx(
        build_loss("ce", "multi-class", 3)(logits, y).item(), abs=1e-6)
    assert packed_run.history and json.loads((packed_run.run_dir / "config.json").read_text())["loss"] is None
    nll = train(dataset=str(packed_data), seed=1, loss="nll", out=str(tmp_path / "nll"), **TINY_TRAIN)
    for r_nll, r_ce in zip(nll.history, packed_run.history):
        assert r_nll["train_loss"] == pytest.approx(r_ce["train_loss"], abs=1e-5)
        assert r_nll["val_loss"] == pytest.approx(r_ce["val_loss"], abs=1e-5)
    _, meta, _ = load_checkpoint(nll.run_dir / "best_model.pth")
    assert meta["loss"] == "nll"


def test_multilabel_and_rgb_training(chest_npz, blood_npz, tmp_path):
    path, _ = chest_npz
    ml = train(dataset=str(path), out=str(tmp_path / "ml"), **{**TINY_TRAIN, "epochs": 1})
    assert ml.test["task"] == "multi-label, binary-class" and len(ml.test["auc_per_class"]) == 14
    assert not (ml.run_dir / "confusion_test.png").exists()  # no single confusion matrix for multi-label
    _, meta, _ = load_checkpoint(ml.run_dir / "best_model.pth")
    assert meta["loss"] == "bce" and meta["task"]["n_channels"] == 1 and len(meta["task"]["class_names"]) == 14

    path, _ = blood_npz
    rgb = train(dataset="bloodmnist", data_dir=str(path.parent), out=str(tmp_path / "rgb"),
                **{**TINY_TRAIN, "epochs": 1})
    _, meta, _ = load_checkpoint(rgb.run_dir / "best_model.pth")
    assert meta["model_kwargs"]["in_chans"] == 3 and len(meta["mean"]) == 3 and meta["img_size"] == 28
    assert rgb.test["n"] == 16


def test_failed_run_leaves_no_run_directory(packed_data, tmp_path, monkeypatch):
    import medmix.report

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(medmix.report, "plot_curves", boom)
    out = tmp_path / "broken"
    with pytest.raises(RuntimeError, match="disk full"):
        train(dataset=str(packed_data), seed=1, out=str(out), **{**TINY_TRAIN, "epochs": 1})
    assert not out.exists()  # only the .partial build directory, never a half-written run


def test_existing_run_directory_needs_overwrite(packed_data, tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    with pytest.raises(ConfigError, match="overwrite"):
        train(dataset=str(packed_data), out=str(out), **TINY_TRAIN)
    assert (out / "keep.txt").read_text() == "user data"


@pytest.mark.parametrize("kwargs,error", [
    ({"epochs": 0}, ConfigError), ({"batch_size": 0}, ConfigError), ({"optimizer": "lion"}, ConfigError),
    ({"precision": "fp8"}, ConfigError), ({"monitor": "speed"}, ConfigError), ({"schedule": "linear"}, ConfigError),
    ({"augment": "wild"}, ConfigError), ({"model": "no_such_model"}, UnknownNameError),
])
def test_bad_training_arguments(packed_data, tmp_path, kwargs, error):
    cfg = {**TINY_TRAIN, "out": str(tmp_path / "run"), **kwargs}
    with pytest.raises(error):
        train(dataset=str(packed_data), **cfg)
    assert not (tmp_path / "run").exists()


def test_unknown_model_fails_before_reading_data(tmp_path):
    with pytest.raises(UnknownNameError, match="hybrid_mixer_small"):
        train(dataset="pneumoniamnist", data_dir=str(tmp_path / "no data"), model="nope", out=str(tmp_path / "r"))


def test_official_64px_file_trains_at_64(tmp_path):
    write_official_npz(tmp_path / "d" / "pneumoniamnist_64.npz", 2, sizes=(24, 8, 8), side=64)
    r = train(dataset="pneumoniamnist", data_dir=str(tmp_path / "d"), size=64, out=str(tmp_path / "r"),
              **{**TINY_TRAIN, "epochs": 1})
    _, meta, _ = load_checkpoint(r.run_dir / "best_model.pth")
    assert meta["img_size"] == 64 and meta["data_size"] == 64 and meta["data_source"]["size"] == 64


def test_batchnorm_recalibration_uses_exact_clean_statistics():
    """After re-estimation the running mean/var are the equal-weight average of the per-batch statistics of the
    clean (un-augmented) training images, whatever stale values they held before."""
    import torch
    from torch import nn

    from medmix.data import BatchTransform
    from medmix.engine import recalibrate_batchnorm

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 1), nn.BatchNorm2d(3), nn.Flatten(), nn.Linear(3 * 8 * 8, 2))
    model[1].running_mean.fill_(5.0)  # stale statistics, as if gathered on other images
    model.eval()
    images = torch.randint(0, 256, (50, 1, 8, 8), dtype=torch.uint8)
    tf = BatchTransform(8, [0.5], [0.25], channels_last=False)
    assert recalibrate_batchnorm(model, images, tf, batch_size=25)
    order = torch.randperm(50, generator=torch.Generator().manual_seed(0))  # the fixed shuffled order it uses
    with torch.no_grad():
        batches = [model[0](tf(images[order[i:i + 25]])) for i in (0, 25)]
    mean = torch.stack([f.mean((0, 2, 3)) for f in batches]).mean(0)
    var = torch.stack([f.var((0, 2, 3), unbiased=True) for f in batches]).mean(0)
    assert torch.allclose(model[1].running_mean, mean, atol=1e-5)
    assert torch.allclose(model[1].running_var, var, rtol=1e-4)
    assert model[1].momentum == 0.1 and not model.training and not model[1].training  # modes restored
    assert not recalibrate_batchnorm(nn.Linear(2, 2), images, tf)


def test_batchnorm_recalibration_on_class_sorted_images_keeps_the_between_class_variance():
    """Regression: a packed dataset's train split is stored class by class; batches taken in storage order hold one
    class each, and averaging their variances forgot the spread between classes (MedNIST val ACC .9997 -> .80)."""
    import torch
    from torch import nn

    from medmix.data import BatchTransform
    from medmix.engine import recalibrate_batchnorm

    dark = torch.randint(0, 20, (200, 1, 8, 8), dtype=torch.uint8)
    bright = torch.randint(200, 220, (200, 1, 8, 8), dtype=torch.uint8)
    images = torch.cat([dark, bright])  # sorted by class
    tf = BatchTransform(8, [0.0], [1.0], channels_last=False)
    bn = nn.Sequential(nn.BatchNorm2d(1)).eval()
    assert recalibrate_batchnorm(bn, images, tf, batch_size=50)
    full = tf(images)
    assert float(bn[0].running_mean) == pytest.approx(float(full.mean()), rel=1e-4)
    assert float(bn[0].running_var) == pytest.approx(float(full.var()), rel=0.05)  # ~0.19; class-sorted gave ~0.0005


def _same_printed_digits(a: dict, b: dict) -> None:
    for k in ("acc", "auc", "loss"):
        assert f"{a[k]:.4f}" == f"{b[k]:.4f}", (k, a[k], b[k])


def test_evaluate_matches_metrics_json_and_report_says_epochs(trained_run, tmp_path):
    """`medmix evaluate` on a finished run gives metrics.json's test figures (same weights, same precision), and the
    report names the best epoch and the epochs run."""
    from medmix.evaluation import evaluate

    doc = json.loads((trained_run.run_dir / "metrics.json").read_text())
    m = evaluate(trained_run.run_dir, split="test", report=tmp_path / "report")
    assert m["float_precision"] == doc["float_precision"] == "fp32"
    _same_printed_digits(m, doc["test"])
    text = (tmp_path / "report" / "report.md").read_text()
    assert f"best epoch {doc['best_epoch']} of {doc['epochs_run']} run" in text and "evaluated in fp32" in text


def test_evaluate_uses_the_precision_the_run_used(tmp_path):
    """A bf16 run (with OOD statistics, whose features are fp32) evaluates in bf16 by default, as at the end of
    training; on CPUs without native bf16 the run would take minutes, so it is skipped there."""
    from medmix.data.medmnist import ASSETS
    from medmix.inference import bf16_supported
    from medmix.evaluation import evaluate

    if not bf16_supported():
        pytest.skip("no native bf16 on this CPU (bf16 is emulated, ~100x slower)")
    r = train(dataset="breastmnist", data_dir=str(ASSETS), epochs=1, batch_size=64, precision="bf16",
              out=str(tmp_path / "bf16"), quiet=True)
    doc = json.loads((r.run_dir / "metrics.json").read_text())
    m = evaluate(r.run_dir, split="test")
    assert doc["float_precision"] == m["float_precision"] == "bf16"
    _same_printed_digits(m, doc["test"])
    assert evaluate(r.run_dir, split="test", precision="fp32")["float_precision"] == "fp32"


def test_cpu_kind_reads_the_flags():
    from medmix.inference import cpu_kind, machine_description

    line = "flags\t\t: fpu sse2 avx fma avx2"
    assert cpu_kind(line) == "AVX2"
    assert cpu_kind(line + " avx512f") == "AVX-512"
    assert cpu_kind(line + " avx512f avx512_bf16") == "AVX-512 BF16"
    assert cpu_kind(line + " avx512f avx512_bf16 amx_bf16 amx_tile") == "AMX"
    assert cpu_kind("processor : 0") == "other"
    assert f"({cpu_kind()})" in machine_description()
