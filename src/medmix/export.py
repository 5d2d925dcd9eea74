"""Export a checkpoint to ONNX, with everything needed to use it embedded, and check the export against torch.

>>> from medmix.export import export_onnx
>>> export_onnx("runs/quickstart", "model.onnx")["max_abs_diff_probabilities"]
3.0e-08

The graph:

* input ``input``: the *normalised* float32 batch ``(B, C, img_size, img_size)`` — uint8 pixels at the stored
  data size, resized to ``img_size`` when the two differ, then ``(x - 255 mean) / (255 std)``. The batch axis is
  dynamic. Preprocessing stays outside the graph so any client can feed it; :mod:`medmix.serve.onnx_backend`
  does it with PIL and NumPy exactly like training and the torch :class:`~medmix.predict.Predictor`.
* outputs ``logits`` ``(B, K)`` (raw) and ``probabilities`` ``(B, K)``: softmax (sigmoid for multi-label) of the
  logits divided by the checkpoint's calibration temperature — the calibrated numbers ``medmix predict`` prints.
  Re-export after ``medmix calibrate`` to bake a new temperature in.
* output ``ood_score`` ``(B,)``, only when the checkpoint carries an out-of-distribution detector
  (:mod:`medmix.ood`): the score the checkpoint's predictions use — the Mahalanobis distance of the penultimate
  features to the nearest class mean (means and precision matrix baked into the graph as constants) or the energy
  of the logits. An image is in distribution when ``ood_score <= metadata["ood"]["threshold"]``.

``metadata_props["medmix"]`` holds a JSON object: ``classes``, ``task`` (kind, class names, channels), ``mean``,
``std``, ``temperature``, ``threshold``, ``data_size``, ``img_size``, ``model``, ``dataset``, ``metrics``,
``ood`` (``method``, ``threshold``, ``output``; when the checkpoint has a detector), ``input_name``,
``output_names``, ``opset`` and ``medmix_version``.

The export checks itself: a random uint8 batch goes through the same preprocessing into torch and into ONNX
Runtime, and the largest probability difference must be at most ``tolerance`` (1e-4) — and OOD scores must agree
with the torch detector's to 1e-3 (relative) — else :class:`~medmix.errors.MedmixError` is raised and no file is
left behind.
"""
from __future__ import annotations

import io
import json
import os
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ._version import __version__
from .atomic import atomic_write_bytes
from .checkpoint import is_generalist
from .data.tasks import MULTI_LABEL
from .errors import ConfigError, MedmixError, require_extra
from .inference import extract
from .ood import EXTRA_MEANS, EXTRA_PRECISION, Detector, mahalanobis_score
from .paths import check_writable_file
from .run import Run

META_KEY = "medmix"
INPUT_NAME = "input"
OUTPUT_NAMES = ("logits", "probabilities")
OOD_OUTPUT = "ood_score"
OOD_RTOL = 1e-3


class _Exported(nn.Module):
    """model -> (logits, calibrated probabilities[, OOD score]). ``spans``: ``(first column, end, multi-label,
    temperature)`` per block of columns with its own softmax (sigmoid for multi-label) and temperature: one block for
    a single-dataset model; the router's and each head's for a generalist, so the ONNX Runtime backend routes with one
    graph. The OOD score as the predictors compute it: the smallest squared Mahalanobis distance of the penultimate
    features to any class mean (``stats``), or the energy of the logits at ``energy_t``."""

    def __init__(self, model: nn.Module, spans: list[tuple], ood: str | None = None, stats: dict | None = None,
                 energy_t: float = 1.0) -> None:
        super().__init__()
        self.model, self.spans, self.ood, self.energy_t = model, spans, ood, energy_t
        for i, (_, _, _, t) in enumerate(spans):
            self.register_buffer(f"t{i}", torch.as_tensor(t, dtype=torch.float32).reshape(1, -1))
        if ood == "mahalanobis":
            self.register_buffer("means", stats[EXTRA_MEANS].float().clone())
            self.register_buffer("precision", stats[EXTRA_PRECISION].float().clone())

    def forward(self, x: torch.Tensor):
        if self.ood == "mahalanobis":
            f = self.model.forward_features(x)
            logits = self.model.forward_head(f).float()
            feats = self.model.forward_head(f, pre_logits=True).float().reshape(x.shape[0], -1)
        else:
            logits = self.model(x).float()
        parts = []
        for i, (a, b, multi, _) in enumerate(self.spans):
            z = logits[:, a:b] / getattr(self, f"t{i}")
            parts.append(torch.sigmoid(z) if multi else torch.softmax(z, dim=1))
        probs = torch.cat(parts, dim=1)
        if self.ood is None:
            return logits, probs
        if self.ood == "mahalanobis":
            diff = feats[:, None, :] - self.means[None]  # (B, K, D): direct form, no float32 cancellation
            score = ((diff @ self.precision) * diff).sum(-1).min(dim=1).values.clamp_min(0.0)
        else:  # energy
            t, multi = self.energy_t, self.spans[0][2]
            score = -t * (F.softplus(logits / t).sum(1) if multi else torch.logsumexp(logits / t, dim=1))
        return logits, probs, score


