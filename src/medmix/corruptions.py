"""The MedMNIST-C image corruptions: what each corruption does, which ones every 2D MedMNIST set gets and their
five severity parameters, and the random corruption of training batches (``medmix train --corrupt P``). Only NumPy,
Pillow and the standard library at import (SciPy and Matplotlib's HSV conversion are imported by the corruptions
that use them); no torch. Scoring a run under these corruptions (balanced error, BE, rBE, MedMNIST-C's AlexNet
baseline) is :mod:`medmix.robustness`, which re-exports everything here.

Source: F. Di Salvo, S. Doerrich, C. Ledig, "MedMNIST-C: Comprehensive benchmark and improved classifier robustness
by simulating realistic image corruptions" (2024), and its package ``medmnistc`` 0.1.0 (Apache-2.0). What is carried
over from it: which corruptions each of the twelve 2D MedMNIST sets gets and their five severity parameters
(:data:`MEDMNIST_C`) and what every corruption does. The package itself is not used: it pins medmnist 3.0.1 and
scikit-image 0.23.2 and needs the ImageMagick library; everything here is NumPy, SciPy and Pillow, and written anew.

Where this differs from MedMNIST-C, and why:

* **Resolution.** MedMNIST-C corrupts the 224 px images. Here the images are corrupted as the run's data store them
  (usually 28 px), before the run's own resize to its input size. Parameters measured in pixels (Gaussian-blur
  kernel, motion-blur trail, defocus disk, bubble radii, stain and text sizes, the 10 px margins) are scaled by
  ``side / 224``, so a corruption covers the same share of the field of view as in MedMNIST-C; parameters that act
  on pixel values (noise strength, JPEG quality, pixelation and zoom factors, brightness, contrast, gamma,
  saturation) are used as given. Consequences at 28 px: the mild blurs fall below one pixel and leave the images
  (almost) unchanged: PneumoniaMNIST's and ChestMNIST's ``gaussian_blur`` (sigma 0.1-0.25 px) and OCTMNIST's
  ``defocus_blur`` (radius up to 0.3 px) at every severity, the mildest defocus and Gaussian blurs of the other
  sets; per-pixel noise of a given strength, on the other hand, hides much more of a 28 px image than of a 224 px
  one (each 28 px pixel stands for 64 pixels at 224 px). At 224 px the scale is 1 and the definitions are
  MedMNIST-C's: checked against torchvision, Pillow, SciPy and OpenCV as medmnistc calls them, Gaussian blur and
  zoom blur agree within one gray level, pixelation, JPEG, brightness, contrast, gamma, saturation and the black
  corner exactly, the defocus disk within a few gray levels (its anti-aliased edge), and the noises in
  distribution; the motion blur could not be compared (no ImageMagick), and the overlays differ by construction
  (below).
* **Continuous blurs.** Because scaled sizes are fractional, the blurs are evaluated on a continuous scale: the
  Gaussian blur uses the sigma torchvision derives from MedMNIST-C's kernel size (``0.3 ((k - 1) / 2 - 1) + 0.8``)
  times the scale; the defocus disk is anti-aliased by its pixel coverage; the motion-blur trail (ImageMagick's
  one-sided half-Gaussian of ``2 ceil(radius) + 1`` taps, at a random angle in [-45, 45] degrees) is sampled
  bilinearly between pixels instead of at rounded pixel offsets.
* **Overlays** (bubbles, stains, text) are drawn on a canvas of about 224 px with MedMNIST-C's geometry and reduced
  to the image by area averaging. MedMNIST-C's hand-made ink masks are not redistributed here: ``stain_deposit``
  draws random black blobs of the same sizes (24 px, 32 px at severity 5) and fill (50-75 %); ``characters`` uses
  Pillow's built-in font at the Hershey font's height instead of OpenCV's Hershey duplex.
* **Randomness.** MedMNIST-C draws from global random states in a fixed order; here every (corruption, severity) has
  its own generator seeded from ``seed``, the corruption's name and the severity, so results are reproducible and do
  not depend on which other corruptions are applied.
* Kept on purpose: grayscale sets are corrupted as RGB copies and converted back with Pillow's luma (so independent
  noise per channel is partly averaged away, as in MedMNIST-C); values are truncated, not rounded, where MedMNIST-C
  truncates; the registry's quirks stay (``black_corner`` severity 5 is milder than 4). The registry lists a sixth
  parameter for RetinaMNIST's defocus and for the Gaussian blurs of ChestMNIST and PneumoniaMNIST that its five
  severities never reach; it is left out here.

Data without a MedMNIST-C entry (class folders, packed npz files, MedMNIST sets it does not cover) get a generic
list chosen by the number of channels (:func:`corruptions_for`).

As training augmentation (:func:`random_corruptions`), each image of a batch is corrupted with a probability by one
corruption of its set drawn at random, at a random severity 1-5; every draw comes from one seed per batch and the
image's position in it, so a data-parallel process that corrupts only its rows gets the pixels a single process
would.
"""
from __future__ import annotations

import functools
import io
import math
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import ConfigError

REFERENCE_SIDE = 224  # the image side MedMNIST-C's pixel-sized parameters were chosen for
SEVERITIES = (1, 2, 3, 4, 5)


# ----------------------------------------------------------------------------------------------- helpers
def _rng(seed: int | Sequence[int], name: str, severity: int) -> np.random.Generator:
    """A generator of its own for one corruption at one severity (and one chunk or image when ``seed`` is a
    sequence)."""
    entropy = [int(s) for s in (seed if isinstance(seed, Sequence) else (seed,))]
    return np.random.default_rng(np.random.SeedSequence([*entropy, zlib.crc32(name.encode()), int(severity)]))


