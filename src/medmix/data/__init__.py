"""Data: one registry of named datasets, plus paths to class folders or npz files; all held as uint8 tensors.

>>> from medmix.data import load_dataset
>>> bundle = load_dataset("breastmnist")           # official npz (embedded copy when no data dir has it)
>>> bundle.splits["train"].images.shape            # torch.Size([546, 1, 28, 28]), uint8
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..errors import ConfigError, DataError, UnknownNameError
from . import folders, medmnist
from .medmnist import resolve_data_dir
from .tasks import BINARY, MULTI_CLASS, TaskInfo
from .transforms import AUGMENT_POLICIES, AugmentConfig, BatchTransform, get_policy

__all__ = ["Split", "DataBundle", "DatasetSpec", "load_dataset", "list_datasets", "dataset_spec", "TaskInfo",
           "channel_stats", "BatchTransform", "AugmentConfig", "AUGMENT_POLICIES", "get_policy", "resolve_data_dir"]


@dataclass
class Split:
    images: torch.Tensor  # uint8 (N, C, H, W)
    labels: torch.Tensor  # int64 (N,) or float32 (N, L) for multi-label

    def __len__(self) -> int:
        return len(self.images)


@dataclass
class DataBundle:
    name: str
    info: TaskInfo
    splits: dict[str, Split]
    source: dict = field(default_factory=dict)  # what was read: kind, path, size, split seed, ...
    split_indices: dict[str, np.ndarray] | None = None  # only for data without official splits

    @property
    def image_size(self) -> int:
        return int(self.splits["train"].images.shape[-1])

    def channel_stats(self) -> tuple[list[float], list[float]]:
        """Per-channel mean and std of the training images, in 0..1 units."""
        return channel_stats([self.splits["train"].images])


def channel_stats(images) -> tuple[list[float], list[float]]:
    """Per-channel mean and std (0..1 units) of several uint8 ``(N, C, H, W)`` tensors taken together (a generalist
    pools its datasets)."""
    total, s1, s2 = 0, None, None
    for x in images:
        flat = x.transpose(0, 1).reshape(x.shape[1], -1)
        for chunk in flat.split(1 << 24, dim=1):  # bounded memory for big sets
            c = chunk.double()
            s1 = c.sum(1) if s1 is None else s1 + c.sum(1)
            s2 = (c * c).sum(1) if s2 is None else s2 + (c * c).sum(1)
        total += flat.shape[1]
    if not total:
        raise DataError("no training images")
    m = s1 / total
    std = (s2 / total - m * m).clamp_min(1e-12).sqrt()
    return (m / 255).tolist(), (std / 255).clamp_min(1e-3).tolist()


NORMALIZATIONS = ("dataset", "half")


def normalization(kind: str, images) -> tuple[list[float], list[float]]:
    """Per-channel mean and std (0..1 units) used to normalise inputs: ``"dataset"``, the statistics of the training
    images (several uint8 tensors are pooled, as a generalist does); ``"half"``, mean .5 and std .5 per channel, the
    official MedMNIST experiments' ``Normalize([.5], [.5])``."""
    if kind == "dataset":
        return channel_stats(images)
    if kind == "half":
        c = images[0].shape[1]
        return [0.5] * c, [0.5] * c
    raise ConfigError(f"unknown normalize {kind!r}; use {' or '.join(NORMALIZATIONS)}")


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    kind: str  # "medmnist" | "packed"
    augment: str
    description: str = ""
    file: str = ""
    sizes: tuple[int, ...] = (28,)


# Augmentation policy per dataset kind (transforms.AUGMENT_POLICIES).
_MEDMNIST_AUGMENT = {
    "pathmnist": "rotation_free", "dermamnist": "rotation_free", "bloodmnist": "rotation_free",
    "tissuemnist": "rotation_free", "retinamnist": "rotation_free", "breastmnist": "ultrasound",
    "chestmnist": "radiology", "pneumoniamnist": "radiology", "octmnist": "radiology",
    "organamnist": "radiology", "organcmnist": "radiology", "organsmnist": "radiology",
}


