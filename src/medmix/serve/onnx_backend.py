"""Classify images with an exported ONNX model and ONNX Runtime only: no torch, no training code.

>>> from medmix.serve.onnx_backend import OnnxPredictor
>>> p = OnnxPredictor("model.onnx")                     # written by `medmix export CKPT --onnx model.onnx`
>>> p.predict(["scan.png"])[0]["label"]

Everything the model needs is read from the ONNX file's metadata (``metadata_props["medmix"]``, a JSON object:
classes, task, normalisation, temperature, sizes; see :mod:`medmix.export`). The graph takes the normalised float
batch ``(B, C, img_size, img_size)`` and returns ``logits``, calibrated ``probabilities`` and, when the checkpoint
has an out-of-distribution detector, ``ood_score`` (predictions then carry ``in_distribution`` and ``ood_score``
exactly like the torch Predictor's).

Images are decoded by :mod:`medmix.imaging`, the torch-free code the torch path uses too (EXIF orientation,
16-bit/float rescaling, alpha on black, grayscale/RGB conversion, BOX resize when shrinking and BICUBIC when
enlarging to the stored data size); the resize and normalisation here reproduce the evaluation path of
:class:`medmix.data.transforms.BatchTransform` (bilinear resize to the model
input size only when it differs from the data size, antialiased when shrinking, as ``F.interpolate`` does; then
``(x - 255 mean) / (255 std)``) with PIL and NumPy. ``tests/test_export.py`` checks it against the torch
:class:`~medmix.predict.Predictor` (probabilities within 1e-4).

This module must not import torch (a test blocks the import and loads it).
"""
from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import CheckpointError, ConfigError, require_extra
from ..imaging import MAX_PIXELS, ImageTooLarge, image_size, load_image_np  # noqa: F401  (re-exported for the app)
from ..task_kinds import MULTI_LABEL, ORDINAL

META_KEY = "medmix"


# ----------------------------------------------------------------------------------------------- resize + normalise
def _linear_weights(n_in: int, n_out: int, antialias: bool) -> np.ndarray:
    """``(n_out, n_in)`` matrix of ``F.interpolate(mode="bilinear", align_corners=False)`` along one axis; with
    ``antialias`` and shrinking, the triangle filter widened by the scale (PyTorch's ``_upsample_bilinear2d_aa``,
    itself PIL's)."""
    scale = n_in / n_out
    w = np.zeros((n_out, n_in), np.float64)
    if antialias and scale > 1.0:
        support, inv = scale, 1.0 / scale
        for i in range(n_out):
            center = scale * (i + 0.5)
            lo = max(int(center - support + 0.5), 0)
            hi = min(int(center + support + 0.5), n_in)
            js = np.arange(lo, hi)
            ws = np.clip(1.0 - np.abs((js - center + 0.5) * inv), 0.0, None)
            if ws.sum() > 0:
                w[i, lo:hi] = ws / ws.sum()
        return w
    for i in range(n_out):
        src = max((i + 0.5) * scale - 0.5, 0.0)
        i0 = min(math.floor(src), n_in - 1)
        i1 = min(i0 + 1, n_in - 1)
        frac = src - i0
        w[i, i0] += 1.0 - frac
        w[i, i1] += frac
    return w


class NumpyTransform:
    """uint8 ``(B, C, H, W)`` -> normalised float32 ``(B, C, S, S)``: the evaluation path of ``BatchTransform``."""

    def __init__(self, img_size: int, mean: Sequence[float], std: Sequence[float]) -> None:
        self.img_size = int(img_size)
        self.mean = np.asarray(mean, np.float32).reshape(1, -1, 1, 1)
        self.std = np.asarray(std, np.float32).reshape(1, -1, 1, 1)
        self._weights: dict[tuple[int, int], np.ndarray] = {}

    def _w(self, n_in: int) -> np.ndarray:
        key = (n_in, self.img_size)
        if key not in self._weights:
            self._weights[key] = _linear_weights(n_in, self.img_size, self.img_size < n_in).astype(np.float32)
        return self._weights[key]

    def __call__(self, x: np.ndarray) -> np.ndarray:
        if x.dtype != np.uint8 or x.ndim != 4:
            raise ConfigError(f"expected a uint8 batch of shape (B, C, H, W), got {x.dtype} {x.shape}")
        xf = x.astype(np.float32)
        h, w = x.shape[-2:]
        if h != self.img_size or w != self.img_size:
            xf = np.einsum("ih,bchw,jw->bcij", self._w(h), xf, self._w(w), optimize=True).astype(np.float32)
        return np.ascontiguousarray((xf - self.mean * 255.0) / (self.std * 255.0), dtype=np.float32)