def _to_uint8_floor(x: np.ndarray) -> np.ndarray:
    """[0, 1] floats -> uint8 by truncation, the conversion MedMNIST-C uses after its float operations."""
    return (np.clip(x, 0.0, 1.0) * 255.0).astype(np.uint8)


def _to_uint8_round(x: np.ndarray) -> np.ndarray:
    """[0, 255] floats -> uint8, rounded (torchvision's and ImageMagick's conversion)."""
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def _luma(rgb: np.ndarray) -> np.ndarray:
    """Pillow's RGB -> L conversion (ITU-R 601-2 luma in 16-bit fixed point), exactly."""
    r, g, b = (rgb[..., k].astype(np.uint32) for k in range(3))
    return ((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16).astype(np.uint8)


def _per_image(x: np.ndarray, fn: Callable[[Any], Any]) -> np.ndarray:
    """Apply a Pillow operation to each RGB image of ``x`` (N, H, W, 3)."""
    from PIL import Image

    return np.stack([np.asarray(fn(Image.fromarray(img, "RGB")), dtype=np.uint8) for img in x])


def _mirror_correlate(x: np.ndarray, kernel: np.ndarray, axes: tuple[int, ...]) -> np.ndarray:
    from scipy import ndimage

    out = x
    for ax in axes:
        out = ndimage.correlate1d(out, kernel, axis=ax, mode="mirror")
    return out


def _canvas(h: int, w: int) -> tuple[int, float]:
    """Overlays are drawn ``k`` times larger than the image (about 224 px) and reduced by area averaging; returns
    ``(k, canvas pixels per reference pixel)``."""
    k = max(1, round(REFERENCE_SIDE / min(h, w)))
    return k, k * math.sqrt(h * w) / REFERENCE_SIDE


def _reduce(canvas: np.ndarray, k: int) -> np.ndarray:
    """Area average of ``k x k`` blocks of a (H k, W k, ...) canvas."""
    if k == 1:
        return canvas
    h, w = canvas.shape[0] // k, canvas.shape[1] // k
    return canvas.reshape(h, k, w, k, *canvas.shape[2:]).mean(axis=(1, 3))


# ----------------------------------------------------------------------------------------------- the corruptions
# Each takes uint8 RGB images (N, H, W, 3), one severity parameter, a generator and the scale (image side / 224)
# and returns uint8 RGB images of the same shape.

def gaussian_noise(x: np.ndarray, std: float, rng: np.random.Generator, scale: float) -> np.ndarray:
    """Additive normal noise of standard deviation ``std`` (image range 0..1), per pixel and channel."""
    return _to_uint8_floor(x / 255.0 + rng.normal(0.0, std, size=x.shape))


def speckle_noise(x: np.ndarray, std: float, rng: np.random.Generator, scale: float) -> np.ndarray:
    """Multiplicative noise ``x (1 + n)``, ``n`` normal of standard deviation ``std``."""
    v = x / 255.0
    return _to_uint8_floor(v + v * rng.normal(0.0, std, size=x.shape))


def impulse_noise(x: np.ndarray, amount: float, rng: np.random.Generator, scale: float) -> np.ndarray:
    """Salt and pepper: each pixel value (each channel separately) is replaced with probability ``amount``, by
    white or black with equal odds."""
    hit = rng.random(x.shape) < amount
    salt = rng.random(x.shape) < 0.5
    out = x.copy()
    out[hit & salt] = 255
    out[hit & ~salt] = 0
    return out


def shot_noise(x: np.ndarray, photons: float, rng: np.random.Generator, scale: float) -> np.ndarray:
    """Poisson (photon-counting) noise: ``Poisson(x photons) / photons``; fewer photons, more noise."""
    return _to_uint8_floor(rng.poisson(x / 255.0 * photons) / photons)


def pixelate(x: np.ndarray, factor: float, rng: np.random.Generator, scale: float) -> np.ndarray:
    """Box-downsample to ``factor`` of the side (truncated to whole pixels) and box-upsample back."""
    from PIL import Image

    h, w = x.shape[1:3]
    small = (max(1, int(w * factor)), max(1, int(h * factor)))
    return _per_image(x, lambda im: im.resize(small, Image.BOX).resize((w, h), Image.BOX))


def jpeg_compression(x: np.ndarray, quality: int, rng: np.random.Generator, scale: float) -> np.ndarray:
    """Encode as JPEG at ``quality`` (Pillow's defaults otherwise) and decode."""
    from PIL import Image

    def roundtrip(im: Any) -> Any:
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=int(quality))
        buf.seek(0)
        return Image.open(buf).convert("RGB")

    return _per_image(x, roundtrip)


def gaussian_blur(x: np.ndarray, kernel_size: int, rng: np.random.Generator, scale: float) -> np.ndarray:
    """The Gaussian torchvision uses for a ``kernel_size`` kernel (sigma ``0.3 ((k - 1) / 2 - 1) + 0.8``), with sigma
    and reach scaled to the image (mirror padding, rounded)."""
    sigma = (0.3 * ((kernel_size - 1) * 0.5 - 1) + 0.8) * scale
    reach = max(1, math.ceil((kernel_size - 1) / 2 * scale))
    t = np.arange(-reach, reach + 1, dtype=np.float64)
    kern = np.exp(-0.5 * (t / sigma) ** 2)
    return _to_uint8_round(_mirror_correlate(x.astype(np.float64), kern / kern.sum(), (1, 2)))


