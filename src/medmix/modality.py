"""The modality gate: does an image come from the imaging modality a run was trained on?

A model's own feature-space score (:mod:`medmix.ood`) is fitted on its training images only; a model trained on a
few hundred ultrasound images has never been shown what a CT or a hand X-ray looks like, and its features may put
one right beside its classes. The gate adds knowledge every model lacks: ``ModalityNet``
(:mod:`medmix.models.modality_gate`), a small network shipped with medmix (``assets/modality_gate.safetensors``,
built by ``benchmarks/modality_gate.py``; its training data and their licences are listed in ``assets/NOTICE.md``),
trained to tell imaging modalities apart (chest X-ray, breast ultrasound, retinal fundus photo, abdomen / chest /
head CT, breast MRI, hand X-ray, natural photos).

Per run, at the end of training, :func:`medmix.ood.fit_gate` computes the gate's features of the run's training images
and fits a Gaussian per class (shared Ledoit-Wolf covariance, as :func:`medmix.ood.fit_mahalanobis`); the threshold is
placed on the validation images at ``medmix.ood.GATE_TPR``. A new image whose gate features are further than the
threshold from every class is flagged. Because the gate's features separate modalities, images of another modality land
far from a run's Gaussians even when the run's own model cannot tell them apart; because the Gaussians are the run's
own, the gate also serves a run of a modality the gate never saw (a user's own images), only less sharply. The gate's
most probable modality is reported beside the flag ("looks like a hand X-ray").

Every image is seen by the gate at 28 x 28 pixels in 3 channels (grey images replicated), however the run itself
sees it: the same coarse view whatever the run's size, so one set of weights serves every run.
"""
from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .errors import ConfigError
from .models.modality_gate import ModalityNet

__all__ = ["GATE_FILE", "GATE_SIZE", "gate_available", "gate_inputs", "gate_outputs", "load_gate"]

ASSETS = Path(__file__).resolve().parent / "assets"
GATE_FILE = ASSETS / "modality_gate.safetensors"
GATE_INFO = ASSETS / "modality_gate.json"
GATE_SIZE = 28


def gate_inputs(images: torch.Tensor) -> torch.Tensor:
    """uint8 ``(B, C, H, W)`` with C = 1 or 3 -> float ``(B, 3, 28, 28)`` in [-1, 1], the gate's view."""
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ConfigError(f"the modality gate takes (B, 1 or 3, H, W) images, got {tuple(images.shape)}")
    x = images.float().div(255.0)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    if tuple(x.shape[-2:]) != (GATE_SIZE, GATE_SIZE):
        x = F.interpolate(x, size=(GATE_SIZE, GATE_SIZE), mode="bilinear", antialias=True, align_corners=False)
    return (x - 0.5) / 0.5


def gate_available() -> bool:
    return GATE_FILE.is_file() and GATE_INFO.is_file()


@functools.lru_cache(maxsize=1)
def load_gate() -> tuple[ModalityNet, dict]:
    """The shipped gate (eval mode, fp32, on the CPU) and its metadata (``classes``, ``md5``, training summary)."""
    if not gate_available():
        raise ConfigError(f"the modality gate's weights are missing ({GATE_FILE}); reinstall medmix")
    from safetensors.torch import load_file

    info = json.loads(GATE_INFO.read_text())
    model = ModalityNet(len(info["classes"]), widths=tuple(info["widths"]), depth=int(info["depth"]))
    model.load_state_dict({k: v.float() for k, v in load_file(str(GATE_FILE)).items()})
    return model.eval(), info


@torch.no_grad()
def gate_outputs(images: torch.Tensor, batch_size: int = 1024, model: ModalityNet | None = None
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Gate features ``(N, D)`` and modality probabilities ``(N, M)`` (float64 numpy) of uint8 images."""
    net = model if model is not None else load_gate()[0]
    feats, probs = [], []
    for i in range(0, len(images), batch_size):
        f = net.forward_head(net.forward_features(gate_inputs(images[i:i + batch_size])), pre_logits=True)
        feats.append(f.double())
        probs.append(torch.softmax(net.head(f), 1).double())
    if not feats:
        n = len(load_gate()[1]["classes"]) if model is None else model.num_classes
        return np.zeros((0, net.num_features)), np.zeros((0, n))
    return torch.cat(feats).numpy(), torch.cat(probs).numpy()