# ----------------------------------------------------------------------------------------------- describing
def pixel_std_np(images: np.ndarray) -> np.ndarray:
    """Per uint8 image ``(C, H, W)``: the pixel standard deviation within each channel, averaged over channels (as
    :func:`medmix.ood.pixel_std`; 0 for a blank image)."""
    x = np.asarray(images)
    return x.reshape(len(x), x.shape[1], -1).astype(np.float64).std(2).mean(1) if len(x) else np.zeros(0)


def describe(name: str, p: np.ndarray, class_names: Sequence[str], task: str, thresholds: Sequence[float],
             top_k: int | None = None, ordinal_mode: str = "argmax") -> dict:
    """One prediction as :meth:`medmix.predict.Predictor.predict` reports it (same keys and rounding)."""
    p = np.asarray(p, np.float64)
    order = [int(k) for k in np.argsort(-p, kind="stable")]
    if top_k:
        order = order[:top_k]
    dist = {class_names[k]: round(float(p[k]), 6) for k in order}
    if task == MULTI_LABEL:
        present = {class_names[k]: float(p[k]) > thresholds[k] for k in range(len(p))}
        yes = [c for c in dist if present[c]]
        return {"file": name, "label": ", ".join(yes) if yes else "(none)", "index": None,
                "confidence": round(float(p.max()), 6), "labels": yes, "present": present,
                "thresholds": dict(zip(class_names, thresholds)), "probabilities": dist}
    k = int(np.argmax(p))
    out = {"file": name, "label": class_names[k], "index": k, "confidence": round(float(p[k]), 6),
           "probabilities": dist}
    if task == ORDINAL:
        grade = float((p * np.arange(len(p))).sum())
        out["expected_grade"] = round(grade, 4)
        if ordinal_mode == "expected":
            k = min(len(p) - 1, int(grade + 0.5))
            out.update(label=class_names[k], index=k, confidence=round(float(p[k]), 6))
    return out


# ----------------------------------------------------------------------------------------------- the predictor
def read_metadata(path: str | os.PathLike) -> dict:
    """The ``medmix`` JSON metadata of an exported ONNX file (cheap: the graph is read, weights are not parsed)."""
    require_extra("onnx", "the ONNX Runtime backend")
    import onnx

    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"{p}: no such ONNX file")
    try:
        model = onnx.load(str(p), load_external_data=False)
    except Exception as e:
        raise CheckpointError(f"{p}: not a readable ONNX file ({type(e).__name__})") from None
    props = {m.key: m.value for m in model.metadata_props}
    if META_KEY not in props:
        raise CheckpointError(f"{p}: no medmix metadata in this ONNX file; export it with `medmix export`")
    try:
        return json.loads(props[META_KEY])
    except ValueError as e:
        raise CheckpointError(f"{p}: corrupt medmix metadata ({e})") from None


