"""Shared fixtures: generated datasets in every layout medmix reads, and small trained runs reused by many tests.

Everything here is small on purpose (tens of images, 1-2 epochs, one thread): the suite has to stay fast on a
2-core machine shared with other jobs. Real MedMNIST files other than the embedded BreastMNIST are read from
``$MEDMIX_TEST_DATA`` (default ``/work/shared/data``) and the tests that need them skip when they are absent.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

SHARED_DATA = Path(os.environ.get("MEDMIX_TEST_DATA", "/work/shared/data"))


def shared_file(name: str) -> Path:
    """A real dataset file from the shared data folder, or skip the calling test with the reason."""
    p = SHARED_DATA / name
    if not p.is_file():
        pytest.skip(f"{name} not found in {SHARED_DATA} (set MEDMIX_TEST_DATA to the folder holding it)")
    return p


# ----------------------------------------------------------------------------------------------- environment
@pytest.fixture(autouse=True, scope="session")
def _no_thread_changes():
    """Code under test must not change the thread count behind the tests' back: ``medmix train`` through the CLI
    calls ``inference.set_threads()`` (all cores), which would make session-scoped runs built later differ in their
    last bits from in-test runs. One thread for the whole session."""
    import medmix.inference

    original = medmix.inference.set_threads
    medmix.inference.set_threads = lambda: None
    torch.set_num_threads(1)
    yield
    medmix.inference.set_threads = original


@pytest.fixture(autouse=True)
def _one_thread():
    """Single-threaded torch for every test: tiny batches gain nothing from 2 threads and oversubscribe a shared
    machine, and results stay independent of the thread count. Reset before each test because code under test
    (``medmix train`` through the CLI, the server) may set its own thread count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch, tmp_path):
    """No test sees the developer's $MEDMIX_DATA, and nothing is written into the working tree."""
    monkeypatch.delenv("MEDMIX_DATA", raising=False)
    monkeypatch.chdir(tmp_path)


# ----------------------------------------------------------------------------------------------- generators
def class_images(labels: np.ndarray, size: int, channels: int = 1, seed: int = 0) -> np.ndarray:
    """uint8 images whose content depends on the label (brightness and a bar position), plus noise, so a model
    can learn them in a few steps. Shape (N, H, W) for 1 channel, (N, H, W, 3) for 3 (the official layout)."""
    rng = np.random.default_rng(seed)
    lab = labels if labels.ndim == 1 else labels.argmax(1)
    n = len(lab)
    x = rng.integers(0, 60, size=(n, size, size, channels)).astype(np.int32)
    for i, k in enumerate(lab):
        x[i] += 20 * int(k)
        col = (3 + 5 * int(k)) % (size - 3)
        x[i, :, col:col + 3] += 120
    x = np.clip(x, 0, 255).astype(np.uint8)
    return x[..., 0] if channels == 1 else x


def write_official_npz(path: Path, n_classes: int, sizes=(40, 10, 10), side: int = 28, channels: int = 1,
                       multi_label: bool = False, seed: int = 0) -> dict[str, np.ndarray]:
    """An npz of the official MedMNIST key layout (uint8 images, uint8 labels (N, 1) or (N, L))."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, n in zip(("train", "val", "test"), sizes):
        if multi_label:
            y = (rng.random((n, n_classes)) < 0.3).astype(np.uint8)
            y[:, 0] = np.arange(n) % 2  # every label column has both values in every split
        else:
            y = (np.arange(n) % n_classes).astype(np.uint8)[:, None]
        arrays[f"{split}_images"] = class_images(y if multi_label else y[:, 0], side, channels, seed + n)
        arrays[f"{split}_labels"] = y
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, **arrays)
    return arrays


def write_packed_npz(path: Path, counts=(20, 20, 20), side: int = 32, seed: int = 0,
                     classes=("alpha", "beta", "gamma")) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.repeat(np.arange(len(counts)), counts)).astype(np.int64)
    arrays = {"images": class_images(labels, side, 1, seed), "labels": labels, "classes": np.array(classes)}
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, **arrays)
    return arrays


def write_class_folders(root: Path, counts=(20, 20, 20), side: int = 32, rgb: bool = False,
                        classes=("cls_a", "cls_b", "cls_c")) -> Path:
    from PIL import Image

    for k, (c, n) in enumerate(zip(classes, counts)):
        d = root / c
        d.mkdir(parents=True, exist_ok=True)
        imgs = class_images(np.full(n, k), side, 3 if rgb else 1, seed=k)
        for i, a in enumerate(imgs):
            Image.fromarray(a).save(d / f"img_{i:03d}.png")
    return root


# ----------------------------------------------------------------------------------------------- fixtures
@pytest.fixture
def chest_npz(tmp_path) -> tuple[Path, dict]:
    """Generated multi-label ``chestmnist.npz`` (14 label columns) of the official key layout."""
    path = tmp_path / "official" / "chestmnist.npz"
    return path, write_official_npz(path, 14, multi_label=True)


@pytest.fixture
def blood_npz(tmp_path) -> tuple[Path, dict]:
    """Generated RGB ``bloodmnist.npz`` (8 classes, (N, 28, 28, 3)) of the official key layout."""
    path = tmp_path / "official" / "bloodmnist.npz"
    return path, write_official_npz(path, 8, sizes=(48, 16, 16), channels=3)


@pytest.fixture
def packed_npz(tmp_path) -> tuple[Path, dict]:
    path = tmp_path / "packed" / "tiny.npz"
    return path, write_packed_npz(path)


@pytest.fixture
def folder_tree(tmp_path) -> Path:
    return write_class_folders(tmp_path / "folders")


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
    """hybrid_mixer_small trained 2 epochs on the embedded BreastMNIST (fixed seed): the run most tests reuse."""
    from medmix.data.medmnist import ASSETS
    from medmix.engine import train

    out = tmp_path_factory.mktemp("runs") / "breast"
    return train(dataset="breastmnist", data_dir=str(ASSETS), model="hybrid_mixer_small", epochs=2,
                 batch_size=32, lr=3e-3, seed=0, precision="fp32", out=str(out), quiet=True)


TINY_TRAIN = {"model": "hybrid_mixer_small", "epochs": 2, "batch_size": 16, "lr": 3e-3, "precision": "fp32",
              "quiet": True}


@pytest.fixture(scope="session")
def packed_data(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("packed") / "tiny.npz"
    write_packed_npz(path)
    return path


@pytest.fixture(scope="session")
def packed_run(tmp_path_factory, packed_data):
    """A 2-epoch run on the generated packed npz (seed 1): has a split.json."""
    from medmix.engine import train

    out = tmp_path_factory.mktemp("runs") / "packed-s1"
    return train(dataset=str(packed_data), seed=1, out=str(out), **TINY_TRAIN)
