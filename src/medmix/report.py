"""Figures and tables written next to the numbers: training curves, confusion matrices, the results table."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np

from .atomic import atomic_write_text
from .data.tasks import BINARY, MULTI_LABEL, TaskInfo
from .metrics import _new_figure, label_decisions, plot_confusion, plot_reliability, predict_labels, save_figure

# Official MedMNIST v2 benchmark (Yang et al., Scientific Data 2023, Table 3), test ACC / AUC, for the datasets
# medmix can compare against offline. Quoted, not measured.
OFFICIAL_BENCHMARK: dict[str, dict[str, tuple[float, float]]] = {
    "pneumoniamnist": {"ResNet-18 (28)": (0.854, 0.944), "ResNet-18 (224)": (0.864, 0.956),
                       "ResNet-50 (28)": (0.854, 0.948), "ResNet-50 (224)": (0.884, 0.962),
                       "auto-sklearn": (0.855, 0.942), "AutoKeras": (0.878, 0.947),
                       "Google AutoML Vision": (0.946, 0.991)},
    "breastmnist": {"ResNet-18 (28)": (0.863, 0.901), "ResNet-18 (224)": (0.833, 0.891),
                    "ResNet-50 (28)": (0.812, 0.857), "ResNet-50 (224)": (0.842, 0.866),
                    "auto-sklearn": (0.803, 0.836), "AutoKeras": (0.831, 0.871),
                    "Google AutoML Vision": (0.861, 0.919)},
    "retinamnist": {"ResNet-18 (28)": (0.524, 0.717), "ResNet-18 (224)": (0.493, 0.710),
                    "ResNet-50 (28)": (0.528, 0.726), "ResNet-50 (224)": (0.511, 0.716),
                    "auto-sklearn": (0.515, 0.690), "AutoKeras": (0.503, 0.719),
                    "Google AutoML Vision": (0.531, 0.750)},
}


def _epochs(meta: dict) -> str:
    """"best epoch 31 of 40 run (chosen on val)"; older checkpoints do not record the epochs run."""
    best, ran = meta.get("epoch", "?"), meta.get("epochs_run")
    return f"best epoch {best} of {ran} run (chosen on val)" if ran else f"best epoch {best} (chosen on val)"


def plot_curves(history: list[dict], path: Path, best_epoch: int | None = None,
                losses: Sequence[tuple[str, str]] = (("train_loss", "train loss"), ("val_loss", "val loss")),
                scores: Sequence[tuple[str, str]] = (("val_acc", "val ACC"), ("val_auc", "val AUC"))) -> Path:
    """Loss curves (left) and validation scores (right) per epoch: ``(history key, label)`` pairs; a label starting
    with ``"*"`` is drawn as the headline (thick black), ``":"`` dotted black."""
    fig = _new_figure(10, 4)
    ep = [r["epoch"] for r in history]
    ax1, ax2 = fig.add_subplot(121), fig.add_subplot(122)
    for ax, series in ((ax1, losses), (ax2, scores)):
        for key, label in series:
            style = {"*": dict(color="k", lw=2), ":": dict(color="k", ls=":")}.get(label[0], {})
            ax.plot(ep, [r[key] for r in history], label=label.lstrip("*:"), **style)
        ax.set_xlabel("epoch"), ax.legend(fontsize=7 if len(series) > 3 else None), ax.grid(alpha=0.3)
        if best_epoch:
            ax.axvline(best_epoch, color="k", ls="--", lw=0.8)
    ax1.set_ylabel("loss")
    fig.tight_layout()
    return save_figure(fig, path)


def write_confusion(metrics: dict, info: TaskInfo, path: Path, title: str) -> Path | None:
    """Confusion matrix PNG for single-label tasks (multi-label confusion is per label and stays in the JSON)."""
    return None if info.task == MULTI_LABEL else plot_confusion(metrics["confusion"], info.class_names, path, title)


def format_metrics(m: dict, title: str = "") -> str:
    """A readable block: headline numbers, per-class table and the confusion matrix."""
    lines = [title] if title else []
    head = f"n={m['n']}  ACC {m['acc']:.4f}  AUC {m['auc']:.4f}  precision {m['precision']:.4f}  " \
           f"recall {m['recall']:.4f}  F1 {m['f1']:.4f}"
    if "mae" in m:
        head += f"  MAE {m['mae']:.4f}  QWK {m['qwk']:.4f}"
    lines.append(head)
    w = max(8, max(len(c["name"]) for c in m["per_class"]))
    lines.append(f"{'class':<{w}}  precision  recall     f1  support")
    for c in m["per_class"]:
        lines.append(f"{c['name']:<{w}}  {c['precision']:9.4f}  {c['recall']:6.4f}  {c['f1']:5.4f}  {c['support']:7d}")
    if m["task"] != MULTI_LABEL:
        lines.append("confusion (rows true, columns predicted):")
        for name, row in zip((c["name"] for c in m["per_class"]), m["confusion"]):
            lines.append(f"  {name:<{w}} " + " ".join(f"{v:6d}" for v in row))
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- evaluation report
def write_reliability(probs, labels, info: TaskInfo, path: Path, title: str, n_bins: int = 15) -> Path:
    """Reliability diagram PNG of (calibrated) probabilities (multi-label: every (image, label) decision pooled as a
    two-class prediction)."""
    p, y = (label_decisions(probs, labels) if info.task == MULTI_LABEL else
            (np.asarray(probs, dtype=np.float64), np.asarray(labels).reshape(len(probs), -1)[:, 0]))
    return plot_reliability(p, y, path, n_bins, title)


def write_roc(probs, labels, info: TaskInfo, path: Path, title: str) -> Path:
    """One-vs-rest ROC curve per class (binary: the positive class; multi-label: per label), AUC in the legend."""
    from sklearn.metrics import roc_auc_score, roc_curve

    p, y, names = np.asarray(probs, dtype=np.float64), np.asarray(labels), info.class_names
    if info.task == BINARY:
        curves = [(names[-1], (y.reshape(-1) == 1).astype(int), p[:, -1])]
    elif info.task == MULTI_LABEL:
        curves = [(name, y[:, k].astype(int), p[:, k]) for k, name in enumerate(names)]
    else:
        curves = [(name, (y.reshape(-1) == k).astype(int), p[:, k]) for k, name in enumerate(names)]
    fig = _new_figure(6.0, 5.5)
    ax = fig.add_subplot(111)
    for name, yk, sk in curves:
        if yk.min() == yk.max():  # a class absent from (or alone in) the split has no ROC curve
            ax.plot([], [], label=f"{name} (undefined: one class only)")
            continue
        fpr, tpr, _ = roc_curve(yk, sk)
        ax.plot(fpr, tpr, lw=1.4, label=f"{name} (AUC {roc_auc_score(yk, sk):.3f})")
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="false positive rate", ylabel="true positive rate", title=title)
    ax.legend(loc="lower right", fontsize=7 if len(curves) > 6 else 9)
    fig.tight_layout()
    return save_figure(fig, path)


def confident_mistakes(probs, labels, info: TaskInfo, threshold=0.5, k: int = 16) -> list[dict]:
    """The ``k`` wrong predictions made with the highest confidence: ``index``, ``true``, ``pred`` (names; comma
    lists for multi-label) and ``confidence`` (probability of the predicted class; multi-label: of the most
    confident wrong label decision)."""
    p, y, names = np.asarray(probs, dtype=np.float64), np.asarray(labels), info.class_names
    pred = predict_labels(p, info.task, threshold)
    rows = []
    if info.task == MULTI_LABEL:
        y = y.astype(int)
        conf = np.where(pred == 1, p, 1.0 - p)  # confidence in each label decision
        wrong = pred != y
        for i in np.flatnonzero(wrong.any(1)):
            rows.append({"index": int(i), "confidence": float(conf[i][wrong[i]].max()),
                         "true": ", ".join(n for n, v in zip(names, y[i]) if v) or "(none)",
                         "pred": ", ".join(n for n, v in zip(names, pred[i]) if v) or "(none)"})
    else:
        yy = y.reshape(-1).astype(int)
        for i in np.flatnonzero(pred != yy):
            rows.append({"index": int(i), "confidence": float(p[i, pred[i]] if p.ndim == 2 else p[i]),
                         "true": names[yy[i]], "pred": names[pred[i]]})
    rows.sort(key=lambda r: -r["confidence"])
    return rows[:k]


def write_mistakes(images, mistakes: list[dict], path: Path, title: str) -> Path:
    """A grid of images (uint8 ``(N, C, H, W)``) with true/predicted label and confidence for each mistake."""
    n = len(mistakes)
    cols = min(4, max(1, n))
    rows = max(1, -(-n // cols))
    fig = _new_figure(2.4 * cols, 2.7 * rows + 0.5)
    if n == 0:
        ax = fig.add_subplot(111)
        ax.axis("off")
        ax.text(0.5, 0.5, "no mistakes on this split", ha="center", va="center")
    for j, m in enumerate(mistakes):
        ax = fig.add_subplot(rows, cols, j + 1)
        img = np.asarray(images[m["index"]])
        img = img[0] if img.shape[0] == 1 else np.moveaxis(img, 0, -1)
        ax.imshow(img, cmap="gray" if img.ndim == 2 else None, vmin=0, vmax=255, interpolation="nearest")
        ax.set_title(f"#{m['index']} true: {m['true'][:22]}\npred: {m['pred'][:22]} ({m['confidence']:.0%})",
                     fontsize=7)
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)


def _f(v, digits: int = 4) -> str:
    try:
        return "n/a" if v is None or not math.isfinite(float(v)) else f"{float(v):.{digits}f}"
    except (TypeError, ValueError):
        return str(v)


def write_evaluation_report(out: Path, m: dict, probs, labels, images, info: TaskInfo, meta: dict) -> Path:
    """``out/report.md``: headline metrics (official ACC/AUC semantics), calibration, per-class
    precision/recall/F1/AUC, the official MedMNIST benchmark rows beside ours, and the figures
    ``confusion_<split>.png``, ``roc_<split>.png``, ``reliability_<split>.png``, ``mistakes_<split>.png``."""
    from .calibrate import stored_temperature

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    split, dataset, model = m["split"], m["dataset"], m["model"]
    title = f"{dataset} {split} - {model}"
    conf = write_confusion(m, info, out / f"confusion_{split}.png", title)
    figs = {} if conf is None else {"Confusion matrix": conf}
    figs["ROC curves (one vs rest)"] = write_roc(probs, labels, info, out / f"roc_{split}.png", title)
    figs["Reliability diagram (calibrated probabilities)"] = write_reliability(
        probs, labels, info, out / f"reliability_{split}.png", title)
    mistakes = confident_mistakes(probs, labels, info, meta.get("threshold", 0.5))
    figs["Most confident mistakes"] = write_mistakes(images, mistakes, out / f"mistakes_{split}.png",
                                                     f"{title}: most confident mistakes")

    t = stored_temperature(meta)
    t_txt = f"{t:.4f}" if isinstance(t, float) else "per label [" + ", ".join(f"{v:.3f}" for v in t) + "]"
    lines = [f"# Evaluation report: {model} on {dataset} ({split} split)", "", f"Checkpoint: `{m['checkpoint']}`  ",
             (f"Task: {m['task']}, {m['n']} images, {len(info.class_names)} classes; {_epochs(meta)}; "
              f"evaluated in {m.get('float_precision', '?')}; medmix {meta.get('medmix_version', '?')}"), "",
             "## Headline", "", "| metric | value |", "|---|---|",
             f"| ACC (official MedMNIST semantics) | {_f(m['acc'])} |",
             f"| AUC (official MedMNIST semantics) | {_f(m['auc'])} |",
             f"| precision / recall / F1 (macro) | {_f(m['precision'])} / {_f(m['recall'])} / {_f(m['f1'])} |"]
    if "mae" in m:
        lines.append(f"| MAE / QWK (ordinal, argmax grade) | {_f(m['mae'])} / {_f(m['qwk'])} |")
    lines += [(f"| ECE ({m.get('n_bins', 15)} bins), raw -> calibrated | {_f(m.get('ece_before'))} -> "
               f"{_f(m.get('ece_after'))} |"),
              f"| NLL, raw -> calibrated | {_f(m.get('nll_before'))} -> {_f(m.get('nll_after'))} |",
              f"| temperature | {t_txt} |"]
    if "ood_flagged" in m:
        lines.append(f"| flagged out of distribution ({m['ood_method']}) | {m['ood_flagged']:.1%} |")
    lines += ["", ("ACC/AUC follow `medmnist.Evaluator`: binary ACC thresholds the positive-class probability, "
                   "multi-class/ordinal AUC is the mean one-vs-rest AUC. Probabilities are divided by the calibration "
                   "temperature, which changes neither ACC nor AUC."), "",
              "## Per class", "", "| class | precision | recall | F1 | support | AUC (one vs rest) |",
              "|---|---|---|---|---|---|"]
    lines += [f"| {c['name']} | {_f(c['precision'])} | {_f(c['recall'])} | {_f(c['f1'])} | {c['support']} | "
              f"{_f(c['auc'])} |" for c in m["per_class"]]
    lines += ["", "## Official MedMNIST v2 benchmark", ""]
    rows = OFFICIAL_BENCHMARK.get(str(dataset).lower())
    if rows:
        lines += ["Test ACC/AUC from Yang et al., *MedMNIST v2*, Scientific Data 2023, Table 3 (quoted, not "
                  "measured)" + ("." if split == "test" else f"; ours is on the {split} split, theirs on test."), "",
                  "| method | ACC | AUC |", "|---|---|---|"]
        lines += [f"| {name} | {acc:.3f} | {auc:.3f} |" for name, (acc, auc) in rows.items()]
        lines.append(f"| **medmix {model} (this checkpoint, {split})** | **{_f(m['acc'], 3)}** | "
                     f"**{_f(m['auc'], 3)}** |")
    else:
        lines.append(f"No official benchmark rows are stored for {dataset!r} (medmix quotes them for "
                     f"{', '.join(sorted(OFFICIAL_BENCHMARK))}).")
    lines += ["", "## Figures", ""]
    for caption, png in figs.items():
        lines += [f"### {caption}", "", f"![{caption}]({png.name})", ""]
    if mistakes:
        lines += ["Most confident mistakes (index in the split):", "", "| # | true | predicted | confidence |",
                  "|---|---|---|---|"]
        lines += [f"| {r['index']} | {r['true']} | {r['pred']} | {r['confidence']:.1%} |" for r in mistakes]
        lines.append("")
    path = out / "report.md"
    atomic_write_text(path, "\n".join(lines).rstrip() + "\n")
    return path
