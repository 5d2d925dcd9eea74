"""Mixup and CutMix on a training batch, as a convex combination of the task's own loss.

Mixup (Zhang et al., 2018) blends two images, ``lam * x + (1 - lam) * x[partner]``; CutMix (Yun et al., 2019)
pastes a box of the partner into the image, ``lam`` being the area kept. Either way the loss is
``lam * L(logits, y) + (1 - lam) * L(logits, y[partner])`` with the run's loss ``L``, which is the soft-target
cross-entropy for ``ce`` (label smoothing included) and carries over unchanged to multi-label BCE and to the
ordinal loss, where a one-hot soft target would not fit.

Written here rather than taken from timm's ``Mixup`` because that draws from NumPy's global generator (a resumed
or data-parallel run would mix differently) and builds one-hot targets (no ordinal or NLL loss). Every random
number comes from the task's per-epoch generator and is drawn for the whole global batch, so each data-parallel
process mixes its shard as the single-process run would pair it, and a resumed run repeats the epoch exactly.
"""
from __future__ import annotations

import math

import numpy as np
import torch


class BatchMix:
    """Mix a normalised batch. ``mixup``/``cutmix``: the Beta(alpha, alpha) parameters (0: off); ``prob``: the
    share of batches mixed; when both are on, each mixed batch uses one of them, chosen with equal odds."""

    def __init__(self, mixup: float = 0.0, cutmix: float = 0.0, prob: float = 1.0) -> None:
        self.mixup, self.cutmix, self.prob = float(mixup), float(cutmix), float(prob)

    @property
    def enabled(self) -> bool:
        return (self.mixup > 0 or self.cutmix > 0) and self.prob > 0

    def __call__(self, x: torch.Tensor, n_global: int, generator: torch.Generator, rows: slice | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor | None, float]:
        """``x``: this process's rows of a global batch of ``n_global`` images. Returns ``(x, partner, lam)``:
        the mixed batch, the index (into ``x``) of each image's partner (None when this batch is not mixed) and
        the weight of the image's own label."""
        # the same draws on every process, whatever its shard
        u, which = torch.rand(2, generator=generator).tolist()
        seed = int(torch.randint(0, 2 ** 31 - 1, (1,), generator=generator))
        keys = torch.rand(n_global, generator=generator)
        if not self.enabled or u >= self.prob:
            return x, None, 1.0
        keys = keys[rows] if rows is not None else keys
        order = torch.argsort(keys)  # a random pairing within the shard: image order[i] mixes with order[i + 1]
        partner = torch.empty_like(order)
        partner[order] = order.roll(-1)
        rng = np.random.default_rng(seed)
        use_cutmix = self.cutmix > 0 and (self.mixup <= 0 or which < 0.5)
        lam = float(rng.beta(self.cutmix, self.cutmix) if use_cutmix else rng.beta(self.mixup, self.mixup))
        if not use_cutmix:
            return lam * x + (1.0 - lam) * x[partner], partner, lam
        h, w = x.shape[-2:]
        cut = math.sqrt(1.0 - lam)  # a box of area 1 - lam, centred anywhere, clipped to the image
        bh, bw = int(round(h * cut)), int(round(w * cut))
        cy, cx = int(rng.integers(0, h)), int(rng.integers(0, w))
        y0, y1 = max(cy - bh // 2, 0), min(cy + bh - bh // 2, h)
        x0, x1 = max(cx - bw // 2, 0), min(cx + bw - bw // 2, w)
        out = x.clone()
        out[..., y0:y1, x0:x1] = x[partner][..., y0:y1, x0:x1]
        lam = 1.0 - (y1 - y0) * (x1 - x0) / (h * w)  # the area actually kept
        return out, partner, lam
