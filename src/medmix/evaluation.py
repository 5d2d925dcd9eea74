"""Evaluate a checkpoint (or run directory) on a split of the data it was trained on: one dataset, or a generalist
(each head on its own dataset, the router over all of them, and end to end)."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn as nn

from .atomic import atomic_write_text
from .checkpoint import GENERALIST, load_training_data
from .data import BatchTransform, Split
from .data.mixture import to_common_format
from .data.tasks import BINARY, MULTI_LABEL, TaskInfo
from .errors import ConfigError
from .inference import extract, predict_logits, probabilities, resolve_precision
from .losses import build_loss, default_loss_name
from .metrics import compute_metrics, predict_labels
from .paths import check_writable_dir, ensure_dir
from .run import Run

KIND = GENERALIST


def _check_split(split: str) -> None:
    if split not in ("train", "val", "test"):
        raise ConfigError(f"unknown split {split!r}; use train, val or test")


def score_logits(logits: torch.Tensor, labels: torch.Tensor, task: str, class_names, temperature: Any = 1.0,
                 threshold: Any = 0.5, loss_fn=None) -> tuple[dict, np.ndarray]:
    """:func:`medmix.metrics.compute_metrics` of ``logits`` (probabilities at ``temperature``), with ``loss`` when
    ``loss_fn`` is given; and the probabilities."""
    probs = probabilities(logits, task, temperature).numpy()
    m = compute_metrics(labels.numpy(), probs, task, class_names, threshold=threshold)
    if loss_fn is not None:
        with torch.no_grad():
            m["loss"] = float(loss_fn(logits, labels))
    return m, probs


def format_temperature(t: Any, digits: int = 4) -> str:
    """A temperature for printing: the number, or "per label" (multi-label: one per label)."""
    return f"{t:.{digits}f}" if isinstance(t, float) else "per label"


def calibration_fields(logits: torch.Tensor, labels: torch.Tensor, task: str, temperature: Any) -> dict:
    """ECE and NLL before (T = 1) and after ``temperature``."""
    from .calibrate import N_BINS, calibration_metrics

    before = calibration_metrics(logits, labels, task, 1.0)
    after = calibration_metrics(logits, labels, task, temperature)
    return dict(n_bins=N_BINS, ece_before=before["ece"], ece_after=after["ece"], nll_before=before["nll"],
                nll_after=after["nll"])


def evaluate(ckpt_or_run: str | os.PathLike, *, data_dir: str | os.PathLike | None = None, split: str = "test",
             out: str | os.PathLike | None = None, report: str | os.PathLike | None = None, batch_size: int = 512,
             precision: str = "run") -> dict:
    """Metrics with the official MedMNIST ACC/AUC semantics plus macro P/R/F1, the confusion matrix and calibration.

    Probabilities use the checkpoint's calibration temperature. Calibration is reported before (``T = 1``) and
    after (the stored ``T``): ``ece_before``/``ece_after`` (top-label, 15 bins; multi-label: every label decision
    as a binary prediction), ``nll_before``/``nll_after``, and ``ece``/``nll`` (= after, what predictions show),
    ``temperature``. Checkpoints with OOD statistics add ``ood_flagged`` (share of the split flagged as out of
    distribution) and ``ood_method``.

    ``out`` (a directory) receives ``confusion_<split>.png`` and ``reliability_<split>.png``. ``report`` (a
    directory) receives ``report.md`` with the official MedMNIST benchmark rows beside ours and its figures (see
    :func:`medmix.report.write_evaluation_report`). Data without official splits use the ``split.json`` saved
    beside the checkpoint, so the same images are evaluated as during training.

    A generalist checkpoint (:mod:`medmix.generalist`) returns :func:`medmix.generalist.evaluate_generalist`'s
    per-dataset, routing and end-to-end metrics instead.
    """
    from .calibrate import stored_temperature
    from .ood import Detector

    _check_split(split)
    for flag, d in (("--out", out), ("--report", report)):
        if d is not None:
            check_writable_dir(d, flag)
    run = Run.of(ckpt_or_run)
    path, meta = run.path, run.meta
    if precision == "run":  # what the run was evaluated in at the end of training, so the figures match metrics.json
        precision = meta.get("precision") or "auto"
    precision = resolve_precision(precision)
    if run.is_generalist:
        return evaluate_generalist(run, data_dir=data_dir, split=split, out=out, batch_size=batch_size,
                                   precision=precision, report=report)
    model, info = run.build_model(), run.task
    out_dir = ensure_dir(out, "--out") if out is not None else None
    report_dir = ensure_dir(report, "--report") if report is not None else None
    bundle, tf = run.training_data(data_dir), run.transform()
    loss = build_loss(default_loss_name(info.task), info.task, info.num_classes)
    data = bundle.splits[split]
    detector = Detector.from_checkpoint(meta, run.extras)
    needs_features = detector is not None and detector.needs_features
    if needs_features and precision == "fp32":
        logits, features = extract(model, data.images, tf, batch_size)
    else:  # the OOD statistics were fitted on fp32 features
        logits = predict_logits(model, data.images, tf, batch_size, precision)
        features = extract(model, data.images, tf, batch_size)[1] if needs_features else None
    temperature = stored_temperature(meta)
    m, probs = score_logits(logits, data.labels, info.task, info.class_names, temperature, meta.get("threshold", 0.5),
                            loss)
    cal = calibration_fields(logits, data.labels, info.task, temperature)
    m.update(temperature=temperature, **cal, ece=cal["ece_after"], nll=cal["nll_after"])
    if detector is not None:
        flags = detector.flags(detector.scores(logits, features), data.images)
        m.update(ood_method=detector.method, ood_flagged=float(np.mean(~flags)))
    m.update(split=split, dataset=bundle.name, model=meta["model"], checkpoint=str(path),
             float_precision=precision)
    title = f"{bundle.name} {split} - {meta['model']}"
    if out_dir is not None:
        from .report import write_confusion, write_reliability

        png = write_confusion(m, info, out_dir / f"confusion_{split}.png", title)
        m["confusion_png"] = str(png) if png else None
        m["reliability_png"] = str(write_reliability(probs, data.labels.numpy(), info, out_dir /
                                                     f"reliability_{split}.png", title))
    if report_dir is not None:
        from .report import write_evaluation_report

        m["report"] = str(write_evaluation_report(report_dir, m, probs, data.labels.numpy(), data.images, info, meta))
    return m


# ----------------------------------------------------------------------------------------------- generalists
@dataclass
class _Member:
    """One dataset of the mixture, in the common format."""
    name: str
    info: TaskInfo
    splits: dict[str, Split]
    source: dict
    data_size: int
    augment: str
    split_indices: dict | None


def _members_of(meta: dict, run_dir: Path, data_dir: str | os.PathLike | None) -> list[_Member]:
    """The checkpoint's datasets, loaded with their training splits and brought to the common format."""
    g = meta["generalist"]
    out = []
    for d in g["datasets"]:
        pseudo = {"dataset": d["name"], "data_source": d["data_source"], "data_size": d["data_size"],
                  "seed": meta.get("seed", 0)}
        b = load_training_data(pseudo, run_dir, data_dir, split_name=f"split_{d['name']}.json")
        info = TaskInfo.from_dict(d["task"])
        if b.info.class_names != info.class_names or b.info.task != info.task:
            raise ConfigError(f"the data found for {d['name']!r} do not match the checkpoint's classes/task")
        splits = {k: Split(to_common_format(s.images, g["img_size"], g["channels"]), s.labels)
                  for k, s in b.splits.items()}
        out.append(_Member(d["name"], info, splits, b.source, b.image_size, d.get("augment", "none"),
                           b.split_indices))
    return out


