"""Calibrated confidence: temperature scaling fitted on the validation split and stored in the checkpoint.

Small CNNs are over-confident: their softmax maximum is higher than their accuracy. Temperature scaling (Guo et
al. 2017) divides the logits by one number ``T`` chosen to minimise the negative log-likelihood of the validation
labels; it never changes the predicted class (the argmax), only how sure the model claims to be. Multi-label
tasks get one temperature per label, each fitted on that label's binary cross-entropy.

>>> from medmix.calibrate import calibrate
>>> r = calibrate("runs/quickstart")                  # a run directory or a checkpoint file
>>> r["temperature"], r["nll_before"], r["nll_after"], r["ece_before"], r["ece_after"]

The temperature is written into the checkpoint's metadata (``meta["temperature"]``, a number, or a list with one
value per label for multi-label tasks) with the weights untouched; predictions made from the checkpoint afterwards
divide their logits by it. Reliability diagrams before and after are written beside the checkpoint.
"""
from __future__ import annotations

import math
import os
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .data.tasks import MULTI_LABEL, check_task
from .errors import ConfigError

__all__ = ["T_MAX", "T_MIN", "calibrate", "calibration_metrics", "fit_calibration", "fit_temperature",
           "stored_temperature"]

T_MIN, T_MAX = 0.01, 100.0  # search bounds for a temperature
N_BINS = 15


def _as_logits(logits: Any) -> torch.Tensor:
    z = torch.as_tensor(np.asarray(logits) if not isinstance(logits, torch.Tensor) else logits).double()
    if z.ndim != 2 or z.shape[0] == 0 or z.shape[1] == 0:
        raise ConfigError(f"logits must have shape (N, C) with N, C >= 1; got {tuple(z.shape)}")
    if not torch.isfinite(z).all():
        raise ConfigError("logits contain NaN or infinite values")
    return z


def _as_targets(labels: Any, task: str, n: int, c: int) -> torch.Tensor:
    y = torch.as_tensor(np.asarray(labels) if not isinstance(labels, torch.Tensor) else labels)
    if task == MULTI_LABEL:
        if tuple(y.shape) != (n, c):
            raise ConfigError(f"multi-label labels must have shape ({n}, {c}); got {tuple(y.shape)}")
        return y.double()
    y = y.reshape(-1) if y.ndim == 2 and y.shape[1] == 1 else y
    if y.ndim != 1 or len(y) != n:
        raise ConfigError(f"labels must have shape ({n},) or ({n}, 1); got {tuple(y.shape)}")
    y = y.long()
    if len(y) and (int(y.min()) < 0 or int(y.max()) >= c):
        raise ConfigError(f"labels must lie in 0..{c - 1}; found {int(y.min())}..{int(y.max())}")
    return y


def _fit_1d(loss) -> float:
    """argmin over ``T`` in [T_MIN, T_MAX] of a loss that is unimodal in log T (cross-entropy is convex in 1/T)."""
    from scipy.optimize import minimize_scalar

    res = minimize_scalar(lambda u: float(loss(math.exp(u))), bounds=(math.log(T_MIN), math.log(T_MAX)),
                          method="bounded", options={"xatol": 1e-6})
    t = float(math.exp(res.x))
    return t if loss(t) <= loss(1.0) else 1.0  # never worse than no scaling


def fit_temperature(logits: Any, labels: Any, task: str) -> float | list[float]:
    """The temperature minimising the NLL of ``labels`` under ``logits / T``.

    Single-label tasks (multi-class, binary, ordinal): one ``T`` for the softmax cross-entropy. Multi-label: one
    ``T`` per label for that label's sigmoid binary cross-entropy. ``logits`` ``(N, C)``; ``labels`` ``(N,)``
    class indices, or ``(N, L)`` 0/1 for multi-label. Temperatures lie in [0.01, 100].
    """
    check_task(task)
    z = _as_logits(logits)
    y = _as_targets(labels, task, *z.shape)
    if task == MULTI_LABEL:
        return [_fit_1d(lambda t, j=j: F.binary_cross_entropy_with_logits(z[:, j] / t, y[:, j]).item())
                for j in range(z.shape[1])]
    return _fit_1d(lambda t: F.cross_entropy(z / t, y).item())