def _disk_kernel(radius: float, alias_sigma: float) -> np.ndarray:
    """A normalised disk of ``radius`` pixels, each tap weighted by the share of its pixel the disk covers (8 x 8
    samples), then smoothed by a 3-tap Gaussian of ``alias_sigma`` (MedMNIST-C smooths its disk the same way)."""
    reach = max(1, math.ceil(radius + 1))
    sub = (np.arange(8) + 0.5) / 8 - 0.5
    t = np.arange(-reach, reach + 1, dtype=np.float64)
    pos = (t[:, None] + sub[None, :]).reshape(-1)
    inside = (pos[:, None] ** 2 + pos[None, :] ** 2) <= max(radius, 1e-6) ** 2
    n = len(t)
    k = inside.reshape(n, 8, n, 8).mean(axis=(1, 3))
    if k.sum() == 0:
        k[reach, reach] = 1.0
    if alias_sigma > 0:
        g = np.exp(-0.5 * (np.arange(-1, 2) / alias_sigma) ** 2)
        k = _mirror_correlate(k, g / g.sum(), (0, 1))
    return k / k.sum()


def defocus_blur(x: np.ndarray, p: tuple[float, float], rng: np.random.Generator, scale: float) -> np.ndarray:
    """Out-of-focus blur: convolution with a disk of radius ``p[0]`` (reference pixels) whose edge is smoothed by
    ``p[1]`` (mirror padding, truncated)."""
    from scipy import ndimage

    kern = _disk_kernel(p[0] * scale, p[1] * scale)
    v = x / 255.0
    out = np.empty_like(v)
    for c in range(3):
        out[..., c] = ndimage.correlate(v[..., c], kern[None], mode="mirror")
    return _to_uint8_floor(out)


def _bilinear_shift(v: np.ndarray, dx: np.ndarray, dy: np.ndarray) -> np.ndarray:
    """``out[n, y, x] = v[n, y + dy[n], x + dx[n]]`` with bilinear interpolation and edge clamping (one shift per
    image, so rows and columns are interpolated one after the other)."""
    n, h, w = v.shape[:3]
    idx = np.arange(n)[:, None]

    def along(a: np.ndarray, shift: np.ndarray, size: int, axis: int) -> np.ndarray:
        pos = np.clip(np.arange(size)[None, :] + shift[:, None], 0, size - 1)
        lo = np.floor(pos).astype(np.int64)
        hi = np.minimum(lo + 1, size - 1)
        f = (pos - lo).astype(a.dtype)
        if axis == 1:
            return a[idx, lo] * (1 - f)[:, :, None, None] + a[idx, hi] * f[:, :, None, None]
        rows = np.arange(h)[None, :, None]
        lo3, hi3, f3 = lo[:, None, :], hi[:, None, :], f[:, None, :, None]
        return a[idx[:, :, None], rows, lo3] * (1 - f3) + a[idx[:, :, None], rows, hi3] * f3

    return along(along(v, dy, h, 1), dx, w, 2)


def motion_blur(x: np.ndarray, p: tuple[float, float], rng: np.random.Generator, scale: float) -> np.ndarray:
    """ImageMagick's motion blur with ``radius, sigma = p``: each pixel averages ``2 ceil(radius) + 1`` samples
    along a line behind it, weighted by a half Gaussian of ``sigma``, at an angle drawn per image in [-45, 45]
    degrees; sample spacing and sigma scale with the image."""
    radius, sigma = p
    taps = int(2 * math.ceil(radius) + 1)
    w = np.exp(-np.arange(taps) ** 2 / (2.0 * sigma ** 2))
    w /= w.sum()
    angle = np.deg2rad(rng.uniform(-45.0, 45.0, size=len(x)))
    v = x.astype(np.float32)
    out = np.zeros_like(v)
    for i in range(taps):
        out += w[i] * _bilinear_shift(v, i * scale * np.cos(angle), i * scale * np.sin(angle))
    return _to_uint8_round(out)


def zoom_blur(x: np.ndarray, p: tuple[float, float], rng: np.random.Generator, scale: float) -> np.ndarray:
    """Average of the image and its central magnifications by ``np.arange(1, p[0], p[1])`` (bilinear), as a camera
    zooming during the exposure."""
    from scipy import ndimage

    h = x.shape[1]
    v = x.astype(np.float32) / 255.0
    acc = v.copy()
    factors = np.arange(1.0, p[0], p[1])
    for z in factors:
        side = int(math.ceil(h / z))
        top = (h - side) // 2
        big = ndimage.zoom(v[:, top:top + side, top:top + side], (1, z, z, 1), order=1)
        trim = (big.shape[1] - h) // 2
        acc += big[:, trim:trim + h, trim:trim + h]
    return _to_uint8_floor(acc / (len(factors) + 1))


def brightness(x: np.ndarray, factor: float, rng: np.random.Generator, scale: float) -> np.ndarray:
    """Pillow's ``ImageEnhance.Brightness(factor)``: a blend with black."""
    from PIL import ImageEnhance

    return _per_image(x, lambda im: ImageEnhance.Brightness(im).enhance(factor))


