"""Decode one user image (file, bytes, PIL image or array) into uint8 ``(C, H, W)`` the way training data look.

Torch-free (NumPy and PIL only), so the ONNX Runtime server (:mod:`medmix.serve.onnx_backend`) and the torch
path (:func:`medmix.data.images.load_image`) decode with the very same code.

Training images are uint8, 1 or 3 channels, at the dataset's stored size. A user image is converted the same way:
EXIF orientation applied, 16-bit and float images rescaled to 0..255, alpha composited on black, palette expanded,
then converted to grayscale or RGB to match the model and resized (area-averaging when shrinking, bicubic when
enlarging) to its stored size. Anything that cannot be decoded raises :class:`ImageError` with the reason (and
nothing else: the decoder path is fuzzed with random and mutated image bytes in the tests). Images of more than
``max_pixels`` pixels (default ``MAX_PIXELS``, width x height, e.g. 10000x10000 = 100 M) raise
:class:`ImageTooLarge` from their header, before any pixel is decoded, which also stops decompression bombs (a
small file declaring huge dimensions).

The answer of one image (:func:`describe`: label, confidence, distribution; :func:`format_answer`: as text), the
blank-image statistic (:func:`pixel_std`) and the picture under a Grad-CAM heatmap (:func:`enlarged_rgb`) are here
too, torch-free, so the torch predictors and the ONNX Runtime one (and the server) share the code.
"""
from __future__ import annotations

import contextlib
import io
import math
import os
import sys
import threading
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import ConfigError, ImageError
from .task_kinds import MULTI_LABEL, ORDINAL

__all__ = ["IMAGE_SUFFIXES", "MAX_PIXELS", "ImageTooLarge", "as_inputs", "describe", "enlarged_rgb",
           "format_answer", "image_size", "load_image_np", "open_image", "per_class", "pixel_std"]

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".gif", ".webp", ".npy"}
MAX_PIXELS = 50_000_000  # decompression-bomb guard: refuse images with more pixels than this
# warnings.catch_warnings() saves and restores the process-wide warning filters: two threads decoding at once (the
# server) could restore each other's state and leave PIL's warnings silenced, or not, for good. One decode at a time.
_DECODE_LOCK = threading.RLock()


class ImageTooLarge(ImageError):
    """An image with more pixels than allowed (a possible decompression bomb); the server answers 413."""


def image_size(data: bytes, name: str = "image") -> tuple[int, int] | None:
    """``(width, height)`` read from the image header without decoding the pixels; None for .npy arrays.
    Raises :class:`ImageError` when the bytes are no image PIL can identify."""
    return _decode_bytes(data, name, 0, header_only=True)


def _to_uint8(a: np.ndarray, what: str) -> np.ndarray:
    if a.dtype == np.uint8:
        return a
    if a.dtype == np.bool_:
        return a.astype(np.uint8) * 255
    if not (np.issubdtype(a.dtype, np.integer) or np.issubdtype(a.dtype, np.floating)):
        raise ImageError(f"{what}: unsupported array dtype {a.dtype}")
    a = a.astype(np.float64)
    if not np.isfinite(a).all():
        raise ImageError(f"{what}: the array contains NaN or infinite values")
    lo, hi = float(a.min()), float(a.max())
    if lo >= 0 and hi <= 1.0:  # float image in [0, 1]
        a = a * 255.0
    elif lo < 0 or hi > 255:  # 16-bit or arbitrary range: stretch to 0..255
        a = (a - lo) / (hi - lo if hi > lo else 1.0) * 255.0
    return np.clip(np.rint(a), 0, 255).astype(np.uint8)


def _array_to_pil(a: np.ndarray, what: str, max_pixels: int) -> Image.Image:
    if a.ndim == 3 and a.shape[0] in (1, 3, 4) and a.shape[-1] not in (1, 3, 4):
        a = np.moveaxis(a, 0, -1)  # CHW -> HWC
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[-1] not in (3, 4)):
        raise ImageError(f"{what}: expected an array of shape (H, W), (H, W, C) or (C, H, W) with C in 1/3/4, "
                         f"got {a.shape}")
    if min(a.shape[:2]) < 1:
        raise ImageError(f"{what}: empty image of shape {a.shape}")
    if a.shape[0] * a.shape[1] > max_pixels:
        raise ImageTooLarge(f"{what}: {a.shape[1]}x{a.shape[0]} pixels is more than the limit of {max_pixels:,}")
    return Image.fromarray(_to_uint8(a, what))


def _load_npy(data: bytes, what: str) -> np.ndarray:
    try:
        return np.load(io.BytesIO(data), allow_pickle=False)
    except Exception as e:  # numpy raises ValueError/OSError/EOFError for bad files  # noqa: BLE001
        raise ImageError(f"{what}: not a valid .npy array ({e})") from None


