"""The synthetic quadrant task shared by test_explain and test_calibrate.

Class 1 ("blob") images hold a bright Gaussian blob somewhere in the top-right quadrant, class 0 ("absent") images
do not; everything else is pixel noise, so the label depends on that one quadrant only. The top-right quadrant (not
top-left) is used so that a heatmap accidentally transposed (H and W swapped) lands in the wrong quadrant.

One hybrid_mixer_small is trained once per test session (plain torch loop) and reused by both test files.
"""
from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import torch

SIDE = 28
QUADRANT = (slice(0, 14), slice(14, 28))  # rows, cols of the informative quadrant: top-right
QUADRANTS = {"top-left": (slice(0, 14), slice(0, 14)), "top-right": QUADRANT,
             "bottom-left": (slice(14, 28), slice(0, 14)), "bottom-right": (slice(14, 28), slice(14, 28))}
CLASSES = ("absent", "blob")
MODEL = "hybrid_mixer_small"
KWARGS = dict(num_classes=2, in_chans=1, img_size=SIDE)


def make_images(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """uint8 ``(n, 28, 28)`` images and int64 labels (about half of each class)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(70.0, 20.0, (n, SIDE, SIDE))
    yy, xx = np.mgrid[0:SIDE, 0:SIDE]
    y = rng.permutation(np.arange(n) % 2).astype(np.int64)
    for i in np.flatnonzero(y):
        cy, cx = rng.uniform(4, 10), 14 + rng.uniform(4, 10)  # blob fully inside the top-right quadrant
        x[i] += 130.0 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * 2.0 ** 2))
    return np.clip(x, 0, 255).astype(np.uint8), y


def quadrant_mass(cams: np.ndarray) -> dict[str, float]:
    """Share of the total heatmap mass of a batch ``(B, H, W)`` that falls in each quadrant."""
    total = float(cams.sum())
    return {k: float(cams[:, r, c].sum()) / total for k, (r, c) in QUADRANTS.items()}


def train_quadrant(seed: int = 0, steps: int = 40) -> tuple[dict, list[float], list[float]]:
    """``(state_dict, mean, std)`` of hybrid_mixer_small trained on the quadrant task (``steps`` steps of 32 images;
    ``seed`` sets the initialisation and the batches). Also used by benchmarks/explain.py."""
    from medmix.data import BatchTransform
    from medmix.models import create_model

    images, labels = make_images(1024, seed=0)
    mean, std = [float(images.mean() / 255)], [float(images.std() / 255)]
    tf = BatchTransform(SIDE, mean, std)
    x, y = torch.from_numpy(images)[:, None], torch.from_numpy(labels)
    torch.manual_seed(seed)
    model = create_model(MODEL, **KWARGS)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(x), (32,), generator=gen)
        loss = torch.nn.functional.cross_entropy(model(tf(x[idx])), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, mean, std


@functools.lru_cache(maxsize=1)
def trained() -> tuple[dict, list[float], list[float]]:
    """The seed-0 :func:`train_quadrant` model, trained once per test session."""
    return train_quadrant(0)


def write_run(root: Path, *, label_noise: float = 0.0, head_scale: float = 1.0, n: int = 600) -> Path:
    """A checkpoint of the trained model beside a packed npz of quadrant images whose labels are flipped with
    probability ``label_noise``; the head is multiplied by ``head_scale`` (an over-confident model). Returns the
    checkpoint path; its metadata points at the npz so :func:`medmix.checkpoint.load_training_data` finds the data."""
    from medmix.checkpoint import save_checkpoint
    from medmix.data.tasks import BINARY, TaskInfo
    from medmix.models import create_model

    state, mean, std = trained()
    model = create_model(MODEL, **KWARGS)
    model.load_state_dict(state)
    with torch.no_grad():
        model.head.weight.mul_(head_scale)
        model.head.bias.mul_(head_scale)
    images, labels = make_images(n, seed=7)
    flip = np.random.default_rng(8).random(n) < label_noise
    labels = np.where(flip, 1 - labels, labels)
    root.mkdir(parents=True, exist_ok=True)
    npz = root / "quadrant.npz"
    np.savez_compressed(npz, images=images, labels=labels, classes=np.array(CLASSES))
    meta = {"model": MODEL, "model_kwargs": KWARGS, "task": TaskInfo(BINARY, CLASSES, 1).to_dict(),
            "dataset": "quadrant", "data_source": {"kind": "packed", "path": str(npz.resolve()), "split_seed": 0,
                                                   "size": SIDE},
            "data_size": SIDE, "img_size": SIDE, "mean": mean, "std": std, "temperature": 1.0, "seed": 0}
    ckpt = root / "best_model.pth"
    save_checkpoint(ckpt, model, meta)
    return ckpt
