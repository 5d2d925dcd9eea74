"""Batched tensor transforms: resize, augment and normalise whole uint8 batches in one ``grid_sample``.

Images stay uint8 in memory; a batch is converted to float only when it is used. Augmentation draws an
independent random affine transform per image (flip, rotation, zoom, shift), composes it with the resize into one
2x3 matrix per image and samples once — no per-image Python and no PIL. ``torchvision.transforms.v2`` draws one
set of parameters per call, so on a batch every image would get the same transform; that is why the per-image
affine is done here with ``affine_grid``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import ConfigError


@dataclass(frozen=True)
class AugmentConfig:
    hflip: bool = False
    vflip: bool = False
    rotate: float = 0.0  # max degrees, uniform in [-rotate, rotate]
    scale: tuple[float, float] = (1.0, 1.0)  # zoom range; > 1 zooms in
    translate: float = 0.0  # max shift as a fraction of the image side

    @property
    def identity(self) -> bool:
        return not (self.hflip or self.vflip or self.rotate or self.translate or self.scale != (1.0, 1.0))


AUGMENT_POLICIES: dict[str, AugmentConfig] = {
    "none": AugmentConfig(),
    # radiographs and CT: anatomy has a fixed orientation, so only mild geometric jitter
    "radiology": AugmentConfig(hflip=False, rotate=10, scale=(0.9, 1.1), translate=0.05),
    # ultrasound: left/right is arbitrary
    "ultrasound": AugmentConfig(hflip=True, rotate=15, scale=(0.9, 1.1), translate=0.05),
    # fundus photographs, dermoscopy: any rotation and either flip
    "rotation_free": AugmentConfig(hflip=True, vflip=True, rotate=180, scale=(0.9, 1.1), translate=0.05),
    # the MedViT / Ordinal Loss paper's list (random scaling, rotation, cropping, horizontal flip); the paper gives
    # no magnitudes, so these are ours: zoom 0.8-1.2, +-15 degrees, crops shifted up to 10 % of the side
    "medvit_paper": AugmentConfig(hflip=True, rotate=15, scale=(0.8, 1.2), translate=0.1),
    # the recipe of the technical report "A CNN + Transformer model for Medical MNIST": rotation, flip, zoom
    "rotate_flip_zoom": AugmentConfig(hflip=True, rotate=15, scale=(0.9, 1.1), translate=0.0),
}


def get_policy(name: str) -> AugmentConfig:
    try:
        return AUGMENT_POLICIES[name]
    except KeyError:
        raise ConfigError(f"unknown augmentation {name!r}; known: {', '.join(AUGMENT_POLICIES)}") from None


class BatchTransform:
    """uint8 ``(B, C, H, W)`` -> normalised float ``(B, C, S, S)``; random per-image affine when ``train``."""

    def __init__(self, img_size: int, mean: list[float], std: list[float], augment: AugmentConfig | None = None,
                 channels_last: bool = True) -> None:
        self.img_size = int(img_size)
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        self.augment = augment or AugmentConfig()
        self.channels_last = channels_last

    def __call__(self, x: torch.Tensor, *, train: bool = False, generator: torch.Generator | None = None,
                 rows: slice | None = None) -> torch.Tensor:
        """``rows``: transform only these rows of ``x``, but draw the random parameters for the whole batch, so
        the generator advances the same way and each row gets the same augmentation as without ``rows`` (data
        parallel processes each keep their shard of one global batch)."""
        if x.dtype != torch.uint8 or x.ndim != 4:
            raise ConfigError(f"expected a uint8 batch of shape (B, C, H, W), got {x.dtype} {tuple(x.shape)}")
        theta = self._random_affine(x.shape[0], generator) if train and not self.augment.identity else None
        if rows is not None:
            x = x[rows]
            theta = theta[rows] if theta is not None else None
        xf = x.float()
        if theta is not None:
            grid = F.affine_grid(theta, [x.shape[0], x.shape[1], self.img_size, self.img_size], align_corners=False)
            xf = F.grid_sample(xf, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        elif x.shape[-1] != self.img_size or x.shape[-2] != self.img_size:
            xf = F.interpolate(xf, size=(self.img_size, self.img_size), mode="bilinear", align_corners=False,
                               antialias=self.img_size < x.shape[-1])
        xf = (xf - self.mean * 255.0) / (self.std * 255.0)
        return xf.contiguous(memory_format=torch.channels_last) if self.channels_last else xf.contiguous()

    def _random_affine(self, n: int, g: torch.Generator | None) -> torch.Tensor:
        a = self.augment

        def uniform(lo: float, hi: float) -> torch.Tensor:
            return torch.rand(n, generator=g) * (hi - lo) + lo

        angle = uniform(-a.rotate, a.rotate) * (math.pi / 180.0)
        # log-uniform zoom; a zoom of s samples a window 1/s as large
        zoom = torch.exp(uniform(math.log(a.scale[0]), math.log(a.scale[1])))
        sx = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0) if a.hflip else torch.ones(n)
        sy = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0) if a.vflip else torch.ones(n)
        tx, ty = uniform(-a.translate, a.translate) * 2, uniform(-a.translate, a.translate) * 2
        cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
        return torch.stack([torch.stack([cos * sx, -sin * sy, tx], 1), torch.stack([sin * sx, cos * sy, ty], 1)], 1)
