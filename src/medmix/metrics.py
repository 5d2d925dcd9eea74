"""Evaluation metrics for the four MedMNIST task kinds (numpy in, plain Python out).

Task strings are ``medmnist.INFO[flag]["task"]``: ``"multi-class"``, ``"binary-class"``, ``"multi-label,
binary-class"`` and ``"ordinal-regression"``. Score conventions (the ones ``medmnist.Evaluator`` expects):

* multi-class / ordinal-regression: ``(N, C)`` softmax probabilities;
* binary-class: ``(N, 2)`` softmax probabilities, the *last* column is the positive class (a 1-D ``(N,)`` or
  ``(N, 1)`` positive-class score is accepted too, as medmnist does);
* multi-label: ``(N, L)`` independent sigmoid probabilities.

``y_true`` is ``(N,)`` or ``(N, 1)`` integer labels for single-label tasks and ``(N, L)`` 0/1 for multi-label tasks.

:func:`medmnist_acc` / :func:`medmnist_auc` reproduce ``medmnist.evaluator.getACC`` / ``getAUC`` (medmnist 3.0.2)
exactly, re-implemented with scikit-learn. Semantics and quirks of the official evaluator, all kept on purpose so
numbers stay comparable with published MedMNIST results:

* multi-class and ordinal AUC is the *unweighted mean of one-vs-rest AUCs* over all ``C`` score columns (not
  sklearn's ``multi_class="ovr"`` on renormalised scores, and not weighted); ordinal tasks are scored exactly like
  multi-class ones (ACC = argmax accuracy).
* binary ACC thresholds the last column with a *strict* ``score > threshold`` (default 0.5), it does not take an
  argmax; AUC uses the last column only.
* multi-label ACC is the mean over labels of the per-label accuracy of ``score > threshold`` (i.e. the element-wise
  accuracy, not exact-match/subset accuracy); multi-label AUC is the unweighted mean of the per-label AUCs.
* **A class (or label) absent from ``y_true``** makes its one-vs-rest AUC undefined. medmnist just calls
  ``roc_auc_score``: with the installed scikit-learn (>= 1.6 or so) that warns and returns NaN, so the official mean
  AUC becomes **NaN**; older scikit-learn raised ``ValueError``. We return NaN for the official number (no warning),
  and :func:`compute_metrics` additionally reports ``auc_per_class`` (NaN for undefined classes) and
  ``auc_defined_mean`` (mean over the classes whose AUC is defined), usable on a small validation split.
* medmnist ``squeeze()``\\s both arrays, so it breaks on a single sample; we only drop a trailing label axis of size 1
  and accept ``N == 1``.
* argmax ties go to the lowest class index (numpy), as in medmnist.
"""
from __future__ import annotations

import operator
import warnings
from collections.abc import Sequence
from functools import reduce
from pathlib import Path
from typing import Any, Literal

import numpy as np
from numpy.typing import ArrayLike, NDArray

from .atomic import atomic_file
from .errors import ConfigError
from .task_kinds import BINARY, MULTI_CLASS, MULTI_LABEL, ORDINAL, TASKS, check_task

__all__ = ["TASKS", "compute_metrics", "expected_calibration_error", "expected_grade", "medmnist_acc", "medmnist_auc",
           "nll", "per_class_auc", "plot_confusion", "plot_reliability", "predict_labels", "reliability_bins"]


# --------------------------------------------------------------------------- validation
def _as_scores(y_score: ArrayLike, task: str) -> NDArray[np.float64]:
    """Return scores as float64: (N, C) for every task except binary, where it is the (N,) positive score."""
    try:
        s = np.asarray(y_score, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"y_score must be a numeric array ({e})") from None
    if task == BINARY:
        if s.ndim == 2 and s.shape[1] in (1, 2):
            s = s[:, -1]  # last column = positive class, exactly like medmnist
        elif s.ndim != 1:
            raise ConfigError(f"binary-class y_score must have shape (N, 2) (last column = positive class) or (N,); "
                              f"got {s.shape}")
    elif s.ndim != 2:
        raise ConfigError(f"y_score must have shape (N, C) for task {task!r}; got {s.shape}")
    if s.shape[0] == 0:
        raise ConfigError("y_score is empty (no samples)")
    if task != BINARY and s.shape[1] < 1:
        raise ConfigError(f"y_score has no columns; got shape {s.shape}")
    if not np.all(np.isfinite(s)):
        bad = int(np.size(s) - np.count_nonzero(np.isfinite(s)))
        raise ConfigError(f"y_score contains {bad} NaN/inf value(s); scores must be finite probabilities")
    return s