@contextlib.contextmanager
def _native_stderr_silenced(data: bytes):
    """libtiff prints warnings about damaged files straight to file descriptor 2, around the one-line error the CLI
    gives; silence it while a TIFF is decoded. Only in a single-threaded process (the CLI), where redirecting the
    descriptor cannot swallow another thread's output."""
    if data[:4] not in (b"II*\x00", b"MM\x00*") or threading.active_count() > 1:
        yield
        return
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):
        yield
        return
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _decode_bytes(data: bytes, what: str, max_pixels: int, header_only: bool = False) -> Any:
    """The decoded image, or with ``header_only`` its ``(width, height)`` (None for a .npy array)."""
    if not data:
        raise ImageError(f"{what}: the file is empty")
    if data[:6] == b"\x93NUMPY":
        return None if header_only else _array_to_pil(_load_npy(data, what), what, max_pixels)
    try:
        with _DECODE_LOCK, warnings.catch_warnings(), _native_stderr_silenced(data):
            # PIL warns on stderr about damaged files ("Truncated File Read", "Corrupt EXIF data") and above its own
            # pixel limit (MAX_PIXELS below is lower): the outcome is a decoded image or one ImageError, not noise
            warnings.simplefilter("ignore")
            img = Image.open(io.BytesIO(data))
            w, h = img.size
            if header_only:
                return w, h
            if w * h > max_pixels:
                raise ImageTooLarge(f"{what}: {w}x{h} pixels is more than the limit of {max_pixels:,}")
            img = ImageOps.exif_transpose(img)
            img.load()
    except ImageError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageTooLarge(f"{what}: refused as a possible decompression bomb ({e})") from None
    except UnidentifiedImageError:
        raise ImageError(f"{what}: not a readable image (unknown or unsupported format)") from None
    except MemoryError:
        raise ImageError(f"{what}: not enough memory to decode the image") from None
    except Exception as e:  # decoders of damaged files raise OSError, SyntaxError, ValueError, struct.error, ...  # noqa: BLE001
        raise ImageError(f"{what}: not a readable image ({type(e).__name__}: {e})") from None
    return img


