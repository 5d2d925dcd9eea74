"""Evaluate a checkpoint (or run directory) on a split of the data it was trained on."""
from __future__ import annotations

import os

import torch

from .checkpoint import load_training_data  # noqa: F401  (medmix.evaluation.load_training_data, as before)
from .errors import ConfigError
from .inference import resolve_precision
from .losses import build_loss, default_loss_name
from .paths import ensure_dir


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
    import numpy as np

    from .calibrate import N_BINS, calibration_metrics, stored_temperature
    from .inference import extract, predict_logits, probabilities
    from .metrics import compute_metrics
    from .ood import Detector

    if split not in ("train", "val", "test"):
        raise ConfigError(f"unknown split {split!r}; use train, val or test")
    from .paths import check_writable_dir

    for flag, d in (("--out", out), ("--report", report)):
        if d is not None:
            check_writable_dir(d, flag)
    from .generalist import evaluate_generalist
    from .run import Run

    run = Run.of(ckpt_or_run)
    path, meta = run.path, run.meta

    if precision == "run":  # what the run was evaluated in at the end of training, so the figures match metrics.json
        precision = meta.get("precision") or "auto"
    precision = resolve_precision(precision)
    if run.is_generalist:
        return evaluate_generalist(run, data_dir=data_dir, split=split, out=out, batch_size=batch_size,
                                   precision=precision, report=report)
    model = run.build_model()
    info = run.task
    out_dir = ensure_dir(out, "--out") if out is not None else None
    report_dir = ensure_dir(report, "--report") if report is not None else None
    bundle = run.training_data(data_dir)
    tf = run.transform()
    loss = build_loss(default_loss_name(info.task), info.task, info.num_classes)
    data = bundle.splits[split]
    detector = Detector.from_checkpoint(meta, run.extras)
    features = None
    if detector is not None and detector.needs_features and precision == "fp32":
        logits, features = extract(model, data.images, tf, batch_size)
    else:
        logits = predict_logits(model, data.images, tf, batch_size, precision)
        if detector is not None and detector.needs_features:  # the OOD statistics were fitted on fp32 features
            _, features = extract(model, data.images, tf, batch_size)
    temperature = stored_temperature(meta)
    probs = probabilities(logits, info.task, temperature).numpy()
    m = compute_metrics(data.labels.numpy(), probs, info.task, info.class_names, threshold=meta.get("threshold", 0.5))
    with torch.no_grad():
        m["loss"] = float(loss(logits, data.labels))
    before = calibration_metrics(logits, data.labels, info.task, 1.0)
    after = calibration_metrics(logits, data.labels, info.task, temperature)
    m.update(temperature=temperature, n_bins=N_BINS, ece_before=before["ece"], ece_after=after["ece"],
             nll_before=before["nll"], nll_after=after["nll"], ece=after["ece"], nll=after["nll"])
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