def _image_correct(labels: np.ndarray, probs: np.ndarray, task: str, threshold: Any = 0.5) -> np.ndarray:
    """Per image, the share of its label decisions that are right (0/1 for single-label tasks; the fraction of
    correct labels for multi-label tasks), with the official decision rules."""
    pred = predict_labels(probs, task, threshold)
    if task == MULTI_LABEL:
        return (pred == (labels > 0.5)).mean(1)
    return (pred.reshape(-1) == labels.reshape(-1)).astype(np.float64)


def evaluate_heads(model: nn.Module, members: Sequence[Any], split: str, transform: BatchTransform, meta: dict, *,
                   batch_size: int = 512, precision: str = "fp32", temperatures: bool = True,
                   with_loss: bool = False) -> dict:
    """Score a generalist on one split of each dataset.

    ``members``: objects with ``name``, ``info`` and ``splits`` (already in the common format). Returns
    ``{"datasets": {name: metrics of its own head on its own images (official ACC/AUC, P/R/F1, confusion, ...)
    plus "routing_acc" and "end_to_end_acc"}, "routing_acc": over all images, "routing_confusion": rows = true
    dataset, "end_to_end_acc": over all images, "end_to_end_acc_mean": mean over datasets, "score": mean of the
    monitored metrics, "n"}``. End-to-end: the router picks the head; an image routed to the wrong dataset counts
    as wrong.
    """
    layout = {d["name"]: d for d in meta["generalist"]["datasets"]}
    names, n_d = list(layout), len(layout)
    out: dict[str, Any] = {"datasets": {}}
    confusion = np.zeros((n_d, n_d), dtype=np.int64)
    correct_total, n_total, scores = 0.0, 0, []
    for mem in members:
        d, k, data = layout[mem.name], names.index(mem.name), mem.splits[split]
        logits, _ = extract(model, data.images, transform, batch_size, precision=precision, features=False)
        a, b = d["columns"]
        head = logits[:, a:b]
        t = (d.get("temperature", 1.0) if temperatures else 1.0) or 1.0
        task = mem.info.task
        loss = build_loss(default_loss_name(task), task, mem.info.num_classes) if with_loss else None
        m, probs = score_logits(head, data.labels, task, mem.info.class_names, t, d.get("threshold", 0.5), loss)
        routed = logits[:, :n_d].argmax(1).numpy()
        confusion[k] += np.bincount(routed, minlength=n_d)
        ok = routed == k
        e2e = _image_correct(data.labels.numpy(), probs, task, d.get("threshold", 0.5)) * ok
        monitor = "auc" if task in (BINARY, MULTI_LABEL) else "acc"
        v = m[monitor] if np.isfinite(m[monitor]) else m.get("auc_defined_mean", float("nan"))
        m.update(routing_acc=float(ok.mean()), end_to_end_acc=float(e2e.mean()), monitor=monitor, score=float(v))
        scores.append(float(v) if np.isfinite(v) else 0.0)
        out["datasets"][mem.name] = m
        correct_total += float(e2e.sum())
        n_total += len(data)
    out.update(routing_confusion=confusion.tolist(), routing_acc=float(np.trace(confusion) / max(1, confusion.sum())),
               end_to_end_acc=correct_total / max(1, n_total),
               end_to_end_acc_mean=float(np.mean([v["end_to_end_acc"] for v in out["datasets"].values()])),
               score=float(np.mean(scores)) if scores else float("nan"), n=n_total, dataset_names=names)
    if with_loss:
        out["loss"] = float(np.mean([out["datasets"][n]["loss"] for n in out["datasets"]]))
    return out