def _as_labels(y_true: ArrayLike, task: str, n: int, n_cols: int | None) -> NDArray[np.int64]:
    """Validate labels: (N,) ints in [0, C) for single-label tasks, (N, L) 0/1 for multi-label."""
    try:
        t = np.asarray(y_true, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"y_true must be a numeric array ({e})") from None
    if task == MULTI_LABEL:
        if t.ndim != 2:
            raise ConfigError(f"multi-label y_true must have shape (N, L); got {t.shape}")
    else:
        if t.ndim == 2 and t.shape[1] == 1:
            t = t[:, 0]
        if t.ndim != 1:
            raise ConfigError(f"y_true must have shape (N,) or (N, 1) for task {task!r}; got {t.shape}")
    if t.shape[0] != n:
        raise ConfigError(f"y_true has {t.shape[0]} samples but y_score has {n}; they must match")
    if not np.all(np.isfinite(t)):
        raise ConfigError("y_true contains NaN/inf values")
    if np.any(t != np.round(t)):
        raise ConfigError("y_true must hold integer class labels (or 0/1 for multi-label tasks)")
    lab = t.astype(np.int64)
    if task == MULTI_LABEL:
        if n_cols is not None and lab.shape[1] != n_cols:
            raise ConfigError(f"y_true has {lab.shape[1]} labels but y_score has {n_cols} columns; they must match")
        if np.any((lab != 0) & (lab != 1)):
            raise ConfigError("multi-label y_true must contain only 0 and 1")
    else:
        n_classes = 2 if task == BINARY else n_cols
        assert n_classes is not None
        if lab.min() < 0 or lab.max() >= n_classes:
            raise ConfigError(f"y_true labels must lie in [0, {n_classes - 1}] for {n_classes} classes; "
                              f"got min {int(lab.min())}, max {int(lab.max())}")
    return lab


def _validate(y_true: ArrayLike, y_score: ArrayLike, task: str) -> tuple[NDArray[np.int64], NDArray[np.float64]]:
    check_task(task)
    s = _as_scores(y_score, task)
    return _as_labels(y_true, task, s.shape[0], None if task == BINARY else s.shape[1]), s


def _threshold_array(threshold: Any, scores: NDArray[np.float64]) -> float | NDArray[np.float64]:
    """``threshold`` for ``scores`` (from :func:`_as_scores`): a float, or one value per column of 2-D scores."""
    n_cols = scores.shape[1] if scores.ndim == 2 else None
    th = np.asarray(threshold, dtype=np.float64)
    if not np.all(np.isfinite(th)):
        raise ConfigError("threshold must be finite")
    if th.ndim == 0:
        return float(th)
    if th.ndim != 1 or n_cols is None or th.shape[0] != n_cols:
        raise ConfigError(f"threshold must be a float or one value per label ({n_cols}); got shape {th.shape}")
    return th


# --------------------------------------------------------------------------- predictions
def expected_grade(probs: ArrayLike) -> NDArray[np.int64]:
    """Expected-grade prediction for ordinal tasks: ``floor(sum_k p_k * k + 0.5)`` (round half up), clipped to
    [0, C-1]."""
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2 or p.shape[1] < 1:
        raise ConfigError(f"probs must have shape (N, C); got {p.shape}")
    if not np.all(np.isfinite(p)):
        raise ConfigError("probs contains NaN/inf values")
    e = p @ np.arange(p.shape[1], dtype=np.float64)
    return np.clip(np.floor(e + 0.5), 0, p.shape[1] - 1).astype(np.int64)


def predict_labels(y_score: ArrayLike, task: str, threshold: Any = 0.5,
                   ordinal_mode: Literal["argmax", "expected"] = "argmax") -> NDArray[np.int64]:
    """Hard predictions: argmax (multi-class, ordinal ``"argmax"``), ``round(E[grade])`` (ordinal ``"expected"``),
    ``positive score > threshold`` (binary, as medmnist), ``score > threshold`` per label (multi-label; the
    threshold may be one float or one value per label). Returns (N,) ints, or (N, L) 0/1 for multi-label."""
    check_task(task)
    if ordinal_mode not in ("argmax", "expected"):
        raise ConfigError(f"ordinal_mode must be 'argmax' or 'expected'; got {ordinal_mode!r}")
    if ordinal_mode == "expected" and task != ORDINAL:
        raise ConfigError(f"ordinal_mode='expected' only applies to task {ORDINAL!r}, not {task!r}")
    s = _as_scores(y_score, task)
    if task in (BINARY, MULTI_LABEL):
        return (s > _threshold_array(threshold, s)).astype(np.int64)
    if task == ORDINAL and ordinal_mode == "expected":
        return expected_grade(s)
    return np.argmax(s, axis=-1).astype(np.int64)