def contrast(x: np.ndarray, factor: float, rng: np.random.Generator, scale: float) -> np.ndarray:
    """Pillow's ``ImageEnhance.Contrast(factor)``: a blend with the image's mean gray."""
    from PIL import ImageEnhance

    return _per_image(x, lambda im: ImageEnhance.Contrast(im).enhance(factor))


def gamma_correction(x: np.ndarray, gamma: float, rng: np.random.Generator, scale: float) -> np.ndarray:
    """torchvision's ``adjust_gamma`` on 8-bit images: the table ``floor(255.999 (v / 255) ** gamma)``."""
    table = np.floor((255 + 1 - 1e-3) * (np.arange(256) / 255.0) ** gamma).astype(np.uint8)
    return table[x]


def saturate(x: np.ndarray, delta: float, rng: np.random.Generator, scale: float) -> np.ndarray:
    """Add ``delta`` to the HSV saturation (clipped to 0..1)."""
    from matplotlib.colors import hsv_to_rgb, rgb_to_hsv

    hsv = rgb_to_hsv(x / 255.0)
    hsv[..., 1] = np.clip(hsv[..., 1] + delta, 0.0, 1.0)
    return _to_uint8_floor(hsv_to_rgb(hsv))


def black_corner(x: np.ndarray, factor: float, rng: np.random.Generator, scale: float) -> np.ndarray:
    """Black outside a centred circle of ``factor`` times the inscribed radius (a dermatoscope's vignette)."""
    h, w = x.shape[1:3]
    cy, cx = h // 2, w // 2
    r = int(min(cx, cy, w - cx, h - cy) * factor)
    yy, xx = np.ogrid[:h, :w]
    outside = (yy - cy) ** 2 + (xx - cx) ** 2 > r * r
    out = x.copy()
    out[:, outside] = 0
    return out


def bubble(x: np.ndarray, p: tuple[int, int], rng: np.random.Generator, scale: float) -> np.ndarray:
    """Air bubbles under the cover slip: ``randint(7, p[1])`` translucent white discs of radius ``randint(3, p[0])``
    reference pixels, each with a 2 px brighter rim (alpha 100/255 inside, 130/255 on the rim)."""
    from PIL import Image, ImageDraw

    n, h, w = x.shape[:3]
    k, unit = _canvas(h, w)
    ref_w, ref_h = w * k / unit, h * k / unit
    out = np.empty_like(x)
    for i in range(n):
        alpha = Image.new("L", (w * k, h * k), 0)
        draw = ImageDraw.Draw(alpha)
        for _ in range(int(rng.integers(7, p[1] + 1))):
            r = int(rng.integers(3, p[0] + 1))
            cx, cy = rng.integers(r, max(r, int(ref_w) - r) + 1), rng.integers(r, max(r, int(ref_h) - r) + 1)
            for rad, a in ((r + 2, 130), (r, 100)):
                draw.ellipse([(cx - rad) * unit, (cy - rad) * unit, (cx + rad) * unit, (cy + rad) * unit], fill=a)
        cover = _reduce(np.asarray(alpha, dtype=np.float64) / 255.0, k)[..., None]
        out[i] = _to_uint8_round(x[i] * (1 - cover) + 255.0 * cover)
    return out


def _blob(side: int, rng: np.random.Generator) -> np.ndarray:
    """A random ink blot: a round envelope roughened by a smoothed random field, thresholded to fill 50-75 % of a
    ``side`` x ``side`` box."""
    from scipy import ndimage

    t = (np.arange(side) + 0.5) / side * 2 - 1
    envelope = 1.0 - np.hypot(t[:, None], t[None, :])
    field = ndimage.gaussian_filter(rng.normal(size=(side, side)), max(0.5, side / 8.0))
    score = envelope + 0.15 * field / (field.std() + 1e-12)
    return score >= np.quantile(score, 1.0 - rng.uniform(0.5, 0.75))


def stain_deposit(x: np.ndarray, p: tuple[int, int], rng: np.random.Generator, scale: float) -> np.ndarray:
    """Black stain deposits: ``randint(1, p[0])`` ink blots of ``p[1]`` reference pixels placed at least 10
    reference pixels from the border; the pixels they cover go black."""
    n, h, w = x.shape[:3]
    k, unit = _canvas(h, w)
    max_marks, ink = p
    size = max(1, int(round(ink * unit)))
    out = np.empty_like(x)
    for i in range(n):
        mask = np.zeros((h * k, w * k))
        marks = int(rng.integers(1, max_marks + 1)) if max_marks > 1 else int(max_marks)
        for _ in range(marks):
            hi_x, hi_y = max(10, int(w * k / unit) - ink - 10), max(10, int(h * k / unit) - ink - 10)
            x0, y0 = int(round(rng.integers(10, hi_x + 1) * unit)), int(round(rng.integers(10, hi_y + 1) * unit))
            blot = _blob(size, rng)[: mask.shape[0] - y0, : mask.shape[1] - x0]
            region = mask[y0:y0 + blot.shape[0], x0:x0 + blot.shape[1]]
            np.maximum(region, blot, out=region)
        cover = _reduce(mask, k)[..., None]
        out[i] = _to_uint8_floor(x[i] / 255.0 * (1 - cover))
    return out


@functools.lru_cache(maxsize=64)
def _font(px: float) -> Any:
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=max(1.0, px))
    except TypeError:  # Pillow < 10.1: the fixed bitmap font
        return ImageFont.load_default()