def onnx_metadata(meta: dict, opset: int, detector=None) -> dict:
    """The JSON object embedded as ``metadata_props["medmix"]``."""
    task = meta["task"]
    out = {"format": 1, "classes": list(task["class_names"]), "task": task, "mean": meta["mean"], "std": meta["std"],
           "temperature": meta.get("temperature", 1.0), "threshold": meta.get("threshold", 0.5),
           "data_size": int(meta["data_size"]), "img_size": int(meta["img_size"]), "model": meta["model"],
           "dataset": meta.get("dataset"), "metrics": {"val": meta.get("val_metrics"),
                                                       "test": meta.get("test_metrics")},
           "input_name": INPUT_NAME, "output_names": list(OUTPUT_NAMES) + ([OOD_OUTPUT] if detector else []),
           "opset": opset, "checkpoint_medmix_version": meta.get("medmix_version"), "medmix_version": __version__}
    if detector is not None:
        out["ood"] = {"method": detector.method, "threshold": detector.threshold, "output": OOD_OUTPUT,
                      "tpr": meta["ood"].get("tpr"), "split": meta["ood"].get("split"),
                      "min_pixel_std": detector.min_pixel_std}  # the blank-image guard
    if is_generalist(meta):  # what the ONNX Runtime backend needs to route
        g, ood = meta["generalist"], meta.get("ood") if isinstance(meta.get("ood"), dict) else {}
        out["generalist"] = {"datasets": [{k: d[k] for k in ("name", "task", "columns", "threshold") if k in d}
                                          for d in g["datasets"]], "modality_columns": g["modality_columns"],
                             "ood": {"output": OOD_OUTPUT, "thresholds_by_dataset": ood.get("thresholds_by_dataset"),
                                     "min_pixel_std_by_dataset": ood.get("min_pixel_std_by_dataset")} if ood else None}
        out["output_names"] = list(OUTPUT_NAMES) + ([OOD_OUTPUT] if ood else [])
    return out


