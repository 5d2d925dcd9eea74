"""`medmix evaluate`: calibration before/after in the metrics, the reliability diagram, and the ``--report``
directory (report.md with the official MedMNIST rows and its figures)."""
from __future__ import annotations

import json

import numpy as np
import pytest

import medmix
from medmix.cli import main
from medmix.data.tasks import BINARY, MULTI_CLASS, MULTI_LABEL, TaskInfo
from medmix.report import OFFICIAL_BENCHMARK, confident_mistakes, write_roc

PNG = b"\x89PNG"


def test_evaluate_json_reports_ece_and_nll_before_and_after(trained_run, capsys):
    assert main(["evaluate", str(trained_run.run_dir), "--split", "val", "--precision", "fp32", "--json"]) == 0
    m = json.loads(capsys.readouterr().out)
    for k in ("ece_before", "ece_after", "nll_before", "nll_after", "ece", "nll", "temperature"):
        assert isinstance(m[k], float), k
    assert m["n_bins"] == 15 and m["ece"] == m["ece_after"] and m["nll"] == m["nll_after"]
    assert m["nll_after"] <= m["nll_before"] + 1e-9  # T was fitted on this split's NLL
    assert m["temperature"] != 1.0
    assert 0.0 <= m["ood_flagged"] <= 0.06 and m["ood_method"] == "mahalanobis"  # 95% of val kept by construction
    assert main(["evaluate", str(trained_run.run_dir), "--split", "val", "--precision", "fp32"]) == 0
    out = capsys.readouterr().out
    assert "ECE" in out and "NLL" in out and "out of distribution" in out


def test_evaluate_out_writes_the_reliability_diagram(trained_run, tmp_path):
    m = medmix.evaluate(trained_run.run_dir, split="test", out=tmp_path / "figs", precision="fp32")
    for key, name in (("confusion_png", "confusion_test.png"), ("reliability_png", "reliability_test.png")):
        assert m[key] == str(tmp_path / "figs" / name) and (tmp_path / "figs" / name).read_bytes()[:4] == PNG


def test_report_writes_markdown_and_figures(trained_run, tmp_path, capsys):
    out = tmp_path / "report"
    assert main(["evaluate", str(trained_run.run_dir), "--report", str(out), "--precision", "fp32"]) == 0
    assert f"report: {out / 'report.md'}" in capsys.readouterr().out
    md = (out / "report.md").read_text()
    for png in ("confusion_test.png", "roc_test.png", "reliability_test.png", "mistakes_test.png"):
        assert (out / png).read_bytes()[:4] == PNG, png
        assert f"]({png})" in md  # linked from the report
    m = medmix.evaluate(trained_run.run_dir, precision="fp32")
    assert f"| ACC (official MedMNIST semantics) | {m['acc']:.4f} |" in md
    assert f"| AUC (official MedMNIST semantics) | {m['auc']:.4f} |" in md
    assert "ECE (15 bins)" in md and "NLL" in md
    for c in m["per_class"]:  # per-class precision/recall/F1
        assert f"| {c['name']} | {c['precision']:.4f} | {c['recall']:.4f} | {c['f1']:.4f} | {c['support']} |" in md
    for name, (acc, auc) in OFFICIAL_BENCHMARK["breastmnist"].items():  # the official rows beside ours
        assert f"| {name} | {acc:.3f} | {auc:.3f} |" in md
    assert "**medmix hybrid_mixer_small (this checkpoint, test)**" in md


def test_report_without_official_rows(packed_run, tmp_path):
    m = medmix.evaluate(packed_run.run_dir, split="val", report=tmp_path / "r", precision="fp32")
    md = (tmp_path / "r" / "report.md").read_text()
    assert m["report"] == str(tmp_path / "r" / "report.md")
    assert "No official benchmark rows" in md and "ours is on the val split" not in md
    assert (tmp_path / "r" / "mistakes_val.png").read_bytes()[:4] == PNG


def test_confident_mistakes_are_the_wrong_answers_sorted_by_confidence():
    info = TaskInfo(MULTI_CLASS, ("a", "b", "c"), 1)
    probs = np.array([[0.9, 0.05, 0.05], [0.2, 0.7, 0.1], [0.6, 0.3, 0.1], [0.1, 0.1, 0.8], [0.34, 0.33, 0.33]])
    labels = np.array([1, 1, 2, 0, 2])
    rows = confident_mistakes(probs, labels, info)
    assert [r["index"] for r in rows] == [0, 3, 2, 4]  # image 1 is right
    assert rows[0] == {"index": 0, "confidence": 0.9, "true": "b", "pred": "a"}
    assert len(confident_mistakes(probs, labels, info, k=2)) == 2
    # binary: the decision thresholds the positive class, like the official ACC
    binfo = TaskInfo(BINARY, ("neg", "pos"), 1)
    rows = confident_mistakes(np.array([[0.45, 0.55], [0.9, 0.1]]), np.array([0, 0]), binfo, threshold=0.6)
    assert rows == []
    rows = confident_mistakes(np.array([[0.45, 0.55], [0.9, 0.1]]), np.array([0, 0]), binfo)
    assert rows == [{"index": 0, "confidence": 0.55, "true": "neg", "pred": "pos"}]
    # multi-label: the most confident wrong label decision
    minfo = TaskInfo(MULTI_LABEL, ("x", "y"), 1)
    rows = confident_mistakes(np.array([[0.95, 0.2], [0.4, 0.6]]), np.array([[0, 0], [0, 1]]), minfo)
    assert rows == [{"index": 0, "confidence": 0.95, "true": "(none)", "pred": "x"}]


def test_roc_figure_survives_a_class_absent_from_the_split(tmp_path):
    info = TaskInfo(MULTI_CLASS, ("a", "b", "c"), 1)
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(3), 20)
    labels = np.arange(20) % 2  # class "c" never occurs
    assert write_roc(probs, labels, info, tmp_path / "roc.png", "t").read_bytes()[:4] == PNG


@pytest.mark.parametrize("bad", ["file"])
def test_report_dir_must_be_a_directory(trained_run, tmp_path, bad):
    f = tmp_path / "taken"
    f.write_text("x")
    with pytest.raises(medmix.MedmixError, match="not a directory"):
        medmix.evaluate(trained_run.run_dir, report=f)
