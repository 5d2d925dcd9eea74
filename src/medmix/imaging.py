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

DICOM files (the ``DICM`` marker at byte 128, or a ``.dcm`` / ``.dicom`` name) are read with pydicom on the same
path, so predict, explain, the server and class-folder training take them alike: the modality LUT (rescale slope and
intercept) is applied, then the file's own window (centre/width, the first when there are several; the DICOM VOI
formula via pydicom) or, without one, a 0.5-99.5 percentile window maps the values to 0..255; MONOCHROME1 is
inverted, PALETTE COLOR expanded and YBR converted to RGB. Files without pixels, multi-frame files and compressed
transfer syntaxes that no installed pydicom plugin decodes are refused with one line (:class:`DicomError`).

The answer of one image (:func:`describe`: label, confidence, distribution; :func:`format_answer`: as text), the
blank-image statistic (:func:`pixel_std`), the picture under a Grad-CAM heatmap (:func:`enlarged_rgb`) and the heatmap
drawn over it (:func:`cam_overlay`: per-pixel opacity rising with the map, the Turbo colour map) are here too,
torch-free and matplotlib-free, so the torch predictors and the ONNX Runtime one (and the server) share the code.
"""
from __future__ import annotations

import contextlib
import io
import math
import os
import sys
import threading
import warnings
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import ConfigError, ImageError
from .task_kinds import MULTI_LABEL, ORDINAL

__all__ = ["CAM_ALPHA_MAX", "CAM_COLORMAP", "CAM_LUT", "DICOM_SUFFIXES", "IMAGE_SUFFIXES", "MAX_PIXELS", "DicomError",
           "ImageTooLarge", "as_inputs", "cam_colors", "cam_overlay", "describe", "enlarged_rgb", "format_answer",
           "image_header", "image_size", "is_dicom", "load_image_np", "open_image", "per_class", "pixel_std",
           "resize_cam"]

DICOM_SUFFIXES = {".dcm", ".dicom"}
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".gif", ".webp", ".npy", *DICOM_SUFFIXES}
MAX_PIXELS = 50_000_000  # decompression-bomb guard: refuse images with more pixels than this
# warnings.catch_warnings() saves and restores the process-wide warning filters: two threads decoding at once (the
# server) could restore each other's state and leave PIL's warnings silenced, or not, for good. One decode at a time.
_DECODE_LOCK = threading.RLock()


class ImageTooLarge(ImageError):
    """An image with more pixels than allowed (a possible decompression bomb); the server answers 413."""


class DicomError(ImageError):
    """A DICOM file medmix cannot take: not valid, truncated, without pixels, multi-frame or compressed in a transfer
    syntax no installed pydicom plugin decodes. An :class:`ImageError`, so the CLI and the server treat it alike."""


def image_size(data: bytes, name: str = "image") -> tuple[int, int] | None:
    """``(width, height)`` read from the image header without decoding the pixels; None for .npy arrays.
    Raises :class:`ImageError` when the bytes are no image PIL (or, for DICOM, pydicom) can identify; a DICOM file
    that would be refused on decoding (no pixels, several frames, no decoder) is refused here already."""
    wh = _decode_bytes(data, name, 0, header_only=True)
    return None if wh is None else wh[:2]


_COLOUR_MODES = {"RGB", "RGBA", "P", "CMYK", "YCbCr"}  # the modes a class folder counts as colour


def image_header(src: str | os.PathLike) -> tuple[int, int, int]:
    """``(width, height, channels)`` of an image file from its header (channels 3 when it has colour, else 1), for
    the class-folder probe that chooses the dataset's channels and size without decoding every image. Raises
    :class:`ImageError` for .npy arrays and files that are no readable image."""
    path = Path(os.fspath(src))
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ImageError(f"{path}: cannot read ({e.strerror or e})") from None
    whc = _decode_bytes(data, str(path), 0, header_only=True)
    if whc is None:
        raise ImageError(f"{path}: a .npy array has no image header")
    return whc


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
    """The decoded image, or with ``header_only`` its ``(width, height, channels)`` (None for a .npy array)."""
    if not data:
        raise ImageError(f"{what}: the file is empty")
    if data[:6] == b"\x93NUMPY":
        return None if header_only else _array_to_pil(_load_npy(data, what), what, max_pixels)
    if is_dicom(data, what):
        return _decode_dicom(data, what, max_pixels, header_only)
    try:
        with _DECODE_LOCK, warnings.catch_warnings(), _native_stderr_silenced(data):
            # PIL warns on stderr about damaged files ("Truncated File Read", "Corrupt EXIF data") and above its own
            # pixel limit (MAX_PIXELS below is lower): the outcome is a decoded image or one ImageError, not noise
            warnings.simplefilter("ignore")
            img = Image.open(io.BytesIO(data))
            w, h = img.size
            if header_only:
                return w, h, 3 if img.mode in _COLOUR_MODES else 1
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


# ----------------------------------------------------------------------------------------------- DICOM
# a deflated DICOM data set is inflated whole by pydicom before any header check: refuse one that would inflate to
# more than the largest image allowed could need (MAX_PIXELS pixels x 3 samples x 2 bytes, plus its header)
_DICOM_INFLATE_LIMIT = 6 * MAX_PIXELS + (16 << 20)
_DEFLATED_UID = b"1.2.840.10008.1.2.1.99"
_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
_MONOCHROME = ("MONOCHROME1", "MONOCHROME2")
# YBR_FULL(_422) are converted to RGB by pydicom's decoders; JPEG 2000's YBR_ICT / YBR_RCT by the codec itself
_COLOUR = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT")


def is_dicom(data: bytes, name: str = "") -> bool:
    """A DICOM Part 10 file: the ``DICM`` marker after the 128-byte preamble, or a name ending ``.dcm`` / ``.dicom``
    (so that a damaged one is refused as a DICOM file, with the reason, rather than as an unknown format)."""
    return data[128:132] == b"DICM" or Path(name).suffix.lower() in DICOM_SUFFIXES


def _pydicom():
    try:
        import pydicom
        import pydicom.pixels
    except ImportError:
        raise ImageError('reading DICOM files needs pydicom: pip install "pydicom>=3.0,<4"') from None
    return pydicom


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def _check_deflated(data: bytes, what: str) -> None:
    """Stop a deflate bomb before pydicom inflates the data set: inflate it in pieces, keeping only the count."""
    if data[132:138] != b"\x02\x00\x00\x00UL":  # no File Meta Information Group Length: pydicom decides
        return
    meta_end = 144 + int.from_bytes(data[140:144], "little")
    if _DEFLATED_UID not in data[144:meta_end]:
        return
    inflater, rest, total = zlib.decompressobj(-zlib.MAX_WBITS), data[meta_end:], 0
    try:
        while rest and not inflater.eof:
            total += len(inflater.decompress(rest, 1 << 22))
            rest = inflater.unconsumed_tail
            if total > _DICOM_INFLATE_LIMIT:
                raise ImageTooLarge(f"{what}: the deflated DICOM data set inflates to more than "
                                    f"{_DICOM_INFLATE_LIMIT:,} bytes (a possible decompression bomb)")
    except zlib.error as e:
        raise DicomError(f"{what}: not a valid DICOM file (the deflated data set is damaged: {e})") from None


def _read_dicom(data: bytes, what: str, header_only: bool) -> Any:
    """The pydicom data set (with ``header_only``, large values such as the pixels are skipped, not read), checked
    for everything that can be refused before decoding: truncation, no pixels, several frames, no decoder."""
    pydicom = _pydicom()
    if data[128:132] != b"DICM":
        raise DicomError(f"{what}: not a valid DICOM file (no 'DICM' marker at byte 128: a DICOM file starts with a "
                         f"128-byte preamble and 'DICM')")
    _check_deflated(data, what)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            ds = pydicom.dcmread(io.BytesIO(data), defer_size=1024 if header_only else None)
            meta = ds.file_meta
            ts = meta.get("TransferSyntaxUID")
            elements = [ds.get_item(tag, keep_deferred=True) for tag in ds.keys()]  # raw: offsets and lengths
        except ImageError:
            raise
        except MemoryError:
            raise ImageError(f"{what}: not enough memory to read the DICOM file") from None
        except Exception as e:  # pydicom raises InvalidDicomError, ValueError, struct.error, ... for damaged files  # noqa: BLE001
            raise DicomError(f"{what}: not a valid DICOM file ({type(e).__name__}: {_one_line(e)})") from None
    # pydicom reads a short value without complaint and warns when a sequence or encapsulated data runs off the end
    if any("End of file" in str(w.message) for w in caught):
        raise DicomError(f"{what}: truncated DICOM file (it ends inside a data element)")
    if ts is None:
        raise DicomError(f"{what}: not a valid DICOM file (the file meta information has no Transfer Syntax UID)")
    if ts != pydicom.uid.DeflatedExplicitVRLittleEndian:  # offsets of a deflated data set are in the inflated one
        for elem in elements:
            end = getattr(elem, "value_tell", 0) + getattr(elem, "length", 0)
            if getattr(elem, "length", 0) != 0xFFFFFFFF and end > len(data):
                raise DicomError(f"{what}: truncated DICOM file ({elem.tag} needs {end - len(data):,} more bytes than "
                                 f"the file has)")
    if not any(k in ds for k in _PIXEL_KEYWORDS):
        sop = ds.get("SOPClassUID")
        if sop is None or "Rows" in ds or "Image" in getattr(sop, "name", ""):  # an image that ends early
            raise DicomError(f"{what}: no pixel data in this DICOM file{f' ({sop.name})' if sop else ''}; the file "
                             f"may be truncated")
        raise DicomError(f"{what}: no pixel data in this DICOM file ({sop.name}): medmix classifies images, this "
                         f"DICOM object holds none")
    try:
        rows, cols = int(ds.get("Rows") or 0), int(ds.get("Columns") or 0)
        samples, frames = int(ds.get("SamplesPerPixel") or 1), int(ds.get("NumberOfFrames") or 1)
        photometric = str(ds.get("PhotometricInterpretation") or "").strip().upper()
    except (TypeError, ValueError) as e:
        raise DicomError(f"{what}: invalid DICOM image attributes ({_one_line(e)})") from None
    if rows < 1 or cols < 1:
        raise DicomError(f"{what}: the DICOM image has {rows} rows and {cols} columns")
    if frames > 1:
        raise DicomError(f"{what}: {frames} frames; medmix reads single-frame images: export the frame you want")
    if not (samples == 1 and photometric in (*_MONOCHROME, "PALETTE COLOR") or
            samples == 3 and photometric in _COLOUR):
        raise DicomError(f"{what}: unsupported DICOM image: {samples} sample(s) per pixel with photometric "
                         f"interpretation {photometric or '(none)'} (medmix reads MONOCHROME1/2, PALETTE COLOR, RGB "
                         f"and YBR_FULL(_422)/YBR_ICT/YBR_RCT)")
    try:
        decoder = pydicom.pixels.get_decoder(ts)
    except NotImplementedError:
        raise DicomError(f"{what}: pixel data in the transfer syntax {ts.name} ({ts}), which pydicom has no decoder "
                         f"for") from None
    if not decoder.is_available:
        raise DicomError(f"{what}: pixel data compressed as {ts.name} and no installed decoder handles it; install a "
                         f"pydicom plugin: {'; '.join(decoder.missing_dependencies)}")
    return ds, decoder, (cols, rows, 1 if samples == 1 and photometric in _MONOCHROME else 3)


def _window(x: np.ndarray, ds: Any) -> np.ndarray:
    """Monochrome values after the modality LUT -> float 0..255: the file's window (centre/width, the first of
    several, its VOI LUT function) or, without one or with an unusable one, the 0.5-99.5 percentile range."""
    from pydicom.dataset import Dataset
    from pydicom.pixels import apply_windowing

    if ds.get("WindowCenter") not in (None, "") and ds.get("WindowWidth") not in (None, ""):
        # pydicom's windowing outputs the range of the stored values; a stand-in 8-bit unsigned, not rescaled data
        # set makes that 0..255 (the same DICOM formula, the output range chosen)
        voi = Dataset()
        voi.PhotometricInterpretation, voi.BitsStored, voi.PixelRepresentation = "MONOCHROME2", 8, 0
        voi.WindowCenter, voi.WindowWidth = ds.WindowCenter, ds.WindowWidth
        if ds.get("VOILUTFunction"):
            voi.VOILUTFunction = ds.VOILUTFunction
        try:
            return apply_windowing(x.astype(np.float64), voi, index=0)
        except Exception:  # a window width below 1, an unknown VOI LUT function, values that are no numbers  # noqa: BLE001
            pass
    lo, hi = (float(v) for v in np.percentile(x, [0.5, 99.5]))
    if hi <= lo:  # (almost) all one value but for a few outliers: the full range
        lo, hi = float(x.min()), float(x.max())
    return (x - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(x, dtype=np.float64)


def _decode_dicom(data: bytes, what: str, max_pixels: int, header_only: bool) -> Any:
    """A DICOM file -> a PIL image (L or RGB), or with ``header_only`` its ``(width, height, channels)``."""
    with _DECODE_LOCK, warnings.catch_warnings():  # (see _decode_bytes) pydicom and NumPy warn about odd files
        warnings.simplefilter("ignore")
        ds, decoder, (w, h, c) = _read_dicom(data, what, header_only)
        if header_only:
            return w, h, c
        if w * h > max_pixels:
            raise ImageTooLarge(f"{what}: {w}x{h} pixels is more than the limit of {max_pixels:,}")
        from pydicom.pixels import apply_color_lut, apply_modality_lut

        try:
            arr, info = decoder.as_array(ds, index=0)  # YBR_FULL(_422) -> RGB
            photometric = str(info.get("photometric_interpretation", ds.PhotometricInterpretation)).upper()
        except MemoryError:
            raise ImageError(f"{what}: not enough memory to decode the DICOM pixel data") from None
        except Exception as e:  # a plugin that refuses this data (e.g. Pillow and 12-bit JPEG), damaged pixel data  # noqa: BLE001
            others = "; ".join(decoder.missing_dependencies)
            raise DicomError(f"{what}: cannot decode the {ds.file_meta.TransferSyntaxUID.name} pixel data "
                             f"({_one_line(e)})" + (f"; other pydicom plugins may: {others}" if others else "")
                             ) from None
        try:
            if photometric == "PALETTE COLOR":
                arr = apply_color_lut(arr, ds)  # RGB, 8 or 16 bits as the palette's entries
            if photometric in _MONOCHROME:
                x = np.asarray(apply_modality_lut(arr, ds), dtype=np.float64)
                if not np.isfinite(x).all():
                    raise DicomError(f"{what}: the pixel data contains NaN or infinite values")
                y = np.clip(np.rint(_window(x, ds)), 0, 255).astype(np.uint8)
                out = 255 - y if photometric == "MONOCHROME1" else y  # MONOCHROME1: low values are white
            elif arr.dtype == np.uint8:  # RGB (or converted YBR, or an 8-bit palette): as it is
                out = arr
            elif photometric == "PALETTE COLOR":  # 16-bit palette entries: their high byte
                out = (arr.astype(np.uint16) >> 8).astype(np.uint8)
            else:  # RGB of more than 8 bits: scaled from the full range of its stored bits
                full = 2.0 ** int(ds.BitsStored) - 1
                out = np.clip(np.rint(arr.astype(np.float64) * (255.0 / full)), 0, 255).astype(np.uint8)
            return Image.fromarray(np.ascontiguousarray(out))
        except ImageError:
            raise
        except Exception as e:  # a broken modality LUT, palette, ...  # noqa: BLE001
            raise DicomError(f"{what}: cannot convert the DICOM pixel data ({type(e).__name__}: {_one_line(e)})"
                             ) from None


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


# ----------------------------------------------------------------------------------------------- Grad-CAM overlay
CAM_ALPHA_MAX = 0.6  # the heatmap's opacity where the map is 1: 40 % of the anatomy still shows under the hottest spot
CAM_COLORMAP = "turbo"
# Google's Turbo colour map (Anton Mikhailov, 2019, Apache-2.0), the 256 entries matplotlib ships as "turbo", as RGB
# bytes: jet's blue -> green -> yellow -> red order that readers of Grad-CAM figures know, without jet's bright bands
# at cyan and yellow that read as edges the map does not have. Kept here so the torch-free server draws it too.
_TURBO_HEX = (
    "30123b32154333184a341b51351e5836215f37246638276d392a733a2d793b2f803c32863d358b3e38913f3b973f3e9c"
    "4040a24143a74146ac4249b1424bb5434eba4451bf4454c34456c74559cb455ccf455ed34661d64664da4666dd4669e0"
    "466be3476ee64771e94773eb4776ee4778f0477bf2467df44680f64682f84685fa4687fb458afc458cfd448ffe4391fe"
    "4294ff4196ff4099ff3e9bfe3d9efe3ba0fd3aa3fc38a5fb37a8fa35abf833adf731aff52fb2f42eb4f22cb7f02ab9ee"
    "28bceb27bee925c0e723c3e422c5e220c7df1fc9dd1ecbda1ccdd81bd0d51ad2d21ad4d019d5cd18d7ca18d9c818dbc5"
    "18ddc218dec018e0bd19e2bb19e3b91ae4b61ce6b41de7b21fe9af20eaac22ebaa25eca727eea42aefa12cf09e2ff19b"
    "32f29835f39438f4913cf58e3ff68a43f78746f8844af8804ef97d52fa7a55fa7659fb735dfc6f61fc6c65fd6969fd66"
    "6dfe6271fe5f75fe5c79fe597dff5680ff5384ff5188ff4e8bff4b8fff4992ff4796fe4499fe429cfe409ffd3fa1fd3d"
    "a4fc3ca7fc3aa9fb39acfb38affa37b1f936b4f836b7f735b9f635bcf534bef434c1f334c3f134c6f034c8ef34cbed34"
    "cdec34d0ea34d2e935d4e735d7e535d9e436dbe236dde037dfdf37e1dd37e3db38e5d938e7d739e9d539ebd339ecd13a"
    "eecf3aefcd3af1cb3af2c93af4c73af5c53af6c33af7c13af8be39f9bc39faba39fbb838fbb637fcb336fcb136fdae35"
    "fdac34fea933fea732fea431fea130fe9e2ffe9b2dfe992cfe962bfe932afe9029fd8d27fd8a26fc8725fc8423fb8122"
    "fb7e21fa7b1ff9781ef9751df8721cf76f1af66c19f56918f46617f36315f26014f15d13f05b12ef5811ed5510ec530f"
    "eb500eea4e0de84b0ce7490ce5470be4450ae2430ae14109df3f08dd3d08dc3b07da3907d83706d63506d43305d23105"
    "d02f05ce2d04cc2b04ca2a04c82803c52603c32503c12302be2102bc2002b91e02b71d02b41b01b21a01af1801ac1701"
    "a91601a71401a41301a112019e10019b0f01980e01950d01920b018e0a018b09028808028507028106027e05027a0403"
)
CAM_LUT = np.frombuffer(bytes.fromhex(_TURBO_HEX), np.uint8).reshape(256, 3).astype(np.float32) / 255.0


def cam_colors(values: Any) -> np.ndarray:
    """Heatmap values in [0, 1] (any shape) -> float32 RGB ``(..., 3)`` of :data:`CAM_LUT`, binned like matplotlib's
    ``ListedColormap`` (``floor(v * 256)``), so a colour bar drawn from the same table shows the very same colours."""
    v = np.clip(np.nan_to_num(np.asarray(values, np.float32)), 0.0, 1.0)
    return CAM_LUT[np.minimum((v * len(CAM_LUT)).astype(np.intp), len(CAM_LUT) - 1)]


def resize_cam(cam: Any, hw: tuple[int, int]) -> np.ndarray:
    """A ``(h, w)`` heatmap -> float32 ``(H, W)`` (bilinear, clipped to [0, 1]); unchanged when already that size."""
    m = np.clip(np.nan_to_num(np.asarray(cam, np.float32)), 0.0, 1.0)
    if m.ndim != 2:
        raise ConfigError(f"a heatmap must be 2-D (H, W), got shape {m.shape}")
    if m.shape == tuple(hw):
        return m
    big = Image.fromarray(m, mode="F").resize((int(hw[1]), int(hw[0])), Image.Resampling.BILINEAR)
    return np.clip(np.asarray(big, np.float32), 0.0, 1.0)


def cam_overlay(rgb: np.ndarray, cam: Any, alpha_max: float = CAM_ALPHA_MAX) -> np.ndarray:
    """The picture under a reader's eyes: float RGB ``(H, W, 3)`` in [0, 1] at full opacity, the heatmap (resized to
    it, see :func:`resize_cam`) composited on top in :func:`cam_colors` with a per-pixel opacity ``alpha_max * cam``.
    Where the map is 0 the pixel is the input's exactly, so the anatomy is never tinted where there is no evidence;
    where it is 1 it is ``(1 - alpha_max) * input + alpha_max * top colour``. A fixed blend over the whole image (the
    usual ``show_cam_on_image``) washes the anatomy out everywhere and paints "no evidence" dark blue instead."""
    if not 0.0 <= float(alpha_max) <= 1.0:
        raise ConfigError(f"alpha_max must be in [0, 1], got {alpha_max}")
    base = np.asarray(rgb, np.float32)
    if base.ndim != 3 or base.shape[-1] != 3:
        raise ConfigError(f"the image under a heatmap must be RGB (H, W, 3), got shape {base.shape}")
    m = resize_cam(cam, base.shape[:2])
    a = (np.float32(alpha_max) * m)[..., None]
    return base * (np.float32(1.0) - a) + cam_colors(m) * a


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


def ood_warning(r: dict, unlike: str = "does not look like the training data") -> str | None:
    """The one-line warning of an out-of-distribution answer (None when in distribution or unknown): the image
    ``unlike`` the training data, which check flagged it (the model's own score, the modality gate or both) and what
    the modality gate takes it for."""
    if r.get("in_distribution") is not False:
        return None
    by = r.get("flagged_by", ["features"])
    why = [f"modality score {r['modality_score']:.4g}"] if "modality" in by and "modality_score" in r else []
    why += [f"OOD score {r['ood_score']:.4g}"] if "features" in by and "ood_score" in r else []
    why += ["blank image"] if "blank" in by else []
    seen = (f"; it looks like a {r['looks_like']} ({r['looks_like_probability']:.0%})" if "looks_like" in r
            and r.get("modality_match") is False else "")
    return f"WARNING: out of distribution ({', '.join(why) or 'flagged'}): this image {unlike}{seen}; do not " \
           f"trust the label"


def format_answer(r: dict, first: str, unlike: str) -> str:
    """A readable block of one answer: the line ``first``, a warning when out of distribution (the image ``unlike``
    the training data), the expected grade and the distribution sorted by probability (multi-label: yes/no)."""
    lines = [first]
    if (w := ood_warning(r, unlike)) is not None:
        lines.append(f"  {w}")
    if "expected_grade" in r:
        lines.append(f"  expected grade {r['expected_grade']:.2f}")
    w = max(len(c) for c in r["probabilities"])
    for c, p in r["probabilities"].items():
        mark = ("  yes" if r["present"][c] else "  no") if "present" in r else ""
        lines.append(f"  {c:<{w}}  {p:7.2%}  {'#' * int(round(p * 30))}{mark}")
    return "\n".join(lines)
