"""Ensembles and test-time augmentation as one model: members x views, probabilities averaged.

:class:`Averaged` holds trained classifiers of one task (the *members*, any families, each with its own input
normalisation and calibration temperature) and a list of *views* of the input (``identity``, ``hflip``, ``vflip``,
``shift``: the image moved by one pixel in each of the four directions, averaged). Its ``forward`` returns
``log(mean p)`` over every member and view, ``p`` being each member's calibrated softmax (sigmoid per label for
multi-label tasks, returned as ``logit(mean p)``), so every consumer of logits - predict, evaluate, calibrate, the
OOD energy, serve and the ONNX export - works on it unchanged, and a temperature fitted on top calibrates the
average. ``forward_head(..., pre_logits=True)`` gives the members' pooled features (each averaged over the
views) side by side, for the Mahalanobis detector. A one-member ``Averaged`` with several views is plain
test-time augmentation.

The ensemble checkpoint stores the members' configurations in ``model_kwargs`` and their weights under
``members.<i>.``; :func:`medmix.checkpoint.build_model` rebuilds it like any model.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import ConfigError

VIEWS = ("identity", "hflip", "vflip", "shift")
_EPS = 1e-7


def view(x: torch.Tensor, name: str) -> list[torch.Tensor]:
    """The input as ``name`` sees it: one tensor, or four for ``shift`` (one pixel up, down, left, right, the
    edge row or column repeated)."""
    if name == "identity":
        return [x]
    if name == "hflip":
        return [torch.flip(x, dims=(-1,))]
    if name == "vflip":
        return [torch.flip(x, dims=(-2,))]
    if name == "shift":
        p = F.pad(x, (1, 1, 1, 1), mode="replicate")
        h, w = x.shape[-2:]
        return [p[..., 0:h, 1:w + 1], p[..., 2:h + 2, 1:w + 1], p[..., 1:h + 1, 0:w], p[..., 1:h + 1, 2:w + 2]]
    raise ConfigError(f"unknown test-time view {name!r}; use {', '.join(VIEWS)}")


class Averaged(nn.Module):
    """``members`` (built classifiers) x ``views``. ``renorm``: per member ``(scale, shift)`` lists per channel
    that turn the ensemble's normalised input into the member's (``x * scale + shift``); ``temperatures``: each
    member's calibration temperature (a number, or one per label)."""

    def __init__(self, members: Sequence[nn.Module], views: Sequence[str], renorm: Sequence[tuple[list, list]],
                 temperatures: Sequence[Any], multi_label: bool) -> None:
        super().__init__()
        if not members:
            raise ConfigError("an ensemble needs at least one member")
        for v in views:
            view(torch.zeros(1, 1, 2, 2), v)  # refuses an unknown name
        self.members = nn.ModuleList(members)
        self.views, self.multi_label = tuple(views) or ("identity",), bool(multi_label)
        for i, ((scale, shift), t) in enumerate(zip(renorm, temperatures)):
            self.register_buffer(f"scale{i}", torch.tensor(scale, dtype=torch.float32).view(1, -1, 1, 1))
            self.register_buffer(f"shift{i}", torch.tensor(shift, dtype=torch.float32).view(1, -1, 1, 1))
            self.register_buffer(f"temperature{i}", torch.as_tensor(t, dtype=torch.float32).reshape(1, -1))
        first = members[0]
        self.num_classes = getattr(first, "num_classes", None)
        self.in_chans, self.img_size = getattr(first, "in_chans", None), getattr(first, "img_size", None)
        self.num_features = sum(int(getattr(m, "num_features", 0)) for m in members)

    def member_inputs(self, x: torch.Tensor) -> list[tuple[nn.Module, torch.Tensor]]:
        """Each member with its own normalisation of ``x`` (identity view): what a mean Grad-CAM explains."""
        return [(m, x * getattr(self, f"scale{i}") + getattr(self, f"shift{i}")) for i, m in enumerate(self.members)]

    def forward_features(self, x: torch.Tensor) -> list[list[torch.Tensor]]:
        """Per member, the features of every view (``shift`` counts as four)."""
        out = []
        for m, xm in self.member_inputs(x):
            out.append([m.forward_features(v) for name in self.views for v in view(xm, name)])
        return out

    def forward_head(self, feats: list[list[torch.Tensor]], pre_logits: bool = False) -> torch.Tensor:
        if pre_logits:
            return torch.cat([torch.stack([m.forward_head(f, pre_logits=True).float().flatten(1) for f in fs])
                              .mean(0) for m, fs in zip(self.members, feats)], dim=1)
        probs = []
        for i, (m, fs) in enumerate(zip(self.members, feats)):
            t = getattr(self, f"temperature{i}")
            for f in fs:
                z = m.forward_head(f).float() / t
                probs.append(torch.sigmoid(z) if self.multi_label else torch.softmax(z, dim=1))
        p = torch.stack(probs).mean(0).clamp(_EPS, 1 - _EPS if self.multi_label else 1.0)
        return torch.log(p) - torch.log1p(-p) if self.multi_label else torch.log(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def renormalisation(mean: Sequence[float], std: Sequence[float], member_mean: Sequence[float],
                    member_std: Sequence[float]) -> tuple[list[float], list[float]]:
    """``(scale, shift)`` per channel with ``x_member = x * scale + shift`` for ``x`` normalised with ``mean/std``
    (both as fractions of 255): the same uint8 pixels, normalised the member's way."""
    scale = [s / ms for s, ms in zip(std, member_std)]
    shift = [(m - mm) / ms for m, mm, ms in zip(mean, member_mean, member_std)]
    return scale, shift