# --------------------------------------------------------------------------- official metrics
def _mean_in_order(values: list[float]) -> float:
    """Mean summed left to right like medmnist's loops (``sum()`` compensates from Python 3.12 on)."""
    return float(reduce(operator.add, values, 0.0) / len(values))


def medmnist_acc(y_true: ArrayLike, y_score: ArrayLike, task: str, threshold: Any = 0.5) -> float:
    """ACC with the exact semantics of ``medmnist.evaluator.getACC`` (see the module docstring)."""
    from sklearn.metrics import accuracy_score

    lab, s = _validate(y_true, y_score, task)
    if task == MULTI_LABEL:
        pred = s > _threshold_array(threshold, s)
        return _mean_in_order([accuracy_score(lab[:, k], pred[:, k]) for k in range(lab.shape[1])])
    if task == BINARY:
        return float(accuracy_score(lab, s > _threshold_array(threshold, s)))
    return float(accuracy_score(lab, np.argmax(s, axis=-1)))


def _binary_auc(y: NDArray[np.int64], score: NDArray[np.float64]) -> float:
    """ROC AUC, or NaN (silently) if y holds only one class - what medmnist gets from current sklearn."""
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(y, score)) if np.unique(y).size >= 2 else float("nan")


def per_class_auc(y_true: ArrayLike, y_score: ArrayLike, task: str) -> list[float]:
    """One-vs-rest AUC per score column (per label for multi-label; one value for binary). NaN where undefined."""
    lab, s = _validate(y_true, y_score, task)
    if task == BINARY:
        return [_binary_auc(lab, s)]
    if task == MULTI_LABEL:
        return [_binary_auc(lab[:, k], s[:, k]) for k in range(s.shape[1])]
    return [_binary_auc((lab == k).astype(np.int64), s[:, k]) for k in range(s.shape[1])]


def medmnist_auc(y_true: ArrayLike, y_score: ArrayLike, task: str) -> float:
    """AUC with the exact semantics of ``medmnist.evaluator.getAUC``: mean of the one-vs-rest (or per-label) AUCs
    over all columns; NaN if any class/label is absent from ``y_true`` (see the module docstring)."""
    return _mean_in_order(per_class_auc(y_true, y_score, task))


# --------------------------------------------------------------------------- calibration
def _probs_labels(probs: ArrayLike, labels: ArrayLike) -> tuple[NDArray[np.float64], NDArray[np.int64]]:
    p = _as_scores(probs, MULTI_CLASS)
    return p, _as_labels(labels, MULTI_CLASS, p.shape[0], p.shape[1])


def label_decisions(probs: ArrayLike, labels: ArrayLike) -> tuple[NDArray[np.float64], NDArray[np.int64]]:
    """Multi-label ``(N, L)`` probabilities and 0/1 labels as every (image, label) decision, a two-class problem:
    ``(N * L, 2)`` probabilities ``[1 - p, p]`` and ``(N * L,)`` labels, for the calibration metrics and plots."""
    p = np.asarray(probs, dtype=np.float64).reshape(-1)
    return np.stack([1.0 - p, p], axis=1), np.asarray(labels).reshape(-1).astype(np.int64)


def reliability_bins(probs: ArrayLike, labels: ArrayLike, n_bins: int = 15) -> dict[str, list[float] | list[int]]:
    """Top-label reliability statistics on ``n_bins`` equal-width confidence bins ``(lo, hi]``
    (a confidence of exactly 0 goes to the first bin). Returns edges, counts, per-bin accuracy and mean
    confidence (0.0 for empty bins)."""
    if not isinstance(n_bins, (int, np.integer)) or isinstance(n_bins, bool) or n_bins < 1:
        raise ConfigError(f"n_bins must be a positive integer; got {n_bins!r}")
    p, lab = _probs_labels(probs, labels)
    conf = p.max(axis=1)
    correct = (p.argmax(axis=1) == lab).astype(np.float64)
    edges = np.linspace(0.0, 1.0, int(n_bins) + 1)
    idx = np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, int(n_bins) - 1)
    counts = np.bincount(idx, minlength=n_bins)
    sum_acc = np.bincount(idx, weights=correct, minlength=n_bins)
    sum_conf = np.bincount(idx, weights=conf, minlength=n_bins)
    nz = np.maximum(counts, 1)
    return {"edges": edges.tolist(), "count": counts.astype(int).tolist(), "accuracy": (sum_acc / nz).tolist(),
            "confidence": (sum_conf / nz).tolist()}


