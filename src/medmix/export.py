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

``int8=True`` (``medmix export --int8``) writes the checked graph statically quantized by ONNX Runtime instead
(:func:`quantize_int8`: QDQ, uint8 activations and per-channel int8 weights, calibrated on a fixed, seeded sample of
the run's own training images), after running both graphs in ONNX Runtime on the whole validation split
(:func:`int8_parity`). If the int8 graph loses more than ``int8_tolerance`` of ACC (0.005, half a point, or one
image of the val split when that is more) or AUC (0.005) there, the export is refused and no file is written,
unless ``int8_force``. The numbers are stored in the metadata under ``"int8"``; everything else in the metadata,
the input and the outputs are those of the fp32 export, so :mod:`medmix.serve.onnx_backend` serves either file.
"""
from __future__ import annotations

import io
import json
import logging
import math
import os
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

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
from .metrics import medmnist_acc, medmnist_auc, predict_labels
from .modality import GATE_SIZE, load_gate
from .ood import EXTRA_MEANS, EXTRA_PRECISION, Detector, GateDetector, mahalanobis_score
from .paths import check_writable_file
from .run import Run
from .small_data import warn

META_KEY = "medmix"
INPUT_NAME = "input"
OUTPUT_NAMES = ("logits", "probabilities")
OOD_OUTPUT = "ood_score"
GATE_OUTPUTS = ("modality_score", "modality_probabilities")
OOD_RTOL = 1e-3

# --int8. Measured on the default model (hybrid_mixer_small, BreastMNIST, 28 px): quantizing every op ONNX Runtime
# can quantize (the residual Adds, LayerNorms, GELU pieces too) ran about as fast as quantizing the three ops below,
# whose integer kernels carry the arithmetic, but moved the Mahalanobis OOD score by 30-40 % (median) and flipped the
# OOD flag of 9-10 % of val images, against 9 % and 1.3 % here. Uint8 activations with int8 weights, full range: ONNX
# Runtime's advice for x86 with VNNI (AVX512-VNNI / AVX-VNNI); per-channel weights for the convolutions.
INT8_OP_TYPES = ("Conv", "MatMul", "Gemm")
INT8_TOLERANCE = (0.005, 0.005)  # largest allowed val drop of (ACC, AUC), as fractions: 0.005 ACC = half a point
INT8_MIN_OPSET = 13  # per-channel QuantizeLinear/DequantizeLinear (the axis attribute)
CALIBRATION_BATCH = 32
PARITY_BATCH = 256


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
        self.gate = None

    def add_gate(self, gate: GateDetector, mean: Any, std: Any, side: int) -> None:
        """Also output the modality gate's score and probabilities, computed from the normalised input (a model
        whose input side is its data side): de-normalised to [0, 1], channels to 3, reduced to the gate's 28 px by
        fixed matrices equal to ``F.interpolate(antialias=True)`` (which ONNX cannot export), as
        :func:`medmix.modality.gate_inputs` does."""
        self.gate = load_gate()[0]
        self.register_buffer("g_mean", torch.as_tensor(mean, dtype=torch.float32).reshape(1, -1, 1, 1))
        self.register_buffer("g_std", torch.as_tensor(std, dtype=torch.float32).reshape(1, -1, 1, 1))
        eye = torch.eye(side).reshape(side, 1, 1, side)  # one-hot rows: the resize weights of each input pixel
        w = F.interpolate(eye, size=(1, GATE_SIZE), mode="bilinear", antialias=True, align_corners=False)
        self.register_buffer("g_resize", w.reshape(side, GATE_SIZE).T.contiguous() if side != GATE_SIZE else None)
        self.register_buffer("g_means", gate.stats[EXTRA_MEANS].float().clone())
        self.register_buffer("g_precision", gate.stats[EXTRA_PRECISION].float().clone())

    def _gate(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        v = x * self.g_std + self.g_mean
        if v.shape[1] == 1:
            v = v.expand(-1, 3, -1, -1)
        if self.g_resize is not None:
            v = self.g_resize @ v @ self.g_resize.T
        f = self.gate.forward_head(self.gate.forward_features((v - 0.5) / 0.5), pre_logits=True)
        diff = f[:, None, :] - self.g_means[None]
        score = ((diff @ self.g_precision) * diff).sum(-1).min(dim=1).values.clamp_min(0.0)
        return score, torch.softmax(self.gate.head(f), dim=1)

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
        if self.gate is not None:
            return logits, probs, score, *self._gate(x)
        return logits, probs, score


def onnx_metadata(meta: dict, opset: int, detector=None, gate: bool = False, gate_note: str = "") -> dict:
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
        if gate:
            out["ood"]["gate"] = {"threshold": detector.gate.threshold, "output": GATE_OUTPUTS[0],
                                  "probabilities_output": GATE_OUTPUTS[1], "classes": detector.gate.classes,
                                  "tpr": detector.gate.block.get("tpr"), "gate": detector.gate.block.get("gate")}
            out["output_names"] += list(GATE_OUTPUTS)
        elif isinstance(meta.get("ood"), dict) and isinstance(meta["ood"].get("gate"), dict):
            out["ood"]["gate"] = None  # in the checkpoint but not in this graph (see export_onnx)
            out["ood"]["gate_note"] = gate_note
    if is_generalist(meta):  # what the ONNX Runtime backend needs to route
        g, ood = meta["generalist"], meta.get("ood") if isinstance(meta.get("ood"), dict) else {}
        out["generalist"] = {"datasets": [{k: d[k] for k in ("name", "task", "columns", "threshold") if k in d}
                                          for d in g["datasets"]], "modality_columns": g["modality_columns"],
                             "ood": {"output": OOD_OUTPUT, "thresholds_by_dataset": ood.get("thresholds_by_dataset"),
                                     "min_pixel_std_by_dataset": ood.get("min_pixel_std_by_dataset")} if ood else None}
        out["output_names"] = list(OUTPUT_NAMES) + ([OOD_OUTPUT] if ood else [])
    return out


def export_onnx(checkpoint: str | os.PathLike, out_path: str | os.PathLike, opset: int = 17, *,
                tolerance: float = 1e-4, check_batch: int = 8, seed: int = 0, int8: bool = False,
                calibration_images: int = 256, int8_tolerance: tuple[float, float] = INT8_TOLERANCE,
                int8_force: bool = False, data_dir: str | os.PathLike | None = None) -> dict:
    """Write ``out_path`` (ONNX, dynamic batch) and return a summary: path, bytes, classes, input/outputs, the
    measured ``max_abs_diff_probabilities``/``max_abs_diff_logits`` and seconds.

    ``int8``: write the int8 (QDQ) graph instead, calibrated on ``calibration_images`` training images (all of them
    when there are fewer) drawn with ``seed`` from the run's dataset (found like ``medmix evaluate`` finds it, or in
    ``data_dir``); refused when its val ACC or AUC drop by more than ``int8_tolerance`` ``(acc, auc)`` unless
    ``int8_force`` (then written with a warning). The summary's ``int8`` is the metadata block; ``bytes`` is the
    int8 file's size, ``int8["fp32_bytes"]`` the fp32 graph's."""
    require_extra("onnx", "medmix export")
    import onnx
    import onnxruntime as ort

    if isinstance(opset, bool) or not isinstance(opset, int) or not 9 <= opset <= 21:
        raise ConfigError(f"opset {opset} is not supported; use 9..21 (default 17)")
    if int8:
        _check_int8_args(opset, calibration_images, int8_tolerance)
    check_writable_file(out_path, "--onnx")
    t0 = time.perf_counter()
    run = Run.of(checkpoint)
    src, meta = run.path, run.meta
    bundle = _int8_data(run, data_dir) if int8 else None  # before the export: a missing dataset fails at once
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
    gate_note = ""
    if detector is not None and detector.gate is not None:
        if s != d:
            gate_note = (f"the model's input side ({s}) differs from its data side ({d}): the gate's view of the image "
                         f"cannot be rebuilt in the graph; the ONNX backend applies the model's own score only")
        elif int8:
            gate_note = "int8 graphs carry no modality gate; the ONNX backend applies the model's own score only"
        else:
            wrapped.add_gate(detector.gate, meta["mean"], meta["std"], d)
            wrapped.eval()
    outputs = list(OUTPUT_NAMES) + ([OOD_OUTPUT] if wrapped.ood else []) + (list(GATE_OUTPUTS) if wrapped.gate
                                                                          is not None else [])
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
    doc = onnx_metadata(meta, int(opset), detector, wrapped.gate is not None, gate_note)
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
    if wrapped.gate is not None:  # against the gate as predictors apply it, on the same uint8 images
        raw = torch.randint(0, 256, (check_batch, c, d, d), dtype=torch.uint8, generator=torch.Generator()
                            .manual_seed(seed + 1))
        o_gate = sess.run(list(GATE_OUTPUTS), {INPUT_NAME: transform(raw).contiguous().numpy()})
        ref_score = detector.gate(raw)[0]
        diff_gate = float((np.abs(o_gate[0] - ref_score) / np.maximum(1.0, np.abs(ref_score))).max())
        if not diff_gate <= OOD_RTOL:
            raise MedmixError(f"{src}: the ONNX modality-gate score disagrees with torch: relative difference "
                              f"{diff_gate:.3g} > {OOD_RTOL:g}; the file was not written")

    int8_doc = None
    if int8:
        train_images = bundle.splits["train"].images
        k = min(int(calibration_images), len(train_images))
        pick = np.sort(np.random.default_rng(seed).choice(len(train_images), k, replace=False))
        calibration = _batched(transform, train_images[torch.from_numpy(pick)])
        qdata = quantize_int8(data, calibration)
        val = bundle.splits["val"]
        parity = int8_parity(data, qdata, _batched(transform, val.images), val.labels.numpy(), task["task"],
                             meta.get("threshold", 0.5), detector, val.images)
        acc_tol, auc_tol = (float(v) for v in int8_tolerance)
        # one val image may always change its label: on a small split (BreastMNIST's 78) one image is 1.3 points
        acc_tol = max(acc_tol, 1.0 / max(parity["n"], 1) + 1e-9)
        ok = _drop(parity["fp32_acc"], parity["int8_acc"]) <= acc_tol and \
            _drop(parity["fp32_auc"], parity["int8_auc"]) <= auc_tol  # False on NaN
        numbers = f"val ({parity['n']} images) ACC {_fmt(parity['fp32_acc'])} -> {_fmt(parity['int8_acc'])}, " \
                  f"AUC {_fmt(parity['fp32_auc'])} -> {_fmt(parity['int8_auc'])} (allowed drops {acc_tol:g} ACC, " \
                  f"{auc_tol:g} AUC)"
        if not ok and not int8_force:
            raise MedmixError(f"{src}: the int8 model loses too much against fp32 on {numbers}; no file was "
                              f"written (--int8-force writes it anyway, or export without --int8)")
        if not ok:
            warn(f"the int8 model loses more than allowed against fp32 on {numbers}; written because of "
                 f"--int8-force")
        int8_doc = {"format": "QDQ", "activation_type": "QUInt8", "weight_type": "QInt8", "per_channel": True,
                    "reduce_range": False, "op_types": list(INT8_OP_TYPES),
                    "float_outputs": [o for o in outputs if o != OUTPUT_NAMES[0]], "calibration_images": k,
                    "calibration_split": "train", "calibration_seed": seed, "calibration_method": "MinMax",
                    **parity, "acc_tolerance": acc_tol, "auc_tolerance": auc_tol, "within_tolerance": ok,
                    "forced": not ok, "fp32_bytes": len(data), "onnxruntime_version": ort.__version__}
        qproto = onnx.load_from_string(qdata)
        doc["int8"] = int8_doc
        doc["opset"] = next(o.version for o in qproto.opset_import if o.domain in ("", "ai.onnx"))
        onnx.helper.set_model_props(qproto, {META_KEY: json.dumps(doc), "classes": json.dumps(doc["classes"]),
                                             "task": task["task"], "model": meta["model"],
                                             "medmix_version": __version__})
        qproto.producer_name, qproto.producer_version = "medmix", __version__
        qproto.doc_string = proto.doc_string.replace("; outputs", "; int8 (QDQ, ONNX Runtime static quantization); "
                                                     "outputs", 1)
        data = qproto.SerializeToString()

    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out, data)
    return {"onnx": str(out), "bytes": len(data), "checkpoint": str(src), "model": meta["model"],
            "classes": doc["classes"], "task": task["task"], "opset": int(doc["opset"]),
            "input": {"name": INPUT_NAME, "shape": ["batch", c, s, s], "dtype": "float32"}, "outputs": outputs,
            "temperature": doc["temperature"], "check_batch": check_batch, "ood": doc.get("ood"),
            "max_rel_diff_ood_score": diff_ood, "max_abs_diff_probabilities": diff_p, "max_abs_diff_logits": diff_l,
            "tolerance": tolerance, "int8": int8_doc, "seconds": round(time.perf_counter() - t0, 3)}


# ----------------------------------------------------------------------------------------------- int8
def _check_int8_args(opset: int, calibration_images: int, int8_tolerance) -> None:
    """Refuse --int8 arguments that cannot work before anything is loaded (one line each)."""
    if isinstance(calibration_images, bool) or not isinstance(calibration_images, int) or calibration_images < 1:
        raise ConfigError(f"--calibration-images must be a positive number of training images, got "
                          f"{calibration_images!r}")
    if opset < INT8_MIN_OPSET:
        raise ConfigError(f"--int8 needs --opset {INT8_MIN_OPSET} or later (per-channel QuantizeLinear), got {opset}")
    try:
        acc_tol, auc_tol = (float(v) for v in int8_tolerance)
    except (TypeError, ValueError):
        raise ConfigError(f"int8_tolerance must be two numbers (ACC drop, AUC drop), got {int8_tolerance!r}") from None
    if math.isnan(acc_tol) or math.isnan(auc_tol):
        raise ConfigError(f"int8_tolerance must be two numbers (ACC drop, AUC drop), got {int8_tolerance!r}")


def _int8_data(run: Run, data_dir: str | os.PathLike | None):
    """The run's own dataset and split, which --int8 calibrates on (train) and checks on (val), or one line saying
    that it needs them and how to point at them."""
    if run.is_generalist:
        raise ConfigError(f"{run.path} is a generalist checkpoint ({run.dataset}); --int8 supports single-dataset "
                          f"checkpoints only: export it without --int8")
    try:
        bundle = run.training_data(data_dir)
    except MedmixError as e:
        src = run.meta.get("data_source") or {}
        if src.get("kind") == "folder" or (src.get("kind") == "packed" and run.dataset != "mednist"):
            how = f"this run's data are read from where it was trained ({src.get('path')}): put them back there"
        else:
            how = "point at the folder holding them with --data-dir DIR or MEDMIX_DATA=DIR"
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError(f"--int8 calibrates and checks the int8 model on the run's own training data "
                          f"({run.dataset}), which cannot be loaded ({why}); {how}, or export without --int8") from None
    if not len(bundle.splits["val"]):
        raise ConfigError(f"{run.dataset}: the validation split is empty, so --int8 cannot check the int8 model; "
                          f"export without --int8")
    return bundle


def _batched(transform, images: torch.Tensor, batch: int = PARITY_BATCH) -> list[np.ndarray]:
    """uint8 ``(N, C, H, W)`` -> the normalised float32 batches the fp32 check feeds (the same ``transform``)."""
    with torch.no_grad():
        return [transform(images[i:i + batch]).numpy() for i in range(0, len(images), batch)]


def _drop(before: float | None, after: float | None) -> float:
    """How much a metric fell; 0 when it is undefined (None: NaN) both ways, NaN when only one side is."""
    if before is None or after is None:
        return 0.0 if before is after else math.nan
    return before - after


def _fmt(v: float | None) -> str:
    return "nan" if v is None or math.isnan(v) else f"{v:.4f}"


def _session(data: bytes):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])


class _PreProcessingHint(logging.Filter):
    """Drops ONNX Runtime's "Please consider (to run) pre-processing" warning, which every quantize_static call logs
    on the root logger: its pre-processing (shape inference, basic fusions) changed neither accuracy nor speed of
    the default model, and it fails on some graphs. Other warnings pass."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = str(record.msg)
        return not (msg.startswith("Please consider") and "pre-processing before quantization" in msg)


