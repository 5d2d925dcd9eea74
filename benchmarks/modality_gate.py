"""Build the modality gate medmix ships (src/medmix/assets/modality_gate.{safetensors,json}) and measure it.

    python benchmarks/modality_gate.py [--data-dir ~/medmnist] [--epochs 8] [--per-class 2500] [--seed 0]

Needs PneumoniaMNIST, BreastMNIST, RetinaMNIST (28 px) and mednist.npz in the data dir, plus the sample photos that
scikit-learn, scikit-image and matplotlib install (no download). Nine modality classes:

* chest X-ray: PneumoniaMNIST train + MedNIST CXR (train split of medmix's MedNIST split, seed 0): the same
  modality from two sources, one class, so a chest X-ray model does not flag chest X-rays from another hospital;
* breast ultrasound (BreastMNIST train), retinal fundus photo (RetinaMNIST train);
* abdomen CT, breast MRI, chest CT, hand X-ray, head CT (MedNIST train split);
* natural photo: random crops of 16 sample photos and pictures; 6 other pictures are held out for evaluation.

Every image is reduced to the gate's view (3 channels, 28 x 28, :func:`medmix.modality.gate_inputs`) and trained
with light augmentation (random resized crop and shift, flips, brightness / contrast / gamma, random grey for colour
sources) so the gate holds on images prepared differently; classes are sampled evenly (``--per-class`` per epoch).
AdamW, cosine schedule, label smoothing 0.1. Only training splits are used; the reported accuracy is on the val
splits (MedNIST val of the seed-0 split, the MedMNIST val files) and on the held-out photos, so the test splits
stay unread for ``benchmarks/ood.py``. Writes results/modality_gate.{json,md}.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from _common import DEFAULT_DATA, ROOT, command_line, machine, table, write_results

CLASSES = ["chest X-ray", "breast ultrasound", "retinal fundus photo", "abdomen CT", "breast MRI", "chest CT",
           "hand X-ray", "head CT", "natural photo"]
MEDNIST = {"AbdomenCT": "abdomen CT", "BreastMRI": "breast MRI", "CXR": "chest X-ray", "ChestCT": "chest CT",
           "Hand": "hand X-ray", "HeadCT": "head CT"}
MEDMNIST = {"pneumoniamnist": "chest X-ray", "breastmnist": "breast ultrasound", "retinamnist": "retinal fundus photo"}
TRAIN_PHOTOS = ["sklearn:china", "sklearn:flower", "mpl:grace_hopper", "skimage:astronaut", "skimage:coffee",
                "skimage:rocket", "skimage:camera", "skimage:horse", "skimage:grass", "skimage:gravel",
                "skimage:brick", "skimage:coins", "skimage:moon", "skimage:page", "skimage:text", "skimage:clock"]
EVAL_PHOTOS = ["skimage:chelsea", "skimage:cat", "skimage:hubble_deep_field", "skimage:colorwheel", "skimage:logo",
               "skimage:immunohistochemistry"]
ASSETS = ROOT / "src" / "medmix" / "assets"


def photo(name: str) -> np.ndarray:
    """A sample picture as uint8 (H, W, 3)."""
    src, key = name.split(":")
    if src == "sklearn":
        from sklearn.datasets import load_sample_image

        a = load_sample_image(f"{key}.jpg")
    elif src == "mpl":
        import matplotlib
        from PIL import Image

        a = np.asarray(Image.open(Path(matplotlib.get_data_path()) / "sample_data" / f"{key}.jpg").convert("RGB"))
    else:
        import skimage.data

        a = getattr(skimage.data, key)()
    a = np.asarray(a).astype(np.float64) if np.asarray(a).dtype == bool else np.asarray(a)
    if a.dtype != np.uint8:
        a = (255 * (a - a.min()) / max(1e-9, float(a.max() - a.min()))).astype(np.uint8)
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, 2)
    return np.ascontiguousarray(a[..., :3])


def crops(names: list[str], n: int, seed: int) -> torch.Tensor:
    """``n`` random square crops (side 10-100 % of the shorter edge) of the pictures, as uint8 (n, 3, 64, 64)."""
    g = np.random.default_rng(seed)
    pics = [torch.from_numpy(photo(p)).permute(2, 0, 1) for p in names]
    out = []
    for i in range(n):
        p = pics[i % len(pics)]
        h, w = p.shape[-2:]
        side = int(min(h, w) * g.uniform(0.1, 1.0))
        y, x = g.integers(0, h - side + 1), g.integers(0, w - side + 1)
        c = p[:, y:y + side, x:x + side].float()[None]
        out.append(F.interpolate(c, size=(64, 64), mode="bilinear", antialias=True).round().clamp(0, 255).byte())
    return torch.cat(out)


def gate_view(images: torch.Tensor) -> torch.Tensor:
    from medmix.modality import gate_inputs

    return torch.cat([gate_inputs(images[i:i + 4096]) for i in range(0, len(images), 4096)])


def sources(data_dir: str) -> dict[str, dict[str, torch.Tensor]]:
    """{split: {class: float gate views}} for train and val, and the held-out photos under "photos"."""
    from medmix.data import load_dataset

    out: dict[str, dict[str, list]] = {"train": {c: [] for c in CLASSES}, "val": {c: [] for c in CLASSES}}
    for flag, cls in MEDMNIST.items():
        b = load_dataset(flag, data_dir=data_dir, size=28)
        for split in ("train", "val"):
            out[split][cls].append(gate_view(b.splits[split].images))
    b = load_dataset("mednist", data_dir=data_dir, size=64, seed=0)
    for split in ("train", "val"):
        s = b.splits[split]
        y = s.labels.reshape(len(s.labels), -1)[:, 0]
        for k, name in enumerate(b.info.class_names):
            out[split][MEDNIST[name]].append(gate_view(s.images[y == k]))
    out["train"]["natural photo"].append(gate_view(crops(TRAIN_PHOTOS, 6000, 1)))
    out["val"]["natural photo"].append(gate_view(crops(TRAIN_PHOTOS, 600, 2)))
    data = {split: {c: torch.cat(v) for c, v in d.items()} for split, d in out.items()}
    data["photos"] = {"natural photo": gate_view(crops(EVAL_PHOTOS, 600, 3))}
    return data


def augment(x: torch.Tensor, colour: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Light, batched: random resized crop / shift (scale 0.7-1, +-10 %), h-flip, brightness / contrast / gamma,
    grey for a third of the colour images. ``x`` in [-1, 1], (B, 3, 28, 28)."""
    b = len(x)
    u = lambda lo, hi: lo + (hi - lo) * torch.rand(b, generator=g)  # noqa: E731
    s, tx, ty = u(0.7, 1.0), u(-0.1, 0.1), u(-0.1, 0.1)
    flip = torch.where(torch.rand(b, generator=g) < 0.5, -1.0, 1.0)
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0], theta[:, 1, 1], theta[:, 0, 2], theta[:, 1, 2] = s * flip, s, tx, ty
    x = F.grid_sample(x, F.affine_grid(theta, list(x.shape), align_corners=False), padding_mode="border",
                      align_corners=False)
    x = (x + 1) / 2
    grey = colour & (torch.rand(b, generator=g) < 1 / 3)
    x = torch.where(grey[:, None, None, None], x.mean(1, keepdim=True).expand_as(x), x)
    gamma = torch.exp(u(-0.3, 0.3))[:, None, None, None]
    x = x.clamp(0, 1) ** gamma
    m = x.mean((1, 2, 3), keepdim=True)
    x = (x - m) * u(0.75, 1.25)[:, None, None, None] + m + u(-0.1, 0.1)[:, None, None, None]
    return (x.clamp(0, 1) - 0.5) / 0.5