def characters(x: np.ndarray, p: tuple[int, int, float], rng: np.random.Generator, scale: float) -> np.ndarray:
    """Handwritten-marker text on dermoscopy images: ``randint(1, p[0])`` random lowercase words of
    ``randint(3, p[1])`` letters, each in a random colour at a random font scale up to ``p[2]`` (OpenCV units: a
    capital is about 22 px tall at scale 1, at 224 px)."""
    from PIL import Image, ImageDraw

    n, h, w = x.shape[:3]
    k, unit = _canvas(h, w)
    ref_w, ref_h = int(w * k / unit), int(h * k / unit)
    out = np.empty_like(x)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    for i in range(n):
        color = np.zeros((h * k, w * k, 3))
        alpha = np.zeros((h * k, w * k))
        for _ in range(int(rng.integers(1, p[0] + 1))):
            count = int(rng.integers(3, p[1] + 1))
            font_scale = int(rng.integers(14, int(p[2] * 100) + 1)) / 100.0
            word = "".join(rng.choice(letters, size=count))
            ox = int(rng.integers(10, max(10, ref_w - 8 * count) + 1))
            oy = int(rng.integers(10, max(10, ref_h - 10) + 1))
            rgb = rng.integers(0, 256, size=3)
            layer = Image.new("L", (w * k, h * k), 0)
            ImageDraw.Draw(layer).text((ox * unit, oy * unit), word, fill=255, anchor="ls",
                                       font=_font(round(22 * font_scale * unit / 0.7, 1)))
            a = np.asarray(layer, dtype=np.float64) / 255.0
            color = color * (1 - a[..., None]) + rgb * a[..., None]
            alpha = alpha + a * (1 - alpha)
        a_small, c_small = _reduce(alpha, k)[..., None], _reduce(color, k)
        out[i] = _to_uint8_round(x[i] * (1 - a_small) + c_small)
    return out


KINDS: dict[str, Callable[..., np.ndarray]] = {f.__name__: f for f in (
    gaussian_noise, speckle_noise, impulse_noise, shot_noise, pixelate, jpeg_compression, gaussian_blur,
    defocus_blur, motion_blur, zoom_blur, brightness, contrast, gamma_correction, saturate, black_corner, bubble,
    stain_deposit, characters)}


# ----------------------------------------------------------------------------------------------- the registry
@dataclass(frozen=True)
class Corruption:
    """One named corruption of a set: which operation (``kind``, a key of :data:`KINDS`) and its parameter at
    severities 1..5."""
    name: str
    kind: str
    params: tuple

    def parameter(self, severity: int) -> Any:
        check_severities([severity])
        return self.params[severity - 1]

    def __call__(self, images: np.ndarray, severity: int, seed: int | Sequence[int] = 0) -> np.ndarray:
        return corrupt(images, self, severity, seed=seed)


def _table(**entries: tuple[str, tuple]) -> dict[str, Corruption]:
    return {name: Corruption(name, kind, tuple(params)) for name, (kind, params) in entries.items()}


# MedMNIST-C's severity parameters (medmnistc 0.1.0, corruptions/registry.py), set by set. Units: noise in the
# 0..1 image range; blur kernels, radii and sizes in pixels of a 224 px image; motion blur (radius, sigma); defocus
# (radius, edge smoothing); zoom blur the factors np.arange(1, stop, step); bubble (max radius, max count);
# stain deposit (max marks, ink size: MedMNIST-C picks its 24 px inks at severities 1-4 and 32 px at 5);
# characters (max words, max letters, max font scale).
_ORGAN = dict(
    pixelate=("pixelate", (0.7, 0.6, 0.5, 0.4, 0.35)),
    jpeg_compression=("jpeg_compression", (50, 30, 15, 10, 7)),
    gaussian_noise=("gaussian_noise", (0.04, 0.08, 0.12, 0.16, 0.20)),
    speckle_noise=("speckle_noise", (0.05, 0.10, 0.20, 0.30, 0.40)),
    impulse_noise=("impulse_noise", (0.01, 0.02, 0.03, 0.05, 0.08)),
    shot_noise=("shot_noise", (200, 100, 50, 25, 15)),
    gaussian_blur=("gaussian_blur", (11, 13, 15, 17, 21)),
    brightness_up=("brightness", (1.2, 1.3, 1.4, 1.5, 1.6)),
    brightness_down=("brightness", (0.8, 0.75, 0.7, 0.65, 0.60)),
    contrast_up=("contrast", (1.3, 1.4, 1.6, 1.7, 1.8)),
    contrast_down=("contrast", (0.8, 0.7, 0.6, 0.55, 0.5)),
    gamma_corr_up=("gamma_correction", (1.3, 1.4, 1.6, 1.8, 2.0)),
    gamma_corr_down=("gamma_correction", (0.9, 0.8, 0.7, 0.6, 0.4)),
)