def summarize(m: dict) -> dict:
    """The headline numbers of :func:`evaluate_heads` (per dataset ACC/AUC/routing/end-to-end)."""
    keep = ("acc", "auc", "f1", "n", "routing_acc", "end_to_end_acc", "mae", "qwk")
    return {"routing_acc": m["routing_acc"], "end_to_end_acc": m["end_to_end_acc"],
            "end_to_end_acc_mean": m["end_to_end_acc_mean"], "score": m["score"], "n": m["n"],
            "datasets": {k: {x: v[x] for x in keep if x in v} for k, v in m["datasets"].items()}}


def evaluate_generalist(ckpt_or_run: Any, *, data_dir: str | os.PathLike | None = None,
                        split: str = "test", out: str | os.PathLike | None = None, batch_size: int = 512,
                        precision: str = "auto", report: str | os.PathLike | None = None) -> dict:
    """Per dataset, the official ACC/AUC of its own head on its own split; the routing accuracy over all images
    (with its confusion matrix); the end-to-end accuracy when the router picks the head. ``out`` receives
    ``routing_confusion_<split>.png``; ``report`` receives ``report.md`` (routing, and a link per dataset) and one
    ``<dataset>/report.md`` per head, as :func:`medmix.evaluate` writes for a single-dataset run."""
    _check_split(split)
    run = Run.of(ckpt_or_run)
    path, meta = run.path, run.meta
    if not run.is_generalist:
        raise ConfigError(f"{path} is not a generalist checkpoint; use medmix.evaluate")
    model, members, tf = run.build_model(), _members_of(meta, run.dir, data_dir), run.transform()
    precision = resolve_precision(precision)
    m = evaluate_heads(model, members, split, tf, meta, batch_size=batch_size, precision=precision)
    m.update(kind=KIND, split=split, model=meta["model"], checkpoint=str(path), dataset=meta["dataset"])
    if out is not None:
        from .metrics import plot_confusion

        png = ensure_dir(out, "--out") / f"routing_confusion_{split}.png"
        m["routing_confusion_png"] = str(plot_confusion(m["routing_confusion"], m["dataset_names"], png,
                                                        f"modality routing, {split} - {meta['model']}"))
    if report is not None:
        m["report"] = str(_write_generalist_report(ensure_dir(report, "--report"), run, model, members, tf, m, split,
                                                   batch_size, precision))
    return m


