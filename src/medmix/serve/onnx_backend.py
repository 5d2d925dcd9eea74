"""Classify images with an exported ONNX model and ONNX Runtime only: no torch, no training code.

>>> from medmix.serve.onnx_backend import OnnxPredictor
>>> p = OnnxPredictor("model.onnx")                     # written by `medmix export CKPT --onnx model.onnx`
>>> p.predict(["scan.png"])[0]["label"]

Everything the model needs is read from the ONNX file's metadata (classes, task, normalisation, temperature,
sizes); it and the graph's input and outputs are described in :mod:`medmix.export`. With an ``ood_score`` output,
predictions carry ``in_distribution`` and ``ood_score`` exactly like the torch Predictor's.

Images are decoded by :mod:`medmix.imaging`, the torch path's own code, and answered with its ``describe``. The
resize and normalisation reproduce the evaluation path of :class:`medmix.data.transforms.BatchTransform` in NumPy
(bilinear resize to the model input size when it differs from the data size, antialiased when shrinking, as
``F.interpolate``; then ``(x - 255 mean) / (255 std)``); ``tests/test_export.py`` checks them against the torch
:class:`~medmix.predict.Predictor` (probabilities within 1e-4).

This module must not import torch (a test blocks the import and loads it).
"""
from __future__ import annotations

import functools
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import CheckpointError, ConfigError, require_extra
from ..imaging import MAX_PIXELS, as_inputs, describe, load_image_np, per_class, pixel_std

META_KEY = "medmix"


# ----------------------------------------------------------------------------------------------- resize + normalise
@functools.lru_cache(maxsize=None)
def _linear_weights(n_in: int, n_out: int) -> np.ndarray:
    """The float32 ``(n_out, n_in)`` matrix of ``F.interpolate(mode="bilinear", antialias=True)`` along one axis:
    the triangle filter, widened by the scale when shrinking (PyTorch's ``_upsample_bilinear2d_aa``, itself PIL's);
    plain bilinear interpolation (``align_corners=False``, edges clamped) when enlarging."""
    scale = n_in / n_out
    support = max(scale, 1.0)
    inv = 1.0 / support
    w = np.zeros((n_out, n_in), np.float64)
    for i in range(n_out):
        center = scale * (i + 0.5)
        lo = max(int(center - support + 0.5), 0)
        hi = min(int(center + support + 0.5), n_in)
        ws = np.clip(1.0 - np.abs((np.arange(lo, hi) - center + 0.5) * inv), 0.0, None)
        if ws.sum() > 0:
            w[i, lo:hi] = ws / ws.sum()
    return w.astype(np.float32)


class NumpyTransform:
    """uint8 ``(B, C, H, W)`` -> normalised float32 ``(B, C, S, S)``: the evaluation path of ``BatchTransform``."""

    def __init__(self, img_size: int, mean: Sequence[float], std: Sequence[float]) -> None:
        self.img_size = int(img_size)
        self.mean = np.asarray(mean, np.float32).reshape(1, -1, 1, 1)
        self.std = np.asarray(std, np.float32).reshape(1, -1, 1, 1)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        if x.dtype != np.uint8 or x.ndim != 4:
            raise ConfigError(f"expected a uint8 batch of shape (B, C, H, W), got {x.dtype} {x.shape}")
        xf = x.astype(np.float32)
        h, w = x.shape[-2:]
        if h != self.img_size or w != self.img_size:
            s = self.img_size
            xf = np.einsum("ih,bchw,jw->bcij", _linear_weights(h, s), xf, _linear_weights(w, s), optimize=True)
        return np.ascontiguousarray((xf - self.mean * 255.0) / (self.std * 255.0), dtype=np.float32)


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
    explain_available = False  # Grad-CAM needs gradients: the app answers 501

    def __init__(self, path: str | os.PathLike, *, threshold: float | None = None, ordinal_mode: str = "argmax",
                 threads: int | None = None, max_pixels: int = MAX_PIXELS) -> None:
        require_extra("onnx", "the ONNX Runtime backend")
        import onnxruntime as ort

        if ordinal_mode not in ("argmax", "expected"):
            raise ConfigError(f"unknown ordinal mode {ordinal_mode!r}; use argmax or expected")
        self.path, self.ordinal_mode, self.max_pixels = Path(path), ordinal_mode, int(max_pixels)
        self.meta = read_metadata(self.path)
        task = self.meta["task"]
        self.task, self.class_names, self.n_channels = task["task"], tuple(task["class_names"]), int(task["n_channels"])
        self.transform = NumpyTransform(self.meta["img_size"], self.meta["mean"], self.meta["std"])
        t = threshold if threshold is not None else self.meta.get("threshold", 0.5)
        self.thresholds = per_class(t, len(self.class_names))
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
        stds = pixel_std(images) if images is not None else np.full(n, np.inf)
        scores = outputs[self.meta["ood"].get("output", "ood_score")]
        gate = self.meta["ood"].get("gate")
        out = []
        for i, (v, s) in enumerate(zip(scores, stds)):
            over, blank = float(v) > self.ood_threshold, bool(s < floor)
            r = {"in_distribution": not (over or blank), "ood_score": round(float(v), 6)}
            miss = False
            if gate:  # the modality gate, in the graph (medmix.export), applied as medmix.ood.Detector applies it
                gs, gp = float(outputs[gate["output"]][i]), outputs[gate["probabilities_output"]][i]
                miss, k = gs > float(gate["threshold"]), int(np.argmax(gp))
                r["in_distribution"] = r["in_distribution"] and not miss
                r.update(modality_score=round(gs, 6), modality_match=not miss, looks_like=gate["classes"][k],
                         looks_like_probability=round(float(gp[k]), 6))
            if not r["in_distribution"]:
                r["flagged_by"] = [name for name, hit in (("features", over), ("modality", miss), ("blank", blank))
                                   if hit]
            out.append(r)
        return out

    def predict_arrays(self, images: Sequence[np.ndarray], names: Sequence[str], top_k: int | None = None
                       ) -> list[dict]:
        batch = np.stack(list(images))
        outs = self.run(batch)
        if self.meta.get("generalist"):
            return self._routed(batch, outs, names, top_k)
        oods = self.ood(outs, batch)
        return [{"file": n, **describe(p, self.class_names, self.task, self.thresholds, top_k, self.ordinal_mode), **o}
                for n, p, o in zip(names, outs["probabilities"], oods)]

    def _routed(self, batch: np.ndarray, outs: dict[str, np.ndarray], names: Sequence[str], top_k: int | None
                ) -> list[dict]:
        """A generalist: each image answered by the head of the dataset its router picks, as
        :meth:`medmix.generalist_predictor.GeneralistPredictor.predict` reports it."""
        g, probs = self.meta["generalist"], outs["probabilities"]
        datasets, router = g["datasets"], probs[:, slice(*g["modality_columns"])]
        ood = g.get("ood") or {}
        scores = outs.get(ood.get("output", "ood_score")) if ood.get("thresholds_by_dataset") else None
        stds = pixel_std(batch)
        out = []
        for i, name in enumerate(names):
            k = int(np.argmax(router[i]))
            d = datasets[k]
            a, b = d["columns"]
            r = {"file": name, **describe(probs[i, a:b], d["task"]["class_names"], d["task"]["task"],
                                          per_class(d.get("threshold", 0.5), b - a), top_k, self.ordinal_mode)}
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
        items, names = as_inputs(inputs)
        return self.predict_arrays([self.load(x, n) for x, n in zip(items, names)], names, top_k)
