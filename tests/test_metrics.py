"""Metrics against medmnist's official evaluator, scikit-learn and hand-computed values."""
from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sklearn.metrics import cohen_kappa_score, precision_recall_fscore_support

from medmix.errors import ConfigError
from medmix.metrics import (
    compute_metrics,
    expected_calibration_error,
    expected_grade,
    medmnist_acc,
    medmnist_auc,
    nll,
    plot_confusion,
    plot_reliability,
    predict_labels,
    reliability_bins,
)

evaluator = pytest.importorskip("medmnist.evaluator")

MC, BIN, ML, ORD = "multi-class", "binary-class", "multi-label, binary-class", "ordinal-regression"


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def random_case(task: str, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Labels in medmnist's on-disk layout ((N, 1) uint8 or (N, 14) uint8) and scores as a model would give them."""
    rng = np.random.default_rng(seed)
    if task == ML:
        y = (rng.random((n, 14)) < 0.3).astype(np.uint8)
        s = 1 / (1 + np.exp(-(rng.normal(size=(n, 14)) + 1.5 * (y - 0.5))))
        return y, s
    c = {MC: 9, BIN: 2, ORD: 5}[task]
    y = rng.integers(0, c, size=(n, 1)).astype(np.uint8)
    z = rng.normal(size=(n, c))
    z[np.arange(n), y[:, 0]] += 1.0  # informative, not perfect
    return y, softmax(z)


def official(y: np.ndarray, s: np.ndarray, task: str, threshold: float = 0.5) -> tuple[float, float]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # UndefinedMetricWarning on absent classes
        return float(evaluator.getACC(y, s, task, threshold)), float(evaluator.getAUC(y, s, task))


def same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=1e-12, abs_tol=1e-15)


# --------------------------------------------------------------------------- official ACC / AUC
@pytest.mark.parametrize("task", [MC, BIN, ML, ORD])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_medmnist_random(task: str, seed: int) -> None:
    y, s = random_case(task, 200, seed)
    acc, auc = official(y, s, task)
    assert same(medmnist_acc(y, s, task), acc)
    assert same(medmnist_auc(y, s, task), auc)
    m = compute_metrics(y, s, task)
    assert same(m["acc"], acc) and same(m["auc"], auc)


@pytest.mark.parametrize("task", [BIN, ML])
@pytest.mark.parametrize("threshold", [0.3, 0.5, 0.8])
def test_matches_medmnist_thresholds(task: str, threshold: float) -> None:
    y, s = random_case(task, 150, 7)
    assert same(medmnist_acc(y, s, task, threshold), official(y, s, task, threshold)[0])


def edge_cases() -> list[tuple[str, str, np.ndarray, np.ndarray]]:
    cases: list[tuple[str, str, np.ndarray, np.ndarray]] = []
    rng = np.random.default_rng(3)
    # heavily tied scores (quantised to 0.1) -> AUC tie handling and argmax ties (lowest index wins)
    for task in (MC, BIN, ML, ORD):
        y, s = random_case(task, 120, 11)
        q = np.round(s, 1)
        if task != ML:
            q = q + 1e-12  # keep rows positive; ties stay ties
        cases.append((f"ties-{task}", task, y, q))
    # perfect and perfectly inverted scores
    y = rng.integers(0, 5, size=(60, 1))
    onehot = np.eye(5)[y[:, 0]]
    cases.append(("perfect-ord", ORD, y, 0.9 * onehot + 0.02))
    cases.append(("inverted-mc", MC, y, (1 - onehot) / 4))
    # binary: scores exactly at the threshold (strict '>' -> negative), 1-column positive scores
    yb = np.array([[0], [1], [1], [0], [1], [0]])
    pb = np.array([0.5, 0.5, 0.9, 0.1, 0.51, 0.49])
    cases.append(("bin-at-threshold", BIN, yb, np.stack([1 - pb, pb], axis=1)))
    cases.append(("bin-1d", BIN, yb, pb))
    # a class absent from y_true: official AUC is NaN with current scikit-learn
    ya = rng.integers(0, 4, size=(40, 1))  # class 4 of 5 never occurs
    cases.append(("absent-class-mc", MC, ya, softmax(rng.normal(size=(40, 5)))))
    yl, sl = random_case(ML, 50, 5)
    yl[:, 3] = 0  # a label that is never positive
    cases.append(("absent-label-ml", ML, yl, sl))
    cases.append(("bin-one-class", BIN, np.zeros((5, 1), int), softmax(rng.normal(size=(5, 2)))))
    return cases