def _calibration_view(logits: Any, labels: Any, task: str, temperature: float | Sequence[float]
                      ) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities of ``logits / temperature`` and labels, as :mod:`medmix.metrics` scores them; multi-label
    probabilities ``(N, L)`` become every label decision as a two-class problem ``(N * L, 2)``."""
    from .inference import probabilities
    from .metrics import label_decisions

    probs = probabilities(logits, task, temperature).double().numpy()
    return label_decisions(probs, labels) if task == MULTI_LABEL else (probs, np.asarray(labels))


def calibration_metrics(logits: Any, labels: Any, task: str, temperature: float | Sequence[float] = 1.0,
                        n_bins: int = N_BINS) -> dict:
    """``nll`` and top-label ``ece`` (``n_bins`` equal-width bins) of ``logits / temperature``. Multi-label tasks
    count every (image, label) decision as one binary prediction: ``nll`` is then the mean binary cross-entropy."""
    from .metrics import expected_calibration_error, nll

    check_task(task)
    z = _as_logits(logits)
    probs, lab = _calibration_view(z, _as_targets(labels, task, *z.shape), task, temperature)
    return {"nll": nll(probs, lab), "ece": expected_calibration_error(probs, lab, n_bins)}


def fit_calibration(logits: Any, labels: Any, task: str, split: str = "val") -> tuple[float | list[float], dict]:
    """``(temperature, block)``: the fitted temperature and the ``meta["calibration"]`` record of the fit (method,
    split, n, n_bins, ``nll``/``ece`` before (``T = 1``) and after)."""
    temperature = fit_temperature(logits, labels, task)
    before = calibration_metrics(logits, labels, task, 1.0)
    after = calibration_metrics(logits, labels, task, temperature)
    return temperature, {"method": "temperature" if task != MULTI_LABEL else "temperature_per_label", "split": split,
                         "n": len(logits), "n_bins": N_BINS, "nll_before": before["nll"], "nll_after": after["nll"],
                         "ece_before": before["ece"], "ece_after": after["ece"]}


def stored_temperature(meta: dict) -> float | list[float]:
    """The calibration temperature of checkpoint metadata: a number, or one per label (multi-label)."""
    t = meta.get("temperature", 1.0)
    if isinstance(t, (list, tuple)):
        return [float(v) for v in t]
    return 1.0 if t is None else float(t)


def calibrate(run_or_ckpt: str | os.PathLike, data_dir: str | os.PathLike | None = None, *,
              batch_size: int = 512) -> dict:
    """Fit the temperature on the validation split of the data the checkpoint was trained on and store it.

    Returns ``checkpoint``, ``dataset``, ``split`` ("val"), ``n``, ``task``, ``temperature`` (new),
    ``previous_temperature``, ``nll_before``/``nll_after`` and ``ece_before``/``ece_after`` (before = raw logits,
    ``T = 1``; 15 bins), ``n_bins`` and the two reliability-diagram PNGs ``reliability_before`` /
    ``reliability_after`` (beside the checkpoint). The checkpoint is rewritten atomically with the same weights.
    """
    from .checkpoint import save_checkpoint
    from .inference import predict_logits
    from .metrics import plot_reliability
    from .paths import check_writable_file
    from .run import Run
    from .small_data import MIN_VAL_FOR_TEMPERATURE

    run = Run.of(run_or_ckpt)
    path, meta = run.path, run.meta
    check_writable_file(path, "checkpoint")  # rewritten in place at the end, with the reliability PNGs beside it
    run.require_single("medmix.calibrate.calibrate (for a generalist: medmix.generalist.calibrate_generalist, "
                       "which `medmix calibrate` calls)")
    model, task = run.build_model(), run.task.task
    bundle = run.training_data(data_dir)
    val = bundle.splits["val"]
    if len(val) < MIN_VAL_FOR_TEMPERATURE:
        raise ConfigError(f"the validation split has {len(val)} images (fewer than {MIN_VAL_FOR_TEMPERATURE}): too "
                          f"few to fit a temperature; {path} is unchanged")
    logits = predict_logits(model, val.images, run.transform(), batch_size)
    temperature, block = fit_calibration(logits, val.labels, task)

    prefix = "" if path.name == "best_model.pth" else f"{path.stem}_"
    pngs = {}
    for key, t in (("before", 1.0), ("after", temperature)):
        shown = f"T = {t:.3g}" if isinstance(t, float) else "per-label T"
        title = f"{bundle.name} val, {'calibrated' if key == 'after' else 'raw'} ({shown})"
        png = path.with_name(f"{prefix}reliability_val_{key}.png")  # written atomically (metrics.save_figure)
        pngs[key] = plot_reliability(*_calibration_view(logits, val.labels, task, t), png, N_BINS, title)

    previous = stored_temperature(meta)
    meta["temperature"], meta["calibration"] = temperature, block
    save_checkpoint(path, run.state, meta, run.train_state, run.extras)  # keeps the OOD statistics
    return {"checkpoint": str(path), "dataset": bundle.name, "model": meta["model"], "split": "val",
            "n": int(len(val)), "task": task, "temperature": temperature, "previous_temperature": previous,
            **{k: block[k] for k in ("nll_before", "nll_after", "ece_before", "ece_after", "n_bins")},
            **{f"reliability_{k}": str(v) for k, v in pngs.items()}}