class OnnxPredictor:
    """An exported model in ONNX Runtime: the same ``load``/``probabilities``/``predict`` as the torch Predictor,
    on NumPy arrays. Safe to call from several threads (ONNX Runtime sessions are thread-safe)."""

    backend = "onnx"

    def __init__(self, path: str | os.PathLike, *, threshold: float | None = None, ordinal_mode: str = "argmax",
                 threads: int | None = None, max_pixels: int = MAX_PIXELS) -> None:
        require_extra("onnx", "the ONNX Runtime backend")
        import onnxruntime as ort

        if ordinal_mode not in ("argmax", "expected"):
            raise ConfigError(f"unknown ordinal mode {ordinal_mode!r}; use argmax or expected")
        self.path = Path(path)
        self.meta = read_metadata(self.path)
        self.ordinal_mode = ordinal_mode
        self.max_pixels = int(max_pixels)
        task = self.meta["task"]
        self.task = task["task"]
        self._class_names = tuple(task["class_names"])
        self.n_channels = int(task["n_channels"])
        self.transform = NumpyTransform(self.meta["img_size"], self.meta["mean"], self.meta["std"])
        t = threshold if threshold is not None else self.meta.get("threshold", 0.5)
        k = len(self._class_names)
        self.thresholds = [float(v) for v in t] if isinstance(t, (list, tuple)) else [float(t)] * k
        opts = ort.SessionOptions()
        n = threads or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
        opts.intra_op_num_threads = max(1, int(n))
        opts.inter_op_num_threads = 1
        try:
            self.session = ort.InferenceSession(str(self.path), opts, providers=["CPUExecutionProvider"])
        except Exception as e:
            raise CheckpointError(f"{self.path}: ONNX Runtime cannot load this model ({str(e).splitlines()[0]})"
                                  ) from None
        self.input_name = self.session.get_inputs()[0].name
        self.output_names = [o.name for o in self.session.get_outputs()]
        ood = self.meta.get("ood")
        self.ood_threshold = (float(ood["threshold"]) if isinstance(ood, dict) and ood.get("threshold") is not None
                              and ood.get("output", "ood_score") in self.output_names else None)

    @property
    def class_names(self) -> tuple[str, ...]:
        return self._class_names

    def load(self, src: Any, name: str | None = None) -> np.ndarray:
        """One input -> uint8 ``(C, H, W)`` at the stored data size."""
        return load_image_np(src, self.n_channels, int(self.meta["data_size"]), name, self.max_pixels)

    def run(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """uint8 batch ``(B, C, H, W)`` -> the graph's outputs by name: ``logits`` and calibrated ``probabilities``
        (float32 ``(B, K)``), and ``ood_score`` ``(B,)`` when the model has one."""
        x = self.transform(np.asarray(images))
        return dict(zip(self.output_names, self.session.run(self.output_names, {self.input_name: x})))

    def probabilities(self, images: np.ndarray) -> np.ndarray:
        return self.run(images)["probabilities"]

    def ood(self, outputs: dict[str, np.ndarray], images: np.ndarray | None = None) -> list[dict]:
        """Per image ``{"in_distribution", "ood_score"}`` as :class:`medmix.ood.Detector` reports them (the score
        threshold and, given the uint8 ``images``, the blank-image guard), or ``{}`` without an OOD detector."""
        n = len(outputs["probabilities"])
        if self.ood_threshold is None:
            return [{} for _ in range(n)]
        floor = float(self.meta["ood"].get("min_pixel_std") or 0.0)
        stds = pixel_std_np(images) if images is not None else np.full(n, np.inf)
        scores = outputs[self.meta["ood"].get("output", "ood_score")]
        return [{"in_distribution": bool(float(v) <= self.ood_threshold and s >= floor),
                 "ood_score": round(float(v), 6)} for v, s in zip(scores, stds)]

    def predict_arrays(self, images: Sequence[np.ndarray], names: Sequence[str], top_k: int | None = None
                       ) -> list[dict]:
        batch = np.stack(list(images))
        outs = self.run(batch)
        if self.meta.get("generalist"):
            return self._routed(batch, outs, names, top_k)
        oods = self.ood(outs, batch)
        return [{**describe(n, p, self.class_names, self.task, self.thresholds, top_k, self.ordinal_mode), **o}
                for n, p, o in zip(names, outs["probabilities"], oods)]

    def _routed(self, batch: np.ndarray, outs: dict[str, np.ndarray], names: Sequence[str], top_k: int | None
                ) -> list[dict]:
        """A generalist: each image answered by the head of the dataset its router picks, as
        :meth:`medmix.generalist_predictor.GeneralistPredictor.predict` reports it."""
        g = self.meta["generalist"]
        datasets = g["datasets"]
        lo, hi = g["modality_columns"]
        probs = outs["probabilities"]
        router = probs[:, lo:hi]
        ood = g.get("ood") or {}
        scores = outs.get(ood.get("output", "ood_score")) if ood.get("thresholds_by_dataset") else None
        stds = pixel_std_np(batch)
        out = []
        for i, name in enumerate(names):
            k = int(np.argmax(router[i]))
            d = datasets[k]
            a, b = d["columns"]
            task = d["task"]
            t = d.get("threshold", 0.5)
            ts = [float(v) for v in t] if isinstance(t, (list, tuple)) else [float(t)] * (b - a)
            r = describe(name, probs[i, a:b], task["class_names"], task["task"], ts, top_k, self.ordinal_mode)
            r.update(dataset=d["name"], dataset_confidence=round(float(router[i, k]), 6), routed=True,
                     dataset_probabilities={e["name"]: round(float(router[i, j]), 6) for j, e in enumerate(datasets)})
            if scores is not None:
                floor = float((ood.get("min_pixel_std_by_dataset") or {}).get(d["name"], 0.0))
                r["in_distribution"] = bool(float(scores[i]) <= float(ood["thresholds_by_dataset"][d["name"]])
                                            and stds[i] >= floor)
                r["ood_score"] = round(float(scores[i]), 6)
            out.append(r)
        return out

    def predict(self, inputs: Iterable[Any], top_k: int | None = None) -> list[dict]:
        items = list(inputs)
        if not items:
            raise ConfigError("no images given")
        names = [os.fspath(x) if isinstance(x, (str, os.PathLike)) else f"image[{i}]" for i, x in enumerate(items)]
        return self.predict_arrays([self.load(x, n) for x, n in zip(items, names)], names, top_k)