def _registry() -> dict[str, DatasetSpec]:
    specs = {f: DatasetSpec(f, "medmnist", _MEDMNIST_AUGMENT.get(f, "radiology"), file=medmnist.file_name(f, 28),
                            sizes=medmnist.SIZES) for f in medmnist.medmnist_flags()}
    specs["mednist"] = DatasetSpec("mednist", "packed", "rotate_flip_zoom",
                                   "Medical MNIST / MedNIST: 6 modalities, 64 px, no official split",
                                   file="mednist.npz", sizes=(64,))
    return specs


def list_datasets() -> list[str]:
    return list(_registry())


def dataset_spec(name: str) -> DatasetSpec:
    specs = _registry()
    if name not in specs:
        raise UnknownNameError("dataset", name, list(specs))
    return specs[name]


def load_dataset(name: str, *, data_dir: str | os.PathLike | None = None, size: int = 28, seed: int = 0,
                 split_file: str | os.PathLike | None = None, download: bool = False,
                 img_size: int | None = None) -> DataBundle:
    """Load a named dataset, a class-folder directory or an npz (official or packed layout).

    Data without official splits are split 70/15/15, stratified, by ``seed``; ``split_file`` (a ``split.json``
    written by a run) takes precedence so evaluation sees the very same test images.
    """
    if os.sep in name or name.endswith(".npz") or Path(name).is_dir():  # a path, not a registered name
        path = Path(name)
        if not path.exists():
            raise DataError(f"{path}: no such file or directory")
        if path.is_dir():
            return _split_bundle(path.name, folders.read_class_folders(path, img_size),
                                 {"kind": "folder", "path": str(path.resolve())}, seed, split_file)
        return _load_npz_path(path, seed, split_file)
    spec = dataset_spec(name)
    if spec.kind == "medmnist":
        path = medmnist.locate(name, size, data_dir, download)
        return _official_bundle(name, path, str(path), size)
    root = resolve_data_dir(data_dir)
    path = root / spec.file
    if not path.is_file():
        raise DataError(f"{spec.file} not found in {root}: put the packed npz (keys images, labels, classes) there, "
                        f"pass --data-dir DIR, or pass the class-folder directory itself as --dataset PATH")
    return _split_bundle(name, folders.read_packed_npz(path), {"kind": "packed", "path": str(path)}, seed, split_file)


def _load_npz_path(path: Path, seed: int, split_file) -> DataBundle:
    with medmnist.open_npz(path) as npz:
        keys = set(npz.files)
    flag = path.name.split(".")[0].split("_")[0]
    if "train_images" in keys and flag in medmnist.medmnist_flags():
        return _official_bundle(flag, path, str(path.resolve()))
    if "train_images" in keys:
        raise DataError(f"{path}: an official-layout npz must be named after its MedMNIST flag "
                        f"(e.g. chestmnist.npz) so its task and classes are known")
    return _split_bundle(path.stem, folders.read_packed_npz(path), {"kind": "packed", "path": str(path.resolve())},
                         seed, split_file)


def _official_bundle(flag: str, path: Path, source_path: str, size: int | None = None) -> DataBundle:
    """An npz of the official layout; ``size`` defaults to the images' side."""
    info = medmnist.task_info(flag)
    splits = {k: Split(*v) for k, v in medmnist.read_official_npz(path, info).items()}
    _check_splits(splits, path)
    size = size or int(splits["train"].images.shape[-1])
    return DataBundle(flag, info, splits, {"kind": "medmnist", "path": source_path, "size": size})


def _split_bundle(name: str, data: tuple[torch.Tensor, np.ndarray, list[str]], source: dict, seed: int,
                  split_file) -> DataBundle:
    """Images, labels and class names without official splits, split by ``split_file`` or ``seed``."""
    images, labels, classes = data
    info = TaskInfo(BINARY if len(classes) == 2 else MULTI_CLASS, tuple(classes), int(images.shape[1]))
    if split_file is not None and Path(split_file).is_file():
        idx = folders.load_split(Path(split_file), labels)
    else:
        idx = folders.make_split(labels, seed)
    lab = torch.from_numpy(labels)
    splits = {k: Split(images[torch.from_numpy(v)], lab[torch.from_numpy(v)]) for k, v in idx.items()}
    _check_splits(splits, Path(source["path"]))
    return DataBundle(name, info, splits, {**source, "split_seed": seed, "size": int(images.shape[-1])}, idx)


def _check_splits(splits: dict[str, Split], path: Path) -> None:
    for k, s in splits.items():
        if len(s) == 0:
            raise DataError(f"{path}: the {k} split is empty")