def open_image(src: Any, what: str, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """A PIL image from a PIL image, a NumPy array, bytes (an encoded image or a .npy file) or a path."""
    if isinstance(src, Image.Image):
        return src
    if isinstance(src, np.ndarray):
        return _array_to_pil(src, what, max_pixels)
    if isinstance(src, (bytes, bytearray)):
        return _decode_bytes(bytes(src), what, max_pixels)
    if not isinstance(src, (str, os.PathLike)):
        raise ImageError(f"{what}: expected a file path, bytes, a PIL image or an array, got {type(src).__name__}")
    path = Path(os.fspath(src))
    if path.is_dir():
        raise ImageError(f"{path}: is a directory, expected an image file")
    if not path.exists():
        raise ImageError(f"{path}: no such file")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ImageError(f"{path}: cannot read ({e.strerror or e})") from None
    if path.suffix.lower() == ".npy":
        return _array_to_pil(_load_npy(data, what), what, max_pixels)
    return _decode_bytes(data, what, max_pixels)


def _to_mode(img: Image.Image, n_channels: int) -> Image.Image:
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        img = Image.fromarray(_to_uint8(np.asarray(img), "image"))
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA"):
        background = Image.new("RGB", img.size, (0, 0, 0))
        background.paste(img.convert("RGBA"), mask=img.convert("RGBA").split()[-1])
        img = background
    return img.convert("L" if n_channels == 1 else "RGB")


def load_image_np(src: Any, n_channels: int, size: int | None = None, name: str | None = None,
                  max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Decode ``src`` into a uint8 array ``(C, size, size)`` (or its own size when ``size`` is None)."""
    what = name or (os.fspath(src) if isinstance(src, (str, os.PathLike)) else "image")
    img = open_image(src, what, max_pixels)
    try:
        with _DECODE_LOCK, warnings.catch_warnings():  # (see _decode_bytes)
            warnings.simplefilter("ignore")
            img = _to_mode(img, n_channels)
        if size is not None and img.size != (size, size):
            img = img.resize((size, size), Image.Resampling.BOX if min(img.size) > size else Image.Resampling.BICUBIC)
    except ImageError:
        raise
    except Exception as e:  # a mode PIL cannot convert (e.g. LAB), a damaged lazily decoded frame, ...  # noqa: BLE001
        raise ImageError(f"{what}: cannot convert the {img.mode} image ({type(e).__name__}: {e})") from None
    a = np.asarray(img, dtype=np.uint8)
    a = a[None] if a.ndim == 2 else a.transpose(2, 0, 1)
    return np.array(a, order="C", copy=True)  # writable and contiguous (PIL's buffer is read-only)


def pixel_std(images: Any) -> np.ndarray:
    """Per uint8 image ``(C, H, W)`` (or ``(H, W)``), the float64 population standard deviation of its pixel values
    within each channel, averaged over the channels (0 for a constant image of any colour): the statistic of the
    blank-image guard of :mod:`medmix.ood`."""
    x = np.asarray(images)
    if len(x) == 0:
        return np.zeros(0)
    return x.reshape(len(x), x.shape[1] if x.ndim == 4 else 1, -1).astype(np.float64).std(2).mean(1)


def enlarged_rgb(image: np.ndarray, side: int) -> np.ndarray:
    """uint8 ``(C, H, W)`` -> float32 RGB ``(h, w, 3)`` in [0, 1], enlarged by an integer factor (nearest neighbour)
    to at least ``side`` pixels (the server's Grad-CAM overlay and the explain panel draw on it)."""
    a = image.astype(np.float32) / 255.0
    a = (np.repeat(a, 3, axis=0) if a.shape[0] == 1 else a[:3]).transpose(1, 2, 0)
    f = max(1, math.ceil(side / max(a.shape[:2])))
    return np.repeat(np.repeat(a, f, axis=0), f, axis=1)


# ----------------------------------------------------------------------------------------------- answers
def as_inputs(inputs: Any) -> tuple[list, list[str]]:
    """One input (a path, bytes or a PIL image, not its characters) or a collection of them -> the list of inputs
    and their names (the path, else ``image[i]``)."""
    items = [inputs] if isinstance(inputs, (str, bytes, bytearray, os.PathLike, Image.Image)) else list(inputs)
    if not items:
        raise ConfigError("no images given")
    return items, [os.fspath(x) if isinstance(x, (str, os.PathLike)) else f"image[{i}]" for i, x in enumerate(items)]


def per_class(t: float | Sequence[float], k: int) -> list[float]:
    """A threshold (one number, or one per class) as ``k`` floats."""
    return [float(v) for v in t] if isinstance(t, (list, tuple)) else [float(t)] * k


def describe(p: Any, class_names: Sequence[str], task: str, thresholds: Sequence[float], top_k: int | None = None,
             ordinal_mode: str = "argmax") -> dict:
    """One image's answer from its calibrated probabilities ``(K,)`` (an array or a CPU tensor): ``label``,
    ``index``, ``confidence`` (rounded to 6 digits) and ``probabilities`` (the ``top_k`` most probable first, all
    when None). Multi-label: ``label`` joins the classes above their threshold (``labels``, ``present``,
    ``thresholds``); ordinal adds ``expected_grade`` and, with ``ordinal_mode="expected"``, answers its rounding."""
    p = np.asarray(p, np.float64)
    order = np.argsort(-p, kind="stable")[:top_k or None].tolist()
    dist = {class_names[k]: round(float(p[k]), 6) for k in order}
    if task == MULTI_LABEL:
        present = {class_names[k]: float(p[k]) > thresholds[k] for k in range(len(p))}
        yes = [c for c in dist if present[c]]
        return {"label": ", ".join(yes) if yes else "(none)", "index": None, "confidence": round(float(p.max()), 6),
                "labels": yes, "present": present, "thresholds": dict(zip(class_names, thresholds)),
                "probabilities": dist}
    k = int(np.argmax(p))
    out = {"label": class_names[k], "index": k, "confidence": round(float(p[k]), 6), "probabilities": dist}
    if task == ORDINAL:
        grade = float((p * np.arange(len(p))).sum())
        out["expected_grade"] = round(grade, 4)
        if ordinal_mode == "expected":
            k = min(len(p) - 1, int(grade + 0.5))
            out.update(label=class_names[k], index=k, confidence=round(float(p[k]), 6))
    return out


def format_answer(r: dict, first: str, unlike: str) -> str:
    """A readable block of one answer: the line ``first``, a warning when out of distribution (the image ``unlike``
    the training data), the expected grade and the distribution sorted by probability (multi-label: yes/no)."""
    lines = [first]
    if r.get("in_distribution") is False:
        lines.append(f"  WARNING: out of distribution (OOD score {r['ood_score']:.4g}): this image {unlike}; do not "
                     f"trust the label")
    if "expected_grade" in r:
        lines.append(f"  expected grade {r['expected_grade']:.2f}")
    w = max(len(c) for c in r["probabilities"])
    for c, p in r["probabilities"].items():
        mark = ("  yes" if r["present"][c] else "  no") if "present" in r else ""
        lines.append(f"  {c:<{w}}  {p:7.2%}  {'#' * int(round(p * 30))}{mark}")
    return "\n".join(lines)
