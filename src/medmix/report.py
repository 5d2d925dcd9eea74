"""Figures and tables written next to the numbers: training curves, confusion matrices, the results table."""
from __future__ import annotations

from pathlib import Path

from .data.tasks import MULTI_LABEL, TaskInfo
from .metrics import plot_confusion

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


def plot_curves(history: list[dict], path: Path, best_epoch: int | None = None) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4), dpi=110)
    FigureCanvasAgg(fig)
    ep = [r["epoch"] for r in history]
    ax1, ax2 = fig.add_subplot(121), fig.add_subplot(122)
    ax1.plot(ep, [r["train_loss"] for r in history], label="train loss")
    ax1.plot(ep, [r["val_loss"] for r in history], label="val loss")
    ax1.set_xlabel("epoch"), ax1.set_ylabel("loss"), ax1.legend(), ax1.grid(alpha=0.3)
    ax2.plot(ep, [r["val_acc"] for r in history], label="val ACC")
    ax2.plot(ep, [r["val_auc"] for r in history], label="val AUC")
    ax2.set_xlabel("epoch"), ax2.legend(), ax2.grid(alpha=0.3)
    if best_epoch:
        for ax in (ax1, ax2):
            ax.axvline(best_epoch, color="k", ls="--", lw=0.8)
    fig.tight_layout()
    fig.savefig(path, format="png")
    return path


def write_confusion(metrics: dict, info: TaskInfo, path: Path, title: str) -> Path | None:
    """Confusion matrix PNG for single-label tasks (multi-label confusion is per label and stays in the JSON)."""
    if info.task == MULTI_LABEL:
        return None
    return plot_confusion(metrics["confusion"], info.class_names, path, title)


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