def accuracy(model, views: torch.Tensor, k: int) -> float:
    with torch.no_grad():
        pred = torch.cat([model(views[i:i + 2048]).argmax(1) for i in range(0, len(views), 2048)])
    return float((pred == k).float().mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default=DEFAULT_DATA)
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--per-class", type=int, default=2500, help="images per class per epoch")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()

    from safetensors.torch import save_file

    from medmix.inference import set_threads
    from medmix.models.modality_gate import ModalityNet

    set_threads()
    torch.manual_seed(a.seed)
    t0 = time.perf_counter()
    data = sources(a.data_dir)
    n_train = {c: len(v) for c, v in data["train"].items()}
    print(f"gate data ready in {time.perf_counter() - t0:.0f} s: {n_train}", file=sys.stderr, flush=True)
    colour = {c: bool((v[:, 0] != v[:, 1]).flatten(1).any(1).float().mean() > 0.5) for c, v in data["train"].items()}
    model = ModalityNet(len(CLASSES))
    steps_per_epoch = math.ceil(a.per_class * len(CLASSES) / 256)
    total = steps_per_epoch * a.epochs
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=total, pct_start=0.1)
    g = torch.Generator().manual_seed(a.seed)
    t1 = time.perf_counter()
    for epoch in range(a.epochs):
        model.train()
        xs, ys, cs = [], [], []
        for k, c in enumerate(CLASSES):
            v = data["train"][c]
            idx = torch.randint(len(v), (a.per_class,), generator=g)
            xs.append(v[idx])
            ys.append(torch.full((a.per_class,), k))
            cs.append(torch.full((a.per_class,), colour[c]))
        x, y, col = torch.cat(xs), torch.cat(ys), torch.cat(cs)
        order = torch.randperm(len(x), generator=g)
        run_loss = 0.0
        for i in range(steps_per_epoch):
            j = order[i * 256:(i + 1) * 256]
            loss = F.cross_entropy(model(augment(x[j], col[j], g)), y[j], label_smoothing=0.1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            run_loss += float(loss)
        model.eval()
        va = {c: accuracy(model, data["val"][c], k) for k, c in enumerate(CLASSES)}
        print(f"epoch {epoch + 1}/{a.epochs}: loss {run_loss / steps_per_epoch:.4f}  val acc (mean over classes) "
              f"{np.mean(list(va.values())):.4f}  {time.perf_counter() - t1:.0f} s", file=sys.stderr, flush=True)
    train_seconds = time.perf_counter() - t1
    model.eval()
    val_acc = {c: accuracy(model, data["val"][c], k) for k, c in enumerate(CLASSES)}
    photo_acc = accuracy(model, data["photos"]["natural photo"], CLASSES.index("natural photo"))

    ASSETS.mkdir(parents=True, exist_ok=True)
    weights = ASSETS / "modality_gate.safetensors"
    save_file({k: v.detach().half().contiguous() for k, v in model.state_dict().items()
               if v.is_floating_point()} | {k: v for k, v in model.state_dict().items() if not v.is_floating_point()},
              str(weights), metadata={"format": "pt"})
    md5 = hashlib.md5(weights.read_bytes()).hexdigest()
    info = {"classes": CLASSES, "widths": list(model.widths), "depth": 2, "input": "3 x 28 x 28, [-1, 1]",
            "md5": md5, "params": sum(p.numel() for p in model.parameters()), "epochs": a.epochs,
            "per_class_per_epoch": a.per_class, "seed": a.seed, "train_images": n_train,
            "val_accuracy": {c: round(v, 4) for c, v in val_acc.items()},
            "held_out_photo_accuracy": round(photo_acc, 4),
            "sources": {"chest X-ray": "PneumoniaMNIST train (MedMNIST v2, CC BY 4.0) + MedNIST CXR (CC BY-SA 4.0)",
                        "breast ultrasound": "BreastMNIST train (MedMNIST v2, CC BY 4.0)",
                        "retinal fundus photo": "RetinaMNIST train (MedMNIST v2, CC BY 4.0)",
                        **{v: f"MedNIST {k} (CC BY-SA 4.0)" for k, v in MEDNIST.items() if k != "CXR"},
                        "natural photo": "sample pictures of scikit-learn, scikit-image and matplotlib: "
                                         + ", ".join(p.split(":")[1] for p in TRAIN_PHOTOS)}}
    (ASSETS / "modality_gate.json").write_text(json.dumps(info, indent=2) + "\n")
    m = machine()
    rows = [[c, n_train[c], len(data["val"][c]), f"{val_acc[c]:.3f}"] for c in CLASSES]
    md = ["# The modality gate (ModalityNet), shipped in src/medmix/assets", "", f"Command: `{command_line()}`  ",
          f"Machine: {m['description']}; training {train_seconds:.0f} s ({a.epochs} epochs of {a.per_class} images "
          f"per class), {info['params']:,} parameters, weights {weights.stat().st_size / 1024:.0f} KiB (fp16).", "",
          table(["modality", "train images", "val images", "val accuracy"], rows), "",
          f"Held-out pictures (not in training: {', '.join(p.split(':')[1] for p in EVAL_PHOTOS)}; 600 random "
          f"crops) classified as natural photo: {photo_acc:.3f}.", "",
          "The gate's accuracy is not the warning's: the warning is a Gaussian per run on the gate's features "
          "(`results/ood.md`)."]
    write_results("modality_gate", {"command": command_line(), "machine": m, "train_seconds": train_seconds, **info},
                  "\n".join(md))


if __name__ == "__main__":
    main()
