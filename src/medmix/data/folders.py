"""Datasets without official splits: a folder with one sub-folder per class, or the same packed as an npz of
``images`` / ``labels`` / ``classes`` (as Medical MNIST / MedNIST ships in ``mednist.npz``).

Both get a seeded, stratified 70/15/15 split (``make_split``) that the trainer saves as ``split.json`` next to the
run, so evaluation later uses exactly the same images.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch
from sklearn.model_selection import train_test_split

from ..atomic import atomic_write_text
from ..errors import DataError, ImageError
from ..imaging import image_header
from .images import IMAGE_SUFFIXES, load_image
from .medmnist import open_npz

SPLIT_FRACTIONS = (0.70, 0.15, 0.15)


def read_packed_npz(path: Path) -> tuple[torch.Tensor, np.ndarray, list[str]]:
    """``images`` (N, H, W) or (N, H, W, 3) uint8, ``labels`` (N,) int, ``classes`` (K,) str."""
    with open_npz(path, ("images", "labels", "classes"), "a packed dataset has images, labels, classes") as npz:
        try:
            images, labels, classes = npz["images"], npz["labels"], [str(c) for c in npz["classes"]]
        except Exception as e:  # a damaged member: zlib.error, BadZipFile (CRC), ValueError, EOFError, ...
            raise DataError(f"{path}: cannot read the arrays ({type(e).__name__}: {e})") from None
    if images.dtype != np.uint8 or images.ndim not in (3, 4) or (images.ndim == 4 and images.shape[-1] != 3):
        raise DataError(f"{path}: images must be uint8 (N, H, W) or (N, H, W, 3), got {images.dtype} "
                        f"{images.shape}")
    if len(labels) != len(images) or labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{path}: labels must be (N,) integers matching {len(images)} images, got "
                        f"{labels.dtype} {labels.shape}")
    if len(images) == 0:
        raise DataError(f"{path}: the dataset is empty")
    if labels.min() < 0 or labels.max() >= len(classes):
        raise DataError(f"{path}: labels must lie in 0..{len(classes) - 1}, found {labels.min()}..{labels.max()}")
    x = images[:, None] if images.ndim == 3 else images.transpose(0, 3, 1, 2)
    return torch.from_numpy(np.ascontiguousarray(x)), labels.astype(np.int64), classes


def read_class_folders(root: Path, size: int | None = None) -> tuple[torch.Tensor, np.ndarray, list[str]]:
    """Decode every image below ``root/<class>/`` (PNG, JPEG, ..., DICOM: :data:`IMAGE_SUFFIXES`, mixed as they
    come); grayscale unless some image has colour; resized to ``size`` (default: the most common side length)."""
    if not root.is_dir():
        raise DataError(f"{root}: not a directory")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if len(classes) < 2:
        raise DataError(f"{root}: expected one sub-folder per class (at least 2), found {len(classes)}")
    files: list[tuple[Path, int]] = []
    for k, c in enumerate(classes):
        found = sorted(p for p in (root / c).rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not found:
            raise DataError(f"{root / c}: class folder has no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
        files += [(p, k) for p in found]
    colour, sides = False, []
    for p, _ in files[:: max(1, len(files) // 200)]:  # a sample decides channels and size, from the headers
        try:
            w, h, c = image_header(p)  # PNG/JPEG/... by PIL, DICOM by pydicom (Rows, Columns, samples)
        except ImageError:  # a .npy array or a broken file: the decoding below names a broken one
            continue
        colour |= c == 3
        sides.append(min(w, h))
    n_channels = 3 if colour else 1
    if size is None:
        size = int(np.bincount(sides).argmax()) if sides else 64
    images = torch.empty((len(files), n_channels, size, size), dtype=torch.uint8)
    for i, (p, _) in enumerate(files):
        try:
            images[i] = load_image(p, n_channels, size)
        except ImageError as e:
            raise DataError(f"{e} (remove it or fix it)") from None
    return images, np.array([k for _, k in files], dtype=np.int64), classes


def labels_fingerprint(labels: np.ndarray) -> str:
    return hashlib.md5(np.ascontiguousarray(labels, dtype=np.int64).tobytes()).hexdigest()


def make_split(labels: np.ndarray, seed: int, fractions: tuple[float, float, float] = SPLIT_FRACTIONS
               ) -> dict[str, np.ndarray]:
    """Stratified train/val/test indices; the same labels and seed always give the same split."""
    idx = np.arange(len(labels))
    counts = np.bincount(labels)
    stratify = labels if counts[counts > 0].min() >= 3 else None
    try:
        train, rest = train_test_split(idx, train_size=fractions[0], random_state=seed, stratify=stratify)
        val_share = fractions[1] / (fractions[1] + fractions[2])
        val, test = train_test_split(rest, train_size=val_share, random_state=seed,
                                     stratify=_rest_strata(labels[rest]) if stratify is not None else None)
    except ValueError as e:
        raise DataError(f"cannot split {len(labels)} images 70/15/15 ({e})") from None
    return {"train": np.sort(train), "val": np.sort(val), "test": np.sort(test)}


def _rest_strata(rest_labels: np.ndarray) -> np.ndarray:
    """Strata for splitting the held-out 30% into val/test. A class with 3-5 images leaves a single image there,
    which a stratified split cannot place; such singletons share one stratum (or join the largest class)."""
    key = rest_labels.copy()
    rare = np.bincount(key)[key] < 2
    if rare.any():
        common = key[~rare]
        key[rare] = -1 if rare.sum() >= 2 or len(common) == 0 else np.bincount(common).argmax()
    return key


def save_split(path: Path, split: dict[str, np.ndarray], seed: int, labels: np.ndarray, source: str) -> None:
    doc = {"seed": seed, "source": source, "n": int(len(labels)), "labels_md5": labels_fingerprint(labels),
           **{k: v.tolist() for k, v in split.items()}}
    atomic_write_text(path, json.dumps(doc))


def load_split(path: Path, labels: np.ndarray) -> dict[str, np.ndarray]:
    try:
        doc = json.loads(path.read_text())
        split = {k: np.asarray(doc[k], dtype=np.int64) for k in ("train", "val", "test")}
    except (OSError, ValueError, KeyError) as e:
        raise DataError(f"{path}: not a valid split file ({e})") from None
    if doc.get("labels_md5") != labels_fingerprint(labels):
        raise DataError(f"{path}: the split was made for different data (labels differ); retrain or remove it")
    return split
