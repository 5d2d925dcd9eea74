"""The official MedMNIST 2D files: ``{flag}.npz`` (28 px) and ``{flag}_{size}.npz`` (64/128/224 px).

Task kind, class names, channels, split sizes, md5s and urls all come from ``medmnist.INFO``.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import DataError
from .tasks import MULTI_LABEL, TaskInfo

SIZES = (28, 64, 128, 224)
SPLITS = ("train", "val", "test")
ASSETS = Path(__file__).resolve().parent.parent / "assets"


def _info() -> dict:
    from medmnist import INFO

    return INFO


def medmnist_flags() -> list[str]:
    """Every 2D flag of the installed medmnist (3D volumes are not images this package classifies)."""
    return [k for k in _info() if not k.endswith("3d")]


def default_root() -> Path:
    from medmnist.info import DEFAULT_ROOT

    return Path(DEFAULT_ROOT)


def task_info(flag: str) -> TaskInfo:
    info = _info()[flag]
    labels = info["label"]
    names = tuple(labels[str(i)] for i in range(len(labels)))
    return TaskInfo(info["task"], names, int(info["n_channels"]))


def file_name(flag: str, size: int) -> str:
    return f"{flag}.npz" if size == 28 else f"{flag}_{size}.npz"


def resolve_data_dir(data_dir: str | os.PathLike | None) -> Path:
    """``data_dir``, else ``$MEDMIX_DATA``, else medmnist's default root."""
    if data_dir is not None:
        return Path(data_dir)
    if os.environ.get("MEDMIX_DATA"):
        return Path(os.environ["MEDMIX_DATA"])
    return default_root()


def locate(flag: str, size: int, data_dir: str | os.PathLike | None, download: bool = False) -> Path:
    """Find ``{flag}[_{size}].npz`` in :func:`resolve_data_dir`.

    The embedded BreastMNIST (28 px) is the last resort for ``breastmnist``. With ``download`` the file is fetched
    through medmnist's url and md5 into that directory.
    """
    if size not in SIZES:
        raise DataError(f"MedMNIST images come in sizes {', '.join(map(str, SIZES))}, not {size}")
    name = file_name(flag, size)
    target = resolve_data_dir(data_dir)
    if (target / name).is_file():
        return target / name
    if flag == "breastmnist" and size == 28 and data_dir is None and (ASSETS / name).is_file():
        return ASSETS / name
    suffix = "" if size == 28 else f"_{size}"
    url, md5 = _info()[flag][f"url{suffix}"], _info()[flag][f"MD5{suffix}"]
    if download:
        try:
            from torchvision.datasets.utils import download_url

            target.mkdir(parents=True, exist_ok=True)
            download_url(url, root=str(target), filename=name, md5=md5)
            return target / name
        except Exception as e:  # network errors come in many types
            raise DataError(f"could not download {name} ({type(e).__name__}: {e}); put the file "
                            f"(md5 {md5}, from {url}) in {target}") from None
    raise DataError(f"{name} not found in {target}: download it from {url} (md5 {md5}) and put it there, "
                    f"pass --data-dir DIR, or add --download when online")


def open_npz(path: Path, expected: Sequence[str] = (), layout: str = "") -> Any:
    """``np.load(path)``, raising DataError for an unreadable file or a missing key of ``expected`` (``layout``
    says which keys the file should have)."""
    try:
        npz = np.load(path, allow_pickle=False)
        files = npz.files  # an .npy array has none
    except Exception as e:
        raise DataError(f"{path}: not a readable npz file ({type(e).__name__}: {e})") from None
    missing = [k for k in expected if k not in files]
    if missing:
        npz.close()
        raise DataError(f"{path}: missing keys {', '.join(missing)} ({layout})")
    return npz


def read_official_npz(path: Path, info: TaskInfo) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Read and validate an npz of the official layout; returns uint8 ``(N, C, H, W)`` images and labels."""
    expected = [f"{s}_{k}" for s in SPLITS for k in ("images", "labels")]
    with open_npz(path, expected, f"an official MedMNIST npz has {', '.join(expected)}") as npz:
        out = {}
        for split in SPLITS:
            try:
                images, labels = npz[f"{split}_images"], npz[f"{split}_labels"]
            except Exception as e:
                raise DataError(f"{path}: cannot read the {split} arrays ({type(e).__name__}: {e})") from None
            out[split] = (to_nchw(images, info.n_channels, f"{path}:{split}_images"),
                          labels_tensor(labels, info, f"{path}:{split}_labels", len(images)))
    return out


def to_nchw(images: np.ndarray, n_channels: int, what: str) -> torch.Tensor:
    if images.dtype != np.uint8:
        raise DataError(f"{what}: images must be uint8, got {images.dtype}")
    if images.ndim == 3 and n_channels == 1:
        images = images[:, None]
    elif images.ndim == 4 and images.shape[-1] == n_channels:
        images = images.transpose(0, 3, 1, 2)
    else:
        raise DataError(f"{what}: expected shape (N, H, W{'' if n_channels == 1 else ', 3'}), got {images.shape}")
    if images.shape[-1] != images.shape[-2]:
        raise DataError(f"{what}: images must be square, got {images.shape[-2]}x{images.shape[-1]}")
    return torch.from_numpy(np.ascontiguousarray(images))


def labels_tensor(labels: np.ndarray, info: TaskInfo, what: str, n: int) -> torch.Tensor:
    if len(labels) != n:
        raise DataError(f"{what}: {len(labels)} labels for {n} images")
    if not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{what}: labels must be integers, got {labels.dtype}")
    if info.task == MULTI_LABEL:
        if labels.ndim != 2 or labels.shape[1] != info.num_classes:
            raise DataError(f"{what}: expected multi-label array of shape (N, {info.num_classes}), "
                            f"got {labels.shape}")
        if labels.size and (labels.min() < 0 or labels.max() > 1):
            raise DataError(f"{what}: multi-label values must be 0 or 1")
        return torch.from_numpy(labels.astype(np.float32))
    labels = labels.reshape(len(labels), -1) if len(labels) else labels.reshape(0, 1)  # (empty splits: checked later)
    if labels.shape[1] != 1:
        raise DataError(f"{what}: expected one label per image, got shape {labels.shape}")
    labels = labels[:, 0].astype(np.int64)
    if labels.size and (labels.min() < 0 or labels.max() >= info.num_classes):
        raise DataError(f"{what}: labels must lie in 0..{info.num_classes - 1}, found {labels.min()}..{labels.max()}")
    return torch.from_numpy(labels)
