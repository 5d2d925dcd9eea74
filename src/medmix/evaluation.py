"""Evaluate a checkpoint (or run directory) on a split of the data it was trained on."""
from __future__ import annotations

import os
from pathlib import Path

from .checkpoint import load_model, resolve_checkpoint
from .data import BatchTransform, load_dataset
from .data.tasks import TaskInfo
from .engine import evaluate_split, resolve_precision
from .errors import ConfigError
from .losses import build_loss, default_loss_name


def load_training_data(meta: dict, run_dir: Path, data_dir: str | os.PathLike | None = None):
    """The dataset a checkpoint was trained on, with the same split (``split.json`` beside it when present)."""
    src = meta.get("data_source", {})
    stored = Path(src.get("path", ""))
    name = meta["dataset"]
    if src.get("kind") == "folder" or (src.get("kind") == "packed" and (data_dir is None or name != "mednist")):
        name = str(stored)  # data without a registry name are found where they were read
    elif data_dir is None and src.get("kind") == "medmnist" and stored.is_file():
        data_dir = stored.parent
    split_file = run_dir / "split.json"
    return load_dataset(name, data_dir=data_dir, size=int(src.get("size", meta["data_size"])),
                        seed=int(src.get("split_seed", meta.get("seed", 0))),
                        split_file=split_file if split_file.exists() else None)


def evaluate(ckpt_or_run: str | os.PathLike, *, data_dir: str | os.PathLike | None = None, split: str = "test",
             out: str | os.PathLike | None = None, batch_size: int = 512, precision: str = "auto") -> dict:
    """Metrics with the official MedMNIST ACC/AUC semantics plus macro P/R/F1 and the confusion matrix.

    ``out`` (a directory) receives ``confusion_<split>.png``. Data without official splits use the ``split.json``
    saved beside the checkpoint, so the same images are evaluated as during training.
    """
    if split not in ("train", "val", "test"):
        raise ConfigError(f"unknown split {split!r}; use train, val or test")
    path = resolve_checkpoint(ckpt_or_run)
    model, meta = load_model(path)
    info = TaskInfo.from_dict(meta["task"])
    bundle = load_training_data(meta, path.parent, data_dir)
    if bundle.info.class_names != info.class_names or bundle.info.task != info.task:
        raise ConfigError(f"the data found for {meta['dataset']!r} do not match the checkpoint's classes/task")
    tf = BatchTransform(meta["img_size"], meta["mean"], meta["std"])
    loss = build_loss(default_loss_name(info.task), info.task, info.num_classes)
    m = evaluate_split(model, bundle.splits[split], tf, info.task, info.class_names, loss, batch_size,
                       resolve_precision(precision), meta.get("temperature", 1.0), meta.get("threshold", 0.5))
    m.update(split=split, dataset=bundle.name, model=meta["model"], checkpoint=str(path))
    if out is not None:
        from .report import write_confusion

        Path(out).mkdir(parents=True, exist_ok=True)
        png = write_confusion(m, info, Path(out) / f"confusion_{split}.png", f"{bundle.name} {split} - {meta['model']}")
        m["confusion_png"] = str(png) if png else None
    return m