def expected_calibration_error(probs: ArrayLike, labels: ArrayLike, n_bins: int = 15) -> float:
    """Top-label ECE (Guo et al. 2017): ``sum_b |B_b|/N * |acc(B_b) - conf(B_b)|`` over equal-width bins ``(lo, hi]``
    of the max probability."""
    b = reliability_bins(probs, labels, n_bins)
    n = float(sum(b["count"]))
    return float(sum(c / n * abs(a - cf) for c, a, cf in zip(b["count"], b["accuracy"], b["confidence"]) if c > 0))


def nll(probs: ArrayLike, labels: ArrayLike, eps: float = 1e-12) -> float:
    """Mean negative log-likelihood ``-log max(p_y, eps)`` of the true class."""
    p, lab = _probs_labels(probs, labels)
    py = p[np.arange(p.shape[0]), lab]
    return float(-np.mean(np.log(np.maximum(py, eps))))


# --------------------------------------------------------------------------- the full report
def _qwk(y: NDArray[np.int64], pred: NDArray[np.int64], n_classes: int) -> float:
    from sklearn.metrics import cohen_kappa_score

    with warnings.catch_warnings(), np.errstate(divide="ignore", invalid="ignore"):
        warnings.simplefilter("ignore")
        return float(cohen_kappa_score(y, pred, labels=list(range(n_classes)), weights="quadratic"))


def compute_metrics(y_true: ArrayLike, y_score: ArrayLike, task: str, class_names: Sequence[str] | None = None,
                    threshold: Any = 0.5) -> dict[str, Any]:
    """Every metric medmix reports, as plain Python values (JSON-ready except that undefined values are NaN).

    Keys: ``task``, ``n``, ``acc``/``auc`` (official medmnist semantics), ``auc_per_class``, ``auc_defined_mean``,
    ``precision``/``recall``/``f1`` (macro, sklearn, ``zero_division=0``; single-label tasks average over *all*
    ``C`` classes, so ``macro == mean(per_class)``; multi-label: macro over labels of the thresholded predictions),
    ``confusion`` (C x C list, rows = true, columns = predicted; multi-label: one ``[[tn, fp], [fn, tp]]`` per
    label), ``per_class`` (name, precision, recall, f1, support, auc), ``threshold`` for binary/multi-label, and for
    ordinal tasks ``mae``/``qwk`` of the argmax grade plus ``acc_expected``/``mae_expected``/``qwk_expected`` of
    the expected grade ``round(sum_k p_k k)``.
    """
    from sklearn.metrics import confusion_matrix, multilabel_confusion_matrix, precision_recall_fscore_support

    lab, s = _validate(y_true, y_score, task)
    n_cols = 2 if task == BINARY else s.shape[1]
    names = [str(c) for c in (range(n_cols) if class_names is None else class_names)]
    if len(names) != n_cols:
        raise ConfigError(f"class_names has {len(names)} entries but the task has {n_cols} classes/labels")
    pred = predict_labels(y_score, task, threshold)
    aucs = per_class_auc(lab, y_score, task)
    defined = [a for a in aucs if not np.isnan(a)]
    out: dict[str, Any] = {"task": task, "n": int(lab.shape[0]), "acc": medmnist_acc(lab, y_score, task, threshold),
                           "auc": medmnist_auc(lab, y_score, task), "auc_per_class": aucs,
                           "auc_defined_mean": float(np.mean(defined)) if defined else float("nan")}
    if task in (BINARY, MULTI_LABEL):
        th = _threshold_array(threshold, s)
        out["threshold"] = th.tolist() if isinstance(th, np.ndarray) else th

    labels_arg = None if task == MULTI_LABEL else list(range(n_cols))
    p, r, f, sup = precision_recall_fscore_support(lab, pred, labels=labels_arg, average=None, zero_division=0)
    out.update(precision=float(np.mean(p)), recall=float(np.mean(r)), f1=float(np.mean(f)))
    out["confusion"] = (multilabel_confusion_matrix(lab, pred) if task == MULTI_LABEL else
                        confusion_matrix(lab, pred, labels=labels_arg)).astype(int).tolist()
    # binary: the single AUC belongs to the positive class; report it on both rows (AUC is symmetric)
    label_auc = aucs * 2 if task == BINARY else aucs
    out["per_class"] = [{"name": names[k], "precision": float(p[k]), "recall": float(r[k]), "f1": float(f[k]),
                         "support": int(sup[k]), "auc": float(label_auc[k])} for k in range(n_cols)]
    if task == ORDINAL:
        e = expected_grade(s)
        out.update(mae=float(np.mean(np.abs(pred - lab))), qwk=_qwk(lab, pred, n_cols),
                   acc_expected=float(np.mean(e == lab)), mae_expected=float(np.mean(np.abs(e - lab))),
                   qwk_expected=_qwk(lab, e, n_cols))
    return out