MEDMNIST_C: dict[str, dict[str, Corruption]] = {
    "pathmnist": _table(
        pixelate=("pixelate", (0.8, 0.6, 0.40, 0.30, 0.25)),
        jpeg_compression=("jpeg_compression", (50, 30, 15, 10, 7)),
        defocus_blur=("defocus_blur", ((3, 0.1), (4, 0.1), (5, 0.2), (6, 0.2), (7, 0.3))),
        motion_blur=("motion_blur", ((5, 5), (10, 5), (15, 5), (15, 8), (15, 12))),
        brightness_up=("brightness", (1.1, 1.15, 1.2, 1.22, 1.25)),
        brightness_down=("brightness", (0.85, 0.80, 0.75, 0.72, 0.70)),
        contrast_up=("contrast", (1.1, 1.2, 1.3, 1.4, 1.6)),
        contrast_down=("contrast", (0.8, 0.7, 0.6, 0.55, 0.5)),
        saturate=("saturate", (0.05, 0.10, 0.15, 0.20, 0.25)),
        stain_deposit=("stain_deposit", ((1, 24), (2, 24), (3, 24), (4, 24), (5, 32))),
        bubble=("bubble", ((7, 15), (10, 15), (12, 15), (15, 20), (17, 25))),
    ),
    "bloodmnist": _table(
        pixelate=("pixelate", (0.6, 0.5, 0.40, 0.30, 0.25)),
        jpeg_compression=("jpeg_compression", (50, 30, 15, 10, 7)),
        defocus_blur=("defocus_blur", ((2, 0.01), (3, 0.1), (4, 0.1), (5, 0.1), (6, 0.1))),
        motion_blur=("motion_blur", ((3, 3), (5, 5), (10, 5), (10, 7), (10, 9))),
        brightness_up=("brightness", (1.1, 1.2, 1.3, 1.35, 1.4)),
        brightness_down=("brightness", (0.9, 0.8, 0.7, 0.6, 0.5)),
        contrast_up=("contrast", (1.1, 1.15, 1.2, 1.25, 1.3)),
        contrast_down=("contrast", (0.9, 0.8, 0.7, 0.6, 0.5)),
        saturate=("saturate", (0.05, 0.10, 0.15, 0.17, 0.20)),
        stain_deposit=("stain_deposit", ((1, 24), (2, 24), (3, 24), (3, 24), (3, 32))),
        bubble=("bubble", ((5, 10), (7, 10), (10, 10), (12, 12), (15, 12))),
    ),
    "dermamnist": _table(
        pixelate=("pixelate", (0.7, 0.5, 0.40, 0.30, 0.25)),
        jpeg_compression=("jpeg_compression", (30, 20, 15, 10, 7)),
        gaussian_noise=("gaussian_noise", (0.04, 0.08, 0.12, 0.18, 0.26)),
        speckle_noise=("speckle_noise", (0.05, 0.15, 0.2, 0.35, 0.45)),
        impulse_noise=("impulse_noise", (0.01, 0.03, 0.06, 0.09, 0.17)),
        shot_noise=("shot_noise", (60, 25, 18, 10, 5)),
        defocus_blur=("defocus_blur", ((4, 0.1), (5, 0.2), (6, 0.3), (7, 0.4), (8, 0.5))),
        motion_blur=("motion_blur", ((10, 5), (15, 5), (15, 8), (15, 12), (20, 15))),
        zoom_blur=("zoom_blur", ((1.11, 0.01), (1.16, 0.01), (1.21, 0.02), (1.26, 0.02), (1.31, 0.03))),
        brightness_up=("brightness", (1.1, 1.2, 1.3, 1.4, 1.5)),
        brightness_down=("brightness", (0.9, 0.8, 0.7, 0.6, 0.5)),
        contrast_up=("contrast", (1.1, 1.2, 1.3, 1.4, 1.6)),
        contrast_down=("contrast", (0.8, 0.7, 0.6, 0.5, 0.4)),
        black_corner=("black_corner", (1.10, 1.05, 1.00, 0.90, 0.95)),
        characters=("characters", ((1, 6, 0.14), (2, 7, 0.15), (3, 8, 0.16), (4, 9, 0.17), (6, 10, 0.18))),
    ),
    "retinamnist": _table(
        pixelate=("pixelate", (0.8, 0.60, 0.50, 0.40, 0.35)),
        jpeg_compression=("jpeg_compression", (30, 25, 20, 10, 5)),
        gaussian_noise=("gaussian_noise", (0.04, 0.08, 0.12, 0.16, 0.20)),
        speckle_noise=("speckle_noise", (0.10, 0.15, 0.20, 0.25, 0.30)),
        defocus_blur=("defocus_blur", ((4, 0.1), (5, 0.2), (6, 0.3), (7, 0.4), (8, 0.5))),
        motion_blur=("motion_blur", ((8, 5), (15, 5), (15, 8), (15, 12), (20, 15))),
        brightness_down=("brightness", (0.9, 0.8, 0.7, 0.6, 0.5)),
        contrast_down=("contrast", (0.9, 0.8, 0.7, 0.6, 0.4)),
    ),
    "tissuemnist": _table(
        pixelate=("pixelate", (0.40, 0.30, 0.20, 0.15, 0.10)),
        jpeg_compression=("jpeg_compression", (25, 20, 15, 10, 7)),
        impulse_noise=("impulse_noise", (0.01, 0.015, 0.02, 0.025, 0.03)),
        gaussian_blur=("gaussian_blur", (13, 15, 17, 21, 25)),
        brightness_up=("brightness", (1.3, 1.4, 1.5, 1.6, 1.7)),
        brightness_down=("brightness", (0.8, 0.7, 0.6, 0.5, 0.4)),
        contrast_up=("contrast", (1.1, 1.2, 1.3, 1.4, 1.6)),
        contrast_down=("contrast", (0.9, 0.8, 0.7, 0.6, 0.4)),
    ),
    "octmnist": _table(
        pixelate=("pixelate", (0.30, 0.25, 0.20, 0.15, 0.10)),
        jpeg_compression=("jpeg_compression", (30, 15, 10, 7, 5)),
        speckle_noise=("speckle_noise", (0.15, 0.30, 0.40, 0.50, 0.60)),
        defocus_blur=("defocus_blur", ((0.5, 0.6), (1, 0.5), (1.5, 0.1), (2.0, 0.5), (2.5, 0.1))),
        motion_blur=("motion_blur", ((10, 3), (15, 5), (15, 8), (15, 12), (20, 15))),
        contrast_down=("contrast", (0.6, 0.4, 0.3, 0.2, 0.15)),
    ),
    "breastmnist": _table(
        pixelate=("pixelate", (0.30, 0.25, 0.20, 0.15, 0.10)),
        jpeg_compression=("jpeg_compression", (50, 30, 15, 10, 7)),
        speckle_noise=("speckle_noise", (0.10, 0.15, 0.20, 0.25, 0.30)),
        motion_blur=("motion_blur", ((5, 5), (9, 7), (9, 10), (13, 10), (17, 12))),
        brightness_up=("brightness", (1.4, 1.5, 1.6, 1.8, 2.0)),
        brightness_down=("brightness", (0.55, 0.5, 0.45, 0.4, 0.3)),
        contrast_down=("contrast", (0.9, 0.8, 0.7, 0.6, 0.4)),
    ),
    "chestmnist": _table(
        pixelate=("pixelate", (0.30, 0.25, 0.20, 0.15, 0.10)),
        jpeg_compression=("jpeg_compression", (50, 30, 15, 10, 7)),
        gaussian_noise=("gaussian_noise", (0.04, 0.08, 0.12, 0.18, 0.26)),
        speckle_noise=("speckle_noise", (0.05, 0.15, 0.2, 0.35, 0.45)),
        impulse_noise=("impulse_noise", (0.01, 0.03, 0.06, 0.09, 0.17)),
        shot_noise=("shot_noise", (60, 25, 18, 10, 5)),
        gaussian_blur=("gaussian_blur", (3, 5, 7, 9, 11)),
        brightness_up=("brightness", (1.1, 1.2, 1.3, 1.4, 1.5)),
        brightness_down=("brightness", (0.9, 0.8, 0.7, 0.6, 0.5)),
        contrast_up=("contrast", (1.1, 1.2, 1.3, 1.4, 1.6)),
        contrast_down=("contrast", (0.9, 0.8, 0.7, 0.6, 0.4)),
        gamma_corr_up=("gamma_correction", (1.1, 1.2, 1.3, 1.4, 1.6)),
        gamma_corr_down=("gamma_correction", (0.9, 0.8, 0.7, 0.6, 0.4)),
    ),
    "pneumoniamnist": _table(
        pixelate=("pixelate", (0.8, 0.7, 0.6, 0.5, 0.40)),
        jpeg_compression=("jpeg_compression", (50, 30, 15, 10, 7)),
        gaussian_noise=("gaussian_noise", (0.04, 0.05, 0.06, 0.07, 0.08)),
        speckle_noise=("speckle_noise", (0.05, 0.07, 0.10, 0.15, 0.20)),
        impulse_noise=("impulse_noise", (0.005, 0.01, 0.013, 0.017, 0.02)),
        shot_noise=("shot_noise", (300, 200, 150, 100, 80)),
        gaussian_blur=("gaussian_blur", (3, 5, 7, 9, 11)),
        brightness_up=("brightness", (1.1, 1.2, 1.3, 1.4, 1.5)),
        brightness_down=("brightness", (0.9, 0.8, 0.7, 0.6, 0.5)),
        contrast_up=("contrast", (1.1, 1.2, 1.3, 1.4, 1.6)),
        contrast_down=("contrast", (0.9, 0.8, 0.7, 0.6, 0.4)),
        gamma_corr_up=("gamma_correction", (1.1, 1.2, 1.3, 1.4, 1.6)),
        gamma_corr_down=("gamma_correction", (0.9, 0.8, 0.7, 0.6, 0.4)),
    ),
    "organamnist": _table(**_ORGAN),
    "organcmnist": _table(**_ORGAN),
    "organsmnist": _table(**_ORGAN),
}