def quantize_int8(data: bytes, calibration: list[np.ndarray]) -> bytes:
    """The serialized fp32 graph ``data`` statically quantized by ONNX Runtime (QDQ; see ``INT8_OP_TYPES``),
    activation ranges calibrated (min/max) on the normalised ``calibration`` batches. Only the nodes that compute
    ``logits`` are quantized: the temperature and softmax, and the OOD score's subgraph (the Mahalanobis constants
    and ops, or the energy), stay float."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    proto = onnx.load_from_string(data)
    for i, node in enumerate(proto.graph.node):  # nodes_to_exclude works by name
        node.name = node.name or f"medmix_node_{i}"
    producer = {o: n for n in proto.graph.node for o in n.output}
    needed, todo = set(), [OUTPUT_NAMES[0]]
    while todo:  # the ancestors of the logits
        node = producer.get(todo.pop())
        if node is not None and node.name not in needed:
            needed.add(node.name)
            todo.extend(node.input)
    float_nodes = [n.name for n in proto.graph.node if n.name not in needed]

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter({INPUT_NAME: x[i:i + CALIBRATION_BATCH]} for x in calibration
                                for i in range(0, len(x), CALIBRATION_BATCH))

        def get_next(self):
            return next(self.batches, None)

    hint, root = _PreProcessingHint(), logging.getLogger()
    root.addFilter(hint)
    try:
        with tempfile.TemporaryDirectory(prefix="medmix-int8-") as tmp:
            out = Path(tmp) / "int8.onnx"
            quantize_static(proto, out, Reader(), quant_format=QuantFormat.QDQ, per_channel=True, reduce_range=False,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            op_types_to_quantize=list(INT8_OP_TYPES), nodes_to_exclude=float_nodes)
            return out.read_bytes()
    except Exception as e:  # ONNX Runtime raises many types; nothing the user passed can fix it but the model
        raise MedmixError(f"ONNX Runtime could not quantize this model to int8 ({type(e).__name__}: "
                          f"{str(e).splitlines()[0][:200] if str(e) else ''}); export without --int8") from None
    finally:
        root.removeFilter(hint)


def int8_parity(fp32: bytes, int8: bytes, batches: list[np.ndarray], labels: np.ndarray, task: str, threshold,
                detector: Detector | None = None, images: torch.Tensor | None = None) -> dict:
    """Both serialized graphs in ONNX Runtime on the same normalised ``batches`` (the val split): MedMNIST ACC
    (at ``threshold``) and AUC of each (NaN -> None), ``label_agreement`` (share of images with the same predicted
    label(s)) and, with a ``detector``, ``ood_flag_agreement`` (same in/out-of-distribution flag, the blank-image
    guard on the uint8 ``images`` included)."""
    outs = {}
    for name, graph in (("fp32", fp32), ("int8", int8)):
        sess = _session(graph)
        names = [o.name for o in sess.get_outputs()]
        runs = [dict(zip(names, sess.run(names, {INPUT_NAME: x}))) for x in batches]
        outs[name] = {k: np.concatenate([r[k] for r in runs]) for k in names}
    r: dict = {"split": "val", "n": int(len(labels))}
    preds = {}
    for name, o in outs.items():
        p = o[OUTPUT_NAMES[1]]
        r[f"{name}_acc"] = medmnist_acc(labels, p, task, threshold)
        r[f"{name}_auc"] = medmnist_auc(labels, p, task)
        preds[name] = predict_labels(p, task, threshold).reshape(len(p), -1)
    r["label_agreement"] = float(np.mean((preds["fp32"] == preds["int8"]).all(axis=1)))
    r["max_abs_diff_probabilities"] = float(np.abs(outs["fp32"][OUTPUT_NAMES[1]] - outs["int8"][OUTPUT_NAMES[1]]).max())
    r["ood_flag_agreement"] = None
    if detector is not None and OOD_OUTPUT in outs["fp32"]:
        flags = [detector.flags(outs[k][OOD_OUTPUT], images) for k in ("fp32", "int8")]
        r["ood_flag_agreement"] = float(np.mean(flags[0] == flags[1]))
    return {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in r.items()}