@pytest.mark.parametrize("name,task,y,s", edge_cases(), ids=lambda v: v if isinstance(v, str) else "")
def test_matches_medmnist_edge_cases(name: str, task: str, y: np.ndarray, s: np.ndarray) -> None:
    acc, auc = official(y, s, task)
    assert same(medmnist_acc(y, s, task), acc), name
    assert same(medmnist_auc(y, s, task), auc), name


def test_known_values_and_absent_class() -> None:
    y = np.array([0, 1, 2, 3, 4] * 4)
    onehot = np.eye(5)[y]
    assert medmnist_acc(y, 0.9 * onehot + 0.02, ORD) == 1.0
    assert medmnist_auc(y, 0.9 * onehot + 0.02, ORD) == 1.0
    assert medmnist_auc(y, (1 - onehot) / 4, MC) == 0.0
    # binary: p = .5 is *not* positive (strict >), as in medmnist
    assert medmnist_acc([1, 0], [[0.5, 0.5], [0.5, 0.5]], BIN) == 0.5
    # class 4 absent: official AUC is NaN; compute_metrics keeps the defined-class mean
    ya = np.array([0, 1, 2, 3] * 5)
    s = 0.9 * np.eye(5)[ya] + 0.02
    assert math.isnan(medmnist_auc(ya, s, MC))
    m = compute_metrics(ya, s, MC)
    assert math.isnan(m["auc"]) and math.isnan(m["auc_per_class"][4])
    assert m["auc_defined_mean"] == 1.0 and m["auc_per_class"][:4] == [1.0] * 4


# --------------------------------------------------------------------------- sklearn references
@pytest.mark.parametrize("task", [MC, BIN, ORD])
def test_prf_against_sklearn(task: str) -> None:
    y, s = random_case(task, 300, 4)
    c = s.shape[1]
    pred = s[:, -1] > 0.5 if task == BIN else s.argmax(1)
    p, r, f, sup = precision_recall_fscore_support(y[:, 0], pred, labels=list(range(c)), zero_division=0)
    m = compute_metrics(y, s, task)
    assert m["n"] == 300
    assert m["precision"] == pytest.approx(p.mean()) and m["recall"] == pytest.approx(r.mean())
    assert m["f1"] == pytest.approx(f.mean())
    for k, row in enumerate(m["per_class"]):
        assert row == pytest.approx({"name": str(k), "precision": p[k], "recall": r[k], "f1": f[k],
                                     "support": int(sup[k]), "auc": row["auc"]})
    ref = precision_recall_fscore_support(y[:, 0], pred, average="macro", zero_division=0)
    assert m["f1"] == pytest.approx(ref[2])  # every class occurs here, so sklearn's own macro agrees


def test_multilabel_prf_against_sklearn() -> None:
    y, s = random_case(ML, 300, 6)
    names = [f"finding_{k}" for k in range(14)]
    m = compute_metrics(y, s, ML, class_names=names, threshold=0.4)
    p, r, f, _ = precision_recall_fscore_support(y, s > 0.4, average="macro", zero_division=0)
    assert (m["precision"], m["recall"], m["f1"]) == pytest.approx((p, r, f))
    assert m["threshold"] == 0.4 and m["per_class"][3]["name"] == "finding_3"
    assert m["per_class"][3]["support"] == int(y[:, 3].sum())
    assert len(m["confusion"]) == 14 and np.array(m["confusion"]).shape == (14, 2, 2)
    # per-label thresholds
    th = np.linspace(0.2, 0.8, 14)
    assert np.array_equal(predict_labels(s, ML, th), (s > th).astype(int))
    assert same(medmnist_acc(y, s, ML, th), float(np.mean([np.mean(y[:, k] == (s[:, k] > th[k])) for k in range(14)])))


