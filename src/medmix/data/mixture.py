"""Several datasets as one: a common image format and a batch sampler that mixes them.

A generalist model (:mod:`medmix.generalist`) sees X-rays, ultrasound, fundus photographs and CT slices in the same
batch, so every dataset is brought to one format when it is loaded:

* **size**: each image is resized once to ``img_size`` (bilinear, antialiased when shrinking) and kept as uint8;
* **channels**: ``3`` replicates grayscale images into three identical channels, so colour datasets keep their
  colour (a strong hint of the modality); ``1`` reduces colour images to ITU-R BT.601 luma
  (``0.299 R + 0.587 G + 0.114 B``). ``common_channels`` picks 3 when any dataset is in colour, else 1.

:class:`MixedBatchSampler` draws the dataset of every batch element from temperature-scaled sampling
(:func:`sampling_weights`): with ``n_d`` training images in dataset ``d``, ``p_d ∝ n_d ** (1 / T)``. ``T = 1``
samples in proportion to size (a 546-image set is drowned by a 41,000-image one), ``T → ∞`` samples the datasets
equally (the small set is repeated dozens of times per pass of the large one); ``T = 2`` (the default) sits between.
Within a dataset, images are drawn without replacement from a fresh permutation each time it is used up, so every
image is seen once before any is seen twice.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import ConfigError

__all__ = ["LUMA", "MixedBatchSampler", "common_channels", "sampling_weights", "to_common_format"]

LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601


def common_channels(channels: Sequence[int]) -> int:
    """3 when any dataset has colour images, else 1."""
    return 3 if any(int(c) == 3 for c in channels) else 1


def to_common_format(images: torch.Tensor, img_size: int, channels: int, chunk: int = 4096) -> torch.Tensor:
    """uint8 ``(N, C, H, W)`` -> uint8 ``(N, channels, img_size, img_size)`` (see the module docstring)."""
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ConfigError(f"expected uint8 images of shape (N, 1|3, H, W), got {images.dtype} {tuple(images.shape)}")
    if channels not in (1, 3):
        raise ConfigError(f"the common channel count must be 1 or 3, got {channels}")
    if img_size < 1:
        raise ConfigError(f"the common image size must be positive, got {img_size}")
    n, c, h, w = images.shape
    if c == channels and h == img_size and w == img_size:
        return images.contiguous()
    out = torch.empty((n, channels, img_size, img_size), dtype=torch.uint8)
    luma = torch.tensor(LUMA, dtype=torch.float32).view(1, 3, 1, 1)
    for i in range(0, n, chunk):
        x = images[i:i + chunk].float()
        if c == 3 and channels == 1:
            x = (x * luma).sum(1, keepdim=True)
        if h != img_size or w != img_size:
            x = F.interpolate(x, size=(img_size, img_size), mode="bilinear", align_corners=False,
                              antialias=img_size < max(h, w))
        if x.shape[1] == 1 and channels == 3:
            x = x.expand(-1, 3, -1, -1)
        out[i:i + chunk] = x.round().clamp_(0, 255).to(torch.uint8)
    return out


def sampling_weights(sizes: Sequence[int], temperature: float = 2.0) -> np.ndarray:
    """``p_d ∝ n_d ** (1 / T)``, normalised to sum to 1. ``temperature = inf`` gives equal weights."""
    n = np.asarray(sizes, dtype=np.float64)
    if n.ndim != 1 or len(n) == 0 or (n <= 0).any():
        raise ConfigError(f"every dataset needs at least one training image; sizes {list(map(int, n))}")
    if not temperature > 0:
        raise ConfigError(f"the sampling temperature must be positive, got {temperature}")
    w = np.ones_like(n) if np.isinf(temperature) else np.exp(np.log(n) / float(temperature))
    return w / w.sum()


class MixedBatchSampler:
    """Batches of ``(dataset index, image index)`` drawn from several datasets with probabilities ``weights``.

    Each batch element's dataset is drawn independently (a multinomial over the batch); image indices within a
    dataset come from a running permutation that is renewed when exhausted. Deterministic given ``generator``.
    """

    def __init__(self, sizes: Sequence[int], batch_size: int, weights: Sequence[float],
                 generator: torch.Generator | None = None) -> None:
        if batch_size < 1:
            raise ConfigError(f"the batch size must be at least 1, got {batch_size}")
        self.sizes = [int(s) for s in sizes]
        w = torch.as_tensor(np.asarray(weights, dtype=np.float64))
        if len(w) != len(self.sizes) or (w < 0).any() or not float(w.sum()) > 0:
            raise ConfigError(f"need one non-negative weight per dataset, got {list(np.asarray(weights))}")
        self.weights = w / w.sum()
        self.batch_size = int(batch_size)
        self.generator = generator
        self._perm: list[torch.Tensor | None] = [None] * len(self.sizes)
        self._pos = [0] * len(self.sizes)

    def _take(self, d: int, k: int) -> torch.Tensor:
        out = []
        while k > 0:
            perm = self._perm[d]
            if perm is None or self._pos[d] >= len(perm):
                perm = self._perm[d] = torch.randperm(self.sizes[d], generator=self.generator)
                self._pos[d] = 0
            got = perm[self._pos[d]:self._pos[d] + k]
            self._pos[d] += len(got)
            out.append(got)
            k -= len(got)
        return torch.cat(out) if out else torch.empty(0, dtype=torch.long)

    def counts(self) -> torch.Tensor:
        """How many elements of the next batch come from each dataset."""
        picks = torch.multinomial(self.weights, self.batch_size, replacement=True, generator=self.generator)
        return torch.bincount(picks, minlength=len(self.sizes))

    def next_batch(self) -> list[tuple[int, torch.Tensor]]:
        """``[(dataset, image indices), ...]`` for the datasets present in the next batch, in dataset order."""
        return [(d, self._take(d, int(k))) for d, k in enumerate(self.counts().tolist()) if k > 0]

    def state_dict(self) -> dict:
        """The running permutations and positions (the generator's state is its owner's to save)."""
        return {"perm": [p.clone() if p is not None else None for p in self._perm], "pos": list(self._pos)}

    def load_state_dict(self, state: dict) -> None:
        if len(state["perm"]) != len(self.sizes) or len(state["pos"]) != len(self.sizes):
            raise ValueError(f"sampler state for {len(state['perm'])} datasets, this sampler has {len(self.sizes)}")
        self._perm = [p.clone() if p is not None else None for p in state["perm"]]
        self._pos = [int(v) for v in state["pos"]]

    def batches(self, steps: int) -> Iterator[list[tuple[int, torch.Tensor]]]:
        for _ in range(steps):
            yield self.next_batch()
