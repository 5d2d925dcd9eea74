"""Batched tensor transforms: resize, augment and normalise whole uint8 batches in one ``grid_sample``.

Images stay uint8 in memory; a batch is converted to float only when it is used. Augmentation draws an
independent random affine transform per image (flip, rotation, zoom, shift), composes it with the resize into one
2x3 matrix per image and samples once — no per-image Python and no PIL. ``torchvision.transforms.v2`` draws one
set of parameters per call, so on a batch every image would get the same transform; that is why the per-image
affine is done here with ``affine_grid``.

The ``*_strong`` policies add one photometric op per image after the affine, TrivialAugment-style (Müller & Hutter,
2021, "TrivialAugment: Tuning-free Yet State-of-the-Art Data Augmentation"): each image draws one op uniformly from
the policy's list (``identity`` among them) and a magnitude uniformly in ``[0, max]``. They are batched here for the
same reason as the affine: ``torchvision.transforms.v2.TrivialAugmentWide`` draws one op and magnitude per call, so
it needs a Python loop over the images of a batch (on uint8, rounding after each op), and the functional ops
(``adjust_brightness``, ``adjust_contrast``, ``adjust_gamma``, ``adjust_sharpness``, ``adjust_saturation``) take one
Python float and reject a tensor of per-image factors (their ``factor < 0`` check fails on it; checked with
torchvision 0.29). Its op list also holds geometric ops the affine already covers and natural-image ops (posterize,
solarize, equalize) that change what a radiograph's grey levels mean; the ops here are the ones that model how
scanners and cameras differ: exposure, window, gamma, focus, sensor noise, ultrasound speckle, colour saturation.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from ..errors import ConfigError

# the photometric ops in draw order; an op is in a policy's draw when its maximum (the field of that name) is > 0
PHOTOMETRIC_OPS = ("identity", "brightness", "contrast", "gamma", "sharpness", "noise", "speckle", "saturation")
_NOISE_OPS = ("noise", "speckle")
# factor = 1 +- magnitude for these; a factor below 0 means nothing, so their maximum is at most 1
_FACTOR_OPS = ("brightness", "contrast", "sharpness", "saturation")


@dataclass(frozen=True)
class AugmentConfig:
    hflip: bool = False
    vflip: bool = False
    rotate: float = 0.0  # max degrees, uniform in [-rotate, rotate]
    scale: tuple[float, float] = (1.0, 1.0)  # zoom range; > 1 zooms in
    translate: float = 0.0  # max shift as a fraction of the image side
    # Photometric ops, one per image (TrivialAugment): none unless ``photometric``, so every policy without it
    # draws and returns exactly what it did before these fields existed. Each field is that op's maximum magnitude;
    # the magnitude is uniform in [0, max] and, for the signed ops, its sign is a fair coin.
    photometric: bool = False
    brightness: float = 0.0  # x * (1 +- m)
    contrast: float = 0.0  # the image's grey mean + (1 +- m) * (x - mean)
    gamma: float = 0.0  # 255 * (x / 255) ** exp(+- m)
    sharpness: float = 0.0  # blurred + (1 +- m) * (x - blurred): > 1 an unsharp mask, < 1 a blur
    noise: float = 0.0  # x + m * 255 * N(0, 1) per pixel: m is the noise std as a fraction of the range
    speckle: float = 0.0  # x * (1 + m * N(0, 1)) per pixel: multiplicative noise, like ultrasound speckle
    saturation: float = 0.0  # grey + (1 +- m) * (x - grey); 3-channel images only (a grey image has none)

    def __post_init__(self) -> None:
        for op in PHOTOMETRIC_OPS[1:]:
            m = getattr(self, op)
            if not (isinstance(m, (int, float)) and math.isfinite(m) and m >= 0):
                raise ConfigError(f"augmentation {op} maximum must be a number >= 0, got {m!r}")
            if op in _FACTOR_OPS and m > 1:
                raise ConfigError(f"augmentation {op} maximum must be at most 1 (a factor of 1 +- it), got {m}")
        if self.photometric and not any(getattr(self, op) for op in PHOTOMETRIC_OPS[1:]):
            raise ConfigError("photometric augmentation needs at least one op maximum > 0 "
                              f"({', '.join(PHOTOMETRIC_OPS[1:])})")

    @property
    def geometric(self) -> bool:
        """Whether there is a random affine (flip, rotation, zoom or shift) to draw."""
        return bool(self.hflip or self.vflip or self.rotate or self.translate or self.scale != (1.0, 1.0))

    @property
    def identity(self) -> bool:
        return not (self.geometric or self.photometric)

    def photometric_ops(self, channels: int) -> tuple[str, ...]:
        """The ops an image of ``channels`` channels draws from, ``identity`` first; () when there are none (off,
        or only saturation on a grey image), and then nothing is drawn."""
        if not self.photometric:
            return ()
        ops = tuple(op for op in PHOTOMETRIC_OPS[1:] if getattr(self, op) > 0 and (op != "saturation" or channels == 3))
        return ("identity",) + ops if ops else ()


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
# The strong policies: a base policy's affine (drawn first, the same numbers as the base) plus one photometric op per
# image. The maxima are ours, not a paper's: TrivialAugmentWide's (factors up to 1 +- 0.99) flatten a 28-pixel
# radiograph to grey, so these stay within what differing exposure, windowing and sensors do: brightness, contrast
# and saturation factors within 1 +- 0.25-0.3, gamma within exp(+-0.3) = 0.74-1.35, sharpness factors 0.5-1.5, noise
# of up to 3 % of the range (about 8 grey levels) and speckle of up to 25 % of the pixel value.
AUGMENT_POLICIES.update({
    # radiographs, OCT: exposure, window, gamma, focus and sensor noise; no flips (the base has none)
    "radiology_strong": replace(AUGMENT_POLICIES["radiology"], photometric=True, brightness=0.3, contrast=0.3,
                                gamma=0.3, sharpness=0.5, noise=0.03),
    # ultrasound: speckle, gain (contrast) and the scanner's grey map (gamma)
    "ultrasound_strong": replace(AUGMENT_POLICIES["ultrasound"], photometric=True, speckle=0.25, contrast=0.3,
                                 gamma=0.3),
    # fundus photographs, dermoscopy, pathology: illumination, contrast, colour saturation and gamma
    "fundus_strong": replace(AUGMENT_POLICIES["rotation_free"], photometric=True, brightness=0.25, contrast=0.25,
                             saturation=0.3, gamma=0.25),
    # CT and MRI slices: window (contrast), gamma and reconstruction noise
    "ct_mri_strong": replace(AUGMENT_POLICIES["rotate_flip_zoom"], photometric=True, contrast=0.3, gamma=0.3,
                             noise=0.03),
})


def get_policy(name: str) -> AugmentConfig:
    try:
        return AUGMENT_POLICIES[name]
    except KeyError:
        raise ConfigError(f"unknown augmentation {name!r}; known: {', '.join(AUGMENT_POLICIES)}") from None


@dataclass(frozen=True)
class PhotometricDraw:
    """The photometric draws of one whole batch: per image the op's index into ``ops``, its magnitude and sign,
    and for the noise ops the row of ``noise`` (one ``(C, S, S)`` field per noisy image of the batch) it adds."""
    ops: tuple[str, ...]
    op: torch.Tensor
    magnitude: torch.Tensor
    sign: torch.Tensor
    slot: torch.Tensor
    noise: torch.Tensor | None

    def rows(self, rows: slice) -> PhotometricDraw:
        """The draws of these rows; ``noise`` stays whole, ``slot`` indexes it."""
        return replace(self, op=self.op[rows], magnitude=self.magnitude[rows], sign=self.sign[rows],
                       slot=self.slot[rows])


_GREY = torch.tensor([0.2989, 0.587, 0.114])  # ITU-R 601 luma, as torchvision's rgb_to_grayscale
# PIL's ImageFilter.SMOOTH, the blur torchvision's adjust_sharpness blends with
_SMOOTH = torch.tensor([[1.0, 1.0, 1.0], [1.0, 5.0, 1.0], [1.0, 1.0, 1.0]]) / 13.0


def _grey(x: torch.Tensor) -> torch.Tensor:
    """``(B, C, H, W)`` -> ``(B, 1, H, W)``: luma for RGB, the channel mean otherwise."""
    if x.shape[1] == 3:
        return (x * _GREY.view(1, 3, 1, 1)).sum(1, keepdim=True)
    return x.mean(1, keepdim=True)


def _blur(x: torch.Tensor) -> torch.Tensor:
    """The 3 x 3 SMOOTH blur (edges replicated) as a sum of nine shifted views rather than ``conv2d``: a
    convolution picks its algorithm by batch size, so an image blurred in a data-parallel shard would differ in the
    last bits from the same image blurred in the whole batch; elementwise sums do not."""
    h, w = x.shape[-2:]
    p = F.pad(x, (1, 1, 1, 1), mode="replicate")
    out = torch.zeros_like(x)
    for i in range(3):
        for j in range(3):
            out += float(_SMOOTH[i, j]) * p[..., i:i + h, j:j + w]
    return out


def apply_photometric(x: torch.Tensor, d: PhotometricDraw) -> torch.Tensor:
    """Each image of float ``x`` (0..255) through its drawn op, clamped to [0, 255]; in place. One pass per op over
    the images that drew it (at most 7 passes), no loop over images."""
    for k, name in enumerate(d.ops):
        idx = (d.op == k).nonzero().squeeze(1)
        if name == "identity" or idx.numel() == 0:
            continue
        xi = x[idx]
        m = d.magnitude[idx].view(-1, 1, 1, 1)
        f = 1.0 + d.sign[idx].view(-1, 1, 1, 1) * m
        if name == "brightness":
            y = xi * f
        elif name == "contrast":
            mean = _grey(xi).mean((1, 2, 3), keepdim=True)
            y = mean + f * (xi - mean)
        elif name == "gamma":
            y = 255.0 * (xi / 255.0).clamp_min(0.0) ** torch.exp(d.sign[idx].view(-1, 1, 1, 1) * m)
        elif name == "sharpness":
            blurred = _blur(xi)
            y = blurred + f * (xi - blurred)
        elif name == "noise":
            y = xi + (m * 255.0) * d.noise[d.slot[idx]]
        elif name == "speckle":
            y = xi * (1.0 + m * d.noise[d.slot[idx]])
        elif name == "saturation":
            grey = _grey(xi)
            y = grey + f * (xi - grey)
        else:  # pragma: no cover - PHOTOMETRIC_OPS and this chain are edited together
            raise AssertionError(name)
        x[idx] = y.clamp_(0.0, 255.0)
    return x


class BatchTransform:
    """uint8 ``(B, C, H, W)`` -> normalised float ``(B, C, S, S)``; random per-image affine when ``train``, then
    (policies with ``photometric``) one random photometric op per image."""

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
        theta = self._random_affine(x.shape[0], generator) if train and self.augment.geometric else None
        # after the affine, so a policy's affine draws are those of the same policy without photometric ops
        photo = self.random_photometric(x.shape[0], x.shape[1], generator) if train else None
        if rows is not None:
            x = x[rows]
            theta = theta[rows] if theta is not None else None
            photo = photo.rows(rows) if photo is not None else None
        xf = x.float()
        if theta is not None:
            grid = F.affine_grid(theta, [x.shape[0], x.shape[1], self.img_size, self.img_size], align_corners=False)
            xf = F.grid_sample(xf, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        elif x.shape[-1] != self.img_size or x.shape[-2] != self.img_size:
            xf = F.interpolate(xf, size=(self.img_size, self.img_size), mode="bilinear", align_corners=False,
                               antialias=self.img_size < x.shape[-1])
        if photo is not None:
            xf = apply_photometric(xf, photo)
        xf = (xf - self.mean * 255.0) / (self.std * 255.0)
        return xf.contiguous(memory_format=torch.channels_last) if self.channels_last else xf.contiguous()

    def random_photometric(self, n: int, channels: int, g: torch.Generator | None) -> PhotometricDraw | None:
        """The photometric draws of a whole batch of ``n`` images, or None (drawing nothing) when the policy has
        no photometric op for ``channels``-channel images. The noise fields are drawn only for the images that
        drew a noise op, at the output size, so every process of a data-parallel run draws the same numbers."""
        a = self.augment
        ops = a.photometric_ops(channels)
        if not ops:
            return None
        op = torch.randint(len(ops), (n,), generator=g)
        maxima = torch.tensor([0.0 if o == "identity" else float(getattr(a, o)) for o in ops])
        magnitude = torch.rand(n, generator=g) * maxima[op]
        sign = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
        noisy = torch.zeros(n, dtype=torch.bool)
        for k, o in enumerate(ops):
            if o in _NOISE_OPS:
                noisy |= op == k
        count = int(noisy.sum())
        noise = torch.randn(count, channels, self.img_size, self.img_size, generator=g) if count else None
        return PhotometricDraw(ops, op, magnitude, sign, torch.cumsum(noisy, 0) - 1, noise)

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