def test_ordinal_metrics() -> None:
    y, s = random_case(ORD, 300, 8)
    m = compute_metrics(y, s, ORD)
    pred = s.argmax(1)
    e = expected_grade(s)
    assert m["mae"] == pytest.approx(np.abs(pred - y[:, 0]).mean())
    assert m["qwk"] == pytest.approx(cohen_kappa_score(y[:, 0], pred, weights="quadratic"))
    assert m["mae_expected"] == pytest.approx(np.abs(e - y[:, 0]).mean())
    assert m["qwk_expected"] == pytest.approx(cohen_kappa_score(y[:, 0], e, weights="quadratic"))
    assert m["acc_expected"] == pytest.approx(np.mean(e == y[:, 0]))
    # tiny hand example: y = (0, 2, 4), argmax = (1, 2, 2) -> |err| = 1, 0, 2 -> MAE = 1
    p = np.array([[0.2, 0.7, 0.1, 0, 0], [0, 0.1, 0.8, 0.1, 0], [0, 0, 0.5, 0.2, 0.3]])
    assert compute_metrics([0, 2, 4], p, ORD)["mae"] == pytest.approx(1.0)
    assert "mae" not in compute_metrics([0, 2, 4], p, MC)


def test_expected_grade_by_hand() -> None:
    p = np.array([
        [0.1, 0.2, 0.4, 0.2, 0.1],   # E = .2 + .8 + .6 + .4 = 2.0 -> 2
        [0.5, 0.0, 0.0, 0.0, 0.5],   # E = 2.0 -> 2 (argmax would say 0)
        [0.0, 0.5, 0.5, 0.0, 0.0],   # E = 1.5 -> 2 (half rounds up)
        [0.6, 0.3, 0.1, 0.0, 0.0],   # E = .3 + .2 = .5 -> 1
        [0.0, 0.0, 0.0, 0.3, 0.7],   # E = .9 + 2.8 = 3.7 -> 4
    ])
    assert expected_grade(p).tolist() == [2, 2, 2, 1, 4]
    assert predict_labels(p, ORD, ordinal_mode="expected").tolist() == [2, 2, 2, 1, 4]
    assert predict_labels(p, ORD).tolist() == [2, 0, 1, 0, 4]


# --------------------------------------------------------------------------- confusion / calibration
def test_confusion_tiny() -> None:
    # y = (0,1,2,2), argmax = (0,2,2,1): rows true, columns predicted
    s = np.array([[0.8, 0.1, 0.1], [0.1, 0.2, 0.7], [0.2, 0.2, 0.6], [0.1, 0.6, 0.3]])
    m = compute_metrics([0, 1, 2, 2], s, MC, class_names=["a", "b", "c"])
    assert m["confusion"] == [[1, 0, 0], [0, 0, 1], [0, 1, 1]]
    # class c: precision 1/2 (pred c = samples 1, 2; sample 2 correct), recall 1/2, f1 1/2; class b: 0/0/0
    assert m["per_class"][2] == {"name": "c", "precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2,
                                 "auc": m["per_class"][2]["auc"]}
    assert m["per_class"][1]["precision"] == 0.0 and m["per_class"][1]["f1"] == 0.0
    # multi-label per label [[tn, fp], [fn, tp]]: label 0 y=(1,0,1) pred=(1,1,0); label 1 y=(0,0,1) pred=(0,0,1)
    ml = compute_metrics([[1, 0], [0, 0], [1, 1]], [[0.9, 0.1], [0.6, 0.2], [0.4, 0.7]], ML)
    assert ml["confusion"] == [[[0, 1], [1, 1]], [[2, 0], [0, 1]]]
    # binary uses the positive column with '>' 0.5
    b = compute_metrics([0, 1, 1, 0], [[0.4, 0.6], [0.3, 0.7], [0.5, 0.5], [0.9, 0.1]], BIN)
    assert b["confusion"] == [[1, 1], [1, 1]] and b["acc"] == 0.5


def test_ece_by_hand() -> None:
    # 5 bins (0,.2], (.2,.4], (.4,.6], (.6,.8], (.8,1]
    probs = np.array([
        [0.90, 0.05, 0.05],  # y=0: conf .90 correct -> bin 4
        [0.10, 0.85, 0.05],  # y=2: conf .85 wrong   -> bin 4
        [0.60, 0.30, 0.10],  # y=0: conf .60 correct -> bin 2 (right edge included)
        [0.30, 0.50, 0.20],  # y=0: conf .50 wrong   -> bin 2
        [0.25, 0.40, 0.35],  # y=1: conf .40 correct -> bin 1 (right edge included; [lo,hi) would give bin 2)
    ])
    labels = np.array([0, 2, 0, 0, 1])
    # bin 4: 2/5 * |1/2 - (.90 + .85)/2| = .4 * .375 = .15
    # bin 2: 2/5 * |1/2 - (.60 + .50)/2| = .4 * .05  = .02
    # bin 1: 1/5 * |1   - .40|           = .2 * .6   = .12        ECE = .29
    assert expected_calibration_error(probs, labels, n_bins=5) == pytest.approx(0.29)
    assert reliability_bins(probs, labels, n_bins=5)["count"] == [0, 1, 2, 0, 2]
    # NLL = -mean(log(.90, .05, .60, .30, .40))
    assert nll(probs, labels) == pytest.approx(-np.mean(np.log([0.9, 0.05, 0.6, 0.3, 0.4])))
    # perfectly confident and right: ECE 0
    assert expected_calibration_error(np.eye(3), [0, 1, 2]) == 0.0