# Data MedMNIST-C does not cover: noise, blur, brightness, contrast, JPEG and pixelation, with the parameters of
# the MedMNIST-C set closest in kind (grayscale: ChestMNIST's, pixelation PneumoniaMNIST's; colour: DermaMNIST's).
GENERIC_GRAY: dict[str, Corruption] = _table(
    gaussian_noise=("gaussian_noise", (0.04, 0.08, 0.12, 0.18, 0.26)),
    gaussian_blur=("gaussian_blur", (3, 5, 7, 9, 11)),
    brightness_up=("brightness", (1.1, 1.2, 1.3, 1.4, 1.5)),
    brightness_down=("brightness", (0.9, 0.8, 0.7, 0.6, 0.5)),
    contrast_up=("contrast", (1.1, 1.2, 1.3, 1.4, 1.6)),
    contrast_down=("contrast", (0.9, 0.8, 0.7, 0.6, 0.4)),
    jpeg_compression=("jpeg_compression", (50, 30, 15, 10, 7)),
    pixelate=("pixelate", (0.8, 0.7, 0.6, 0.5, 0.40)),
)
GENERIC_RGB: dict[str, Corruption] = _table(
    gaussian_noise=("gaussian_noise", (0.04, 0.08, 0.12, 0.18, 0.26)),
    defocus_blur=("defocus_blur", ((4, 0.1), (5, 0.2), (6, 0.3), (7, 0.4), (8, 0.5))),
    brightness_up=("brightness", (1.1, 1.2, 1.3, 1.4, 1.5)),
    brightness_down=("brightness", (0.9, 0.8, 0.7, 0.6, 0.5)),
    contrast_up=("contrast", (1.1, 1.2, 1.3, 1.4, 1.6)),
    contrast_down=("contrast", (0.8, 0.7, 0.6, 0.5, 0.4)),
    jpeg_compression=("jpeg_compression", (30, 20, 15, 10, 7)),
    pixelate=("pixelate", (0.7, 0.5, 0.40, 0.30, 0.25)),
)