def export_onnx(checkpoint: str | os.PathLike, out_path: str | os.PathLike, opset: int = 17, *,
                tolerance: float = 1e-4, check_batch: int = 8, seed: int = 0) -> dict:
    """Write ``out_path`` (ONNX, dynamic batch) and return a summary: path, bytes, classes, input/outputs, the
    measured ``max_abs_diff_probabilities``/``max_abs_diff_logits`` and seconds."""
    require_extra("onnx", "medmix export")
    import onnx
    import onnxruntime as ort

    if isinstance(opset, bool) or not isinstance(opset, int) or not 9 <= opset <= 21:
        raise ConfigError(f"opset {opset} is not supported; use 9..21 (default 17)")
    check_writable_file(out_path, "--onnx")
    t0 = time.perf_counter()
    run = Run.of(checkpoint)
    src, meta = run.path, run.meta
    model = run.build_model().to(memory_format=torch.contiguous_format).eval()
    task = meta["task"]
    c, s, d = int(task["n_channels"]), int(meta["img_size"]), int(meta["data_size"])
    if run.is_generalist:
        g, detector = meta["generalist"], None
        stats = {k: run.extras[k] for k in (EXTRA_MEANS, EXTRA_PRECISION)} if isinstance(meta.get("ood"), dict) \
            and meta["ood"].get("thresholds_by_dataset") else None
        spans = [(0, len(g["datasets"]), False, float(g.get("modality_temperature", 1.0) or 1.0))]
        spans += [(*d["columns"], d["task"]["task"] == MULTI_LABEL, d.get("temperature", 1.0) or 1.0)
                  for d in g["datasets"]]
        wrapped = _Exported(model, spans, "mahalanobis" if stats is not None else None, stats).eval()
    else:
        detector, stats = Detector.from_checkpoint(meta, run.extras), None
        spans = [(0, len(task["class_names"]), task["task"] == MULTI_LABEL, meta.get("temperature", 1.0))]
        wrapped = _Exported(model, spans, detector.method if detector else None, detector.stats if detector else None,
                            float(detector.temperature) if detector else 1.0).eval()
    outputs = list(OUTPUT_NAMES) + ([OOD_OUTPUT] if wrapped.ood else [])
    transform = run.transform(channels_last=False)

    g = torch.Generator().manual_seed(seed)
    sample = transform(torch.randint(0, 256, (2, c, d, d), dtype=torch.uint8, generator=g))
    buf = io.BytesIO()
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(wrapped, (sample,), buf, input_names=[INPUT_NAME], output_names=outputs,
                              opset_version=int(opset), do_constant_folding=True, dynamo=False,
                              dynamic_axes={INPUT_NAME: {0: "batch"}, **{o: {0: "batch"} for o in outputs}})
    except Exception as e:  # the exporter raises many types; the user can only change model or opset
        raise MedmixError(f"{src}: ONNX export of model {meta['model']!r} failed at opset {opset} "
                          f"({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None

    proto = onnx.load_from_string(buf.getvalue())
    doc = onnx_metadata(meta, int(opset), detector)
    onnx.helper.set_model_props(proto, {META_KEY: json.dumps(doc), "classes": json.dumps(doc["classes"]),
                                        "task": task["task"], "model": meta["model"], "medmix_version": __version__})
    proto.producer_name, proto.producer_version = "medmix", __version__
    proto.doc_string = f"medmix {meta['model']} trained on {meta.get('dataset')}: input normalised " \
                       f"(B,{c},{s},{s}) float32; outputs logits and calibrated probabilities"
    data = proto.SerializeToString()

    # the check: the same random uint8 batch through the same preprocessing, torch vs ONNX Runtime
    x = transform(torch.randint(0, 256, (check_batch, c, d, d), dtype=torch.uint8, generator=g))
    with torch.inference_mode():
        t_logits, t_probs = wrapped(x)[:2]
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])
    o_out = sess.run(outputs, {INPUT_NAME: x.numpy()})
    diff_p = float(np.abs(o_out[1] - t_probs.numpy()).max())
    diff_l = float(np.abs(o_out[0] - t_logits.numpy()).max())
    if not diff_p <= tolerance:  # also catches NaN
        raise MedmixError(f"{src}: the ONNX export disagrees with torch: max |probability difference| "
                          f"{diff_p:.3g} > {tolerance:g} (logits {diff_l:.3g}); the file was not written")
    diff_ood = None
    if detector is not None or stats is not None:  # against the detector itself (float64), as predictors apply it
        ref_logits, ref_feats = extract(model, x.contiguous(), lambda v: v)
        ref = detector.scores(ref_logits, ref_feats) if detector is not None else mahalanobis_score(ref_feats, stats)
        diff_ood = float((np.abs(o_out[2] - ref) / np.maximum(1.0, np.abs(ref))).max())
        if not diff_ood <= OOD_RTOL:
            raise MedmixError(f"{src}: the ONNX OOD score ({detector.method if detector else 'mahalanobis'}) "
                              f"disagrees with torch: relative difference {diff_ood:.3g} > {OOD_RTOL:g}; the file "
                              f"was not written")

    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out, data)
    return {"onnx": str(out), "bytes": len(data), "checkpoint": str(src), "model": meta["model"],
            "classes": doc["classes"], "task": task["task"], "opset": int(opset),
            "input": {"name": INPUT_NAME, "shape": ["batch", c, s, s], "dtype": "float32"}, "outputs": outputs,
            "temperature": doc["temperature"], "check_batch": check_batch, "ood": doc.get("ood"),
            "max_rel_diff_ood_score": diff_ood, "max_abs_diff_probabilities": diff_p, "max_abs_diff_logits": diff_l,
            "tolerance": tolerance, "seconds": round(time.perf_counter() - t0, 3)}