# --------------------------------------------------------------------------- plots
def is_png(path: Path) -> bool:
    return path.is_file() and path.stat().st_size > 0 and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plots_written(tmp_path: Path) -> None:
    y, s = random_case(MC, 100, 9)
    m = compute_metrics(y, s, MC)
    names = ["adipose", "background", "debris", "lymphocytes", "mucus", "smooth muscle",
             "normal colon mucosa", "cancer-associated stroma", "colorectal adenocarcinoma epithelium"]
    cm_path = plot_confusion(m["confusion"], names, tmp_path / "sub" / "cm.png", title="PathMNIST")
    rel_path = plot_reliability(s, y, tmp_path / "rel.png", n_bins=10)
    assert is_png(cm_path) and is_png(rel_path)
    assert is_png(plot_confusion([[3, 1], [0, 4]], None, tmp_path / "small.png"))
    with pytest.raises(ConfigError):
        plot_confusion(m["confusion"], names[:3], tmp_path / "bad.png")
    with pytest.raises(ConfigError):
        plot_confusion([[1, 2, 3]], None, tmp_path / "bad.png")


# --------------------------------------------------------------------------- validation
@pytest.mark.parametrize(
    "y,s,task,match",
    [
        ([0, 1, 2], np.full((4, 3), 1 / 3), MC, "3 samples but y_score has 4"),
        ([0, 1], np.full((2, 3, 1), 1 / 3), MC, "shape"),
        ([0, 1], [[0.5, np.nan, 0.5], [0.2, 0.3, 0.5]], MC, "NaN"),
        ([0, 3], np.full((2, 3), 1 / 3), MC, r"\[0, 2\]"),
        ([0, -1], np.full((2, 3), 1 / 3), ORD, "min -1"),
        ([0.5, 1], np.full((2, 3), 1 / 3), MC, "integer"),
        ([0, 1], np.full((2, 3), 1 / 3), BIN, r"\(N, 2\)"),
        ([0, 2], np.full((2, 2), 0.5), BIN, r"\[0, 1\]"),
        (np.zeros((2, 13)), np.full((2, 14), 0.5), ML, "13 labels but y_score has 14"),
        (np.full((2, 14), 2), np.full((2, 14), 0.5), ML, "only 0 and 1"),
        ([0, 1], np.full((2, 14), 0.5), ML, r"\(N, L\)"),
        ([0, 1], np.full((2, 3), 1 / 3), "regression", "unknown task"),
        ([], np.zeros((0, 3)), MC, "empty"),
    ],
)
def test_validation_errors(y: Any, s: Any, task: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        compute_metrics(y, s, task)
    with pytest.raises(ConfigError, match=match):
        medmnist_auc(y, s, task)


def test_other_validation_errors() -> None:
    s = np.full((2, 3), 1 / 3)
    with pytest.raises(ConfigError, match="class_names"):
        compute_metrics([0, 1], s, MC, class_names=["a", "b"])
    with pytest.raises(ConfigError, match="ordinal_mode"):
        predict_labels(s, MC, ordinal_mode="expected")
    with pytest.raises(ConfigError, match="per label"):
        predict_labels(np.full((2, 14), 0.5), ML, threshold=[0.5, 0.5])
    with pytest.raises(ConfigError, match="n_bins"):
        expected_calibration_error(s, [0, 1], n_bins=0)
    with pytest.raises(ConfigError, match="NaN"):
        nll([[np.inf, 0.0]], [0])
    # a single sample works (medmnist's squeeze() would break here)
    assert compute_metrics([[2]], [[0.1, 0.2, 0.7]], MC)["acc"] == 1.0