def _write_generalist_report(out: Path, run: Any, model: nn.Module, members: Sequence[_Member], tf: BatchTransform,
                             m: dict, split: str, batch_size: int, precision: str) -> Path:
    """One single-dataset report per head (its own images, its own temperature) and an index with the routing."""
    from .report import write_evaluation_report

    meta = run.meta
    layout = {d["name"]: d for d in meta["generalist"]["datasets"]}
    rows = []
    for mem in members:
        d, data = layout[mem.name], mem.splits[split]
        logits, _ = extract(model, data.images, tf, batch_size, precision=precision, features=False)
        a, b = d["columns"]
        head, t = logits[:, a:b], d.get("temperature", 1.0) or 1.0
        md = {**m["datasets"][mem.name], **calibration_fields(head, data.labels, mem.info.task, t)}
        md.update(split=split, dataset=mem.name, model=meta["model"], checkpoint=str(run.path),
                  float_precision=precision)
        head_meta = {**meta, "temperature": t, "threshold": d.get("threshold", 0.5)}
        path = write_evaluation_report(out / mem.name, md, probabilities(head, mem.info.task, t).numpy(),
                                       data.labels.numpy(), data.images, mem.info, head_meta)
        rows.append(f"| [{mem.name}]({path.relative_to(out).as_posix()}) | {md['acc']:.4f} | {md['auc']:.4f} | "
                    f"{md['routing_acc']:.2%} | {md['end_to_end_acc']:.4f} |")
    lines = [f"# Evaluation report: generalist {meta['model']} on {meta['dataset']} ({split} split)", "",
             f"Checkpoint: `{run.path}`; evaluated in {precision}.", "",
             f"Routing accuracy over all {m['n']} images: {m['routing_acc']:.2%}; end-to-end accuracy (the router "
             f"picks the head): {m['end_to_end_acc']:.4f}.", "",
             "| dataset (its own head, its own images) | ACC | AUC | routed to it | end-to-end ACC |",
             "|---|---|---|---|---|", *rows, ""]
    path = out / "report.md"
    atomic_write_text(path, "\n".join(lines))
    return path


def format_generalist(m: dict) -> str:
    """A readable table of :func:`evaluate_generalist`'s result."""
    lines = [f"generalist {m['model']} on the {m['split']} splits ({m['n']} images)",
             f"{'dataset':<16} {'n':>6} {'ACC':>7} {'AUC':>7} {'routing':>8} {'end-to-end':>11}"]
    for name, d in m["datasets"].items():
        lines.append(f"{name:<16} {d['n']:>6} {d['acc']:7.4f} {d['auc']:7.4f} {d['routing_acc']:8.4f} "
                     f"{d['end_to_end_acc']:11.4f}")
    lines.append(f"routing accuracy over all images: {m['routing_acc']:.4f}; end-to-end accuracy: "
                 f"{m['end_to_end_acc']:.4f} (mean over datasets {m['end_to_end_acc_mean']:.4f})")
    names = m["dataset_names"]
    w = max(len(n) for n in names)
    lines.append("routing confusion (rows: true dataset, columns: routed to):")
    lines.append(" " * (w + 2) + " ".join(f"{n[:10]:>10}" for n in names))
    for n, row in zip(names, m["routing_confusion"]):
        lines.append(f"  {n:<{w}}" + " ".join(f"{v:>10}" for v in row))
    return "\n".join(lines)