# --------------------------------------------------------------------------- plots
def _new_figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=120)
    FigureCanvasAgg(fig)  # Agg canvas without touching pyplot's global backend
    return fig


def save_figure(fig: Any, path: str | Path) -> Path:
    """Write ``fig`` as a PNG at ``path`` through a temporary file and a rename, so a reader (or a kill mid-write)
    never sees half an image; creates the parent directory."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(out) as f:
        fig.savefig(f, format="png")
    return out


def plot_confusion(cm: ArrayLike, class_names: Sequence[str] | None, path: str | Path,
                   title: str = "Confusion matrix") -> Path:
    """Write a PNG of a C x C confusion matrix (rows = true, columns = predicted) with the counts annotated."""
    m = np.asarray(cm)
    if m.ndim != 2 or m.shape[0] != m.shape[1] or m.shape[0] == 0:
        raise ConfigError(f"cm must be a square C x C matrix; got shape {m.shape}")
    c = m.shape[0]
    names = [str(x) for x in (range(c) if class_names is None else class_names)]
    if len(names) != c:
        raise ConfigError(f"class_names has {len(names)} entries but cm is {c} x {c}")
    longest = max(len(x) for x in names)
    side = max(4.0, 0.6 * c + 2.0 + 0.06 * longest)
    fig = _new_figure(side + 1.0, side)
    ax = fig.add_subplot(111)
    im = ax.imshow(m, cmap="Blues", interpolation="nearest")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    ax.set(xticks=range(c), yticks=range(c), xlabel="predicted", ylabel="true", title=title)
    rotate = longest > 3
    ax.set_xticklabels(names, rotation=45 if rotate else 0, ha="right" if rotate else "center")
    ax.set_yticklabels(names)
    vmax = float(m.max()) if m.size else 0.0
    fs = max(5.0, min(11.0, 120.0 / c))
    for (i, j), v in np.ndenumerate(m):
        txt = f"{int(v)}" if float(v).is_integer() else f"{float(v):.2f}"
        ax.text(j, i, txt, ha="center", va="center", fontsize=fs,
                color="white" if vmax > 0 and float(v) > vmax / 2 else "black")
    fig.tight_layout()
    return save_figure(fig, path)


def plot_reliability(probs: ArrayLike, labels: ArrayLike, path: str | Path, n_bins: int = 15,
                     title: str = "Reliability diagram") -> Path:
    """Write a PNG reliability diagram (per-bin accuracy vs confidence, the diagonal, ECE in the title)."""
    b = reliability_bins(probs, labels, n_bins)
    ece = expected_calibration_error(probs, labels, n_bins)
    edges, counts, acc, conf = (np.asarray(b[k]) for k in ("edges", "count", "accuracy", "confidence"))
    width = edges[1] - edges[0]
    fig = _new_figure(5.0, 5.0)
    ax = fig.add_subplot(111)
    ax.bar(edges[:-1], acc, width=width, align="edge", edgecolor="black", color="tab:blue", alpha=0.8,
           label="accuracy")
    # empty bins have accuracy = confidence = 0, so no bar and no gap
    ax.bar(edges[:-1], np.abs(conf - acc), bottom=np.minimum(acc, conf), width=width, align="edge", fill=False,
           hatch="//", edgecolor="tab:red", linewidth=0.8, label="|accuracy - confidence|")
    ax.plot([0, 1], [0, 1], "k--", linewidth=1, label="perfect calibration")
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence (max probability)", ylabel="accuracy",
           title=f"{title}\nECE = {ece:.4f} ({n_bins} bins, n = {int(counts.sum())})")
    ax.legend(loc="upper left")
    fig.tight_layout()
    return save_figure(fig, path)