def corruptions_for(dataset: str | None, channels: int = 1) -> dict[str, Corruption]:
    """The corruptions MedMNIST-C defines for ``dataset`` (a MedMNIST flag), in its order; for anything else (a
    class folder, a packed npz, ``None``), :data:`GENERIC_GRAY` or :data:`GENERIC_RGB` by ``channels``."""
    if dataset in MEDMNIST_C:
        return dict(MEDMNIST_C[dataset])
    if channels not in (1, 3):
        raise ConfigError(f"images must have 1 or 3 channels, got {channels}")
    return dict(GENERIC_RGB if channels == 3 else GENERIC_GRAY)


def corruption_set_name(dataset: str | None, channels: int = 1) -> str:
    """``dataset`` when MedMNIST-C covers it, else ``"generic_gray"`` / ``"generic_rgb"``."""
    return dataset if dataset in MEDMNIST_C else ("generic_rgb" if channels == 3 else "generic_gray")


def check_severities(severities: Iterable[int]) -> tuple[int, ...]:
    """Severities as a sorted tuple of distinct integers in 1..5; one ConfigError line otherwise."""
    out = []
    for s in severities:
        if isinstance(s, bool) or not isinstance(s, (int, np.integer)) or not 1 <= int(s) <= 5:
            raise ConfigError(f"severities are integers 1..5 (MedMNIST-C's five levels), got {s!r}")
        out.append(int(s))
    if not out:
        raise ConfigError("give at least one severity (1..5)")
    return tuple(sorted(set(out)))


def corrupt(images: np.ndarray, corruption: Corruption, severity: int, *,
            seed: int | Sequence[int] = 0) -> np.ndarray:
    """Apply ``corruption`` at ``severity`` (1..5) to uint8 images ``(N, H, W)`` (grayscale) or ``(N, H, W, 3)``;
    returns uint8 images of the same shape. The same ``seed`` gives the same images. Grayscale images are corrupted
    as RGB copies and brought back with Pillow's luma, as MedMNIST-C does."""
    x = np.asarray(images)
    if x.dtype != np.uint8 or not (x.ndim == 3 or (x.ndim == 4 and x.shape[-1] == 3)):
        raise ConfigError(f"corruptions take uint8 images of shape (N, H, W) or (N, H, W, 3), got {x.dtype} "
                          f"{x.shape}")
    check_severities([severity])
    if corruption.kind not in KINDS:
        raise ConfigError(f"unknown corruption kind {corruption.kind!r}; known: {', '.join(KINDS)}")
    gray = x.ndim == 3
    rgb = np.repeat(x[..., None], 3, axis=-1) if gray else x
    if len(rgb) == 0:
        return x.copy()
    h, w = rgb.shape[1:3]
    scale = math.sqrt(h * w) / REFERENCE_SIDE
    rng = _rng(seed, corruption.name, severity)
    out = KINDS[corruption.kind](rgb, corruption.params[severity - 1], rng, scale)
    return _luma(out) if gray else out


# ----------------------------------------------------------------------------------------------- augmentation
def random_corruptions(images: np.ndarray, corruptions: Mapping[str, Corruption] | Sequence[Corruption], p: float,
                       seed: int, rows: slice | None = None) -> np.ndarray:
    """Training augmentation: each uint8 image of ``images`` ``(N, H, W)`` or ``(N, H, W, 3)`` is corrupted with
    probability ``p`` by one of ``corruptions`` drawn uniformly, at a severity drawn uniformly from 1..5; returns a
    new array (the input is left as it is).

    Which images, which corruption and which severity are drawn for all ``N`` images from ``seed``; image ``i`` is
    then corrupted with the seed ``(seed, i)``, on its own. ``rows``: corrupt only these rows (the others are
    returned unchanged), with the same pixels as without ``rows`` (a data-parallel process keeps its shard of one
    global batch)."""
    table = list(corruptions.values()) if isinstance(corruptions, Mapping) else list(corruptions)
    if not table:
        raise ConfigError("give at least one corruption")
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p <= 1.0:
        raise ConfigError(f"the corruption probability must be in [0, 1], got {p!r}")
    x = np.asarray(images)
    if x.dtype != np.uint8 or not (x.ndim == 3 or (x.ndim == 4 and x.shape[-1] == 3)):
        raise ConfigError(f"corruptions take uint8 images of shape (N, H, W) or (N, H, W, 3), got {x.dtype} "
                          f"{x.shape}")
    n = len(x)
    rng = np.random.default_rng(int(seed))
    hit = rng.random(n) < p
    which = rng.integers(0, len(table), size=n)
    severity = rng.integers(1, len(SEVERITIES) + 1, size=n)
    out = x.copy()
    for i in range(n)[rows if rows is not None else slice(None)]:
        if hit[i]:
            out[i] = corrupt(x[i:i + 1], table[which[i]], int(severity[i]), seed=(int(seed), i))[0]
    return out
