"""Training and evaluation loops on in-memory uint8 data.

``train(TrainConfig(...))`` loads the data, builds the model, trains with Adam/AdamW and a per-step schedule,
evaluates on the validation split after every epoch, keeps the best weights (by the monitored validation metric) as
``best_model.pth`` and the latest as ``last.pth``, stops early after ``patience`` epochs without improvement, then
reads the test split once with the best weights. The run is built in ``<out>.partial`` and renamed to ``<out>``
when complete, so a run directory is never half-written.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn as nn

from . import __version__
from .checkpoint import atomic_write_text, save_checkpoint
from .data import BatchTransform, DataBundle, Split, dataset_spec, get_policy, load_dataset
from .data.tasks import BINARY, MULTI_LABEL
from .errors import ConfigError
from .losses import build_loss, default_loss_name
from .metrics import compute_metrics
from .models import create_model, model_info

MONITORS = ("auto", "acc", "auc", "loss", "f1")


def bf16_supported() -> bool:
    """True when the CPU has native bf16 matrix instructions (AVX512-BF16 or AMX); without them bf16 is emulated
    and far slower than fp32 (measured: ~100x on an AVX2-only EPYC)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(precision: str) -> str:
    if precision not in ("auto", "bf16", "fp32"):
        raise ConfigError(f"unknown precision {precision!r}; use auto, bf16 or fp32")
    if precision == "auto":
        return "bf16" if bf16_supported() else "fp32"
    return precision


@dataclass
class TrainConfig:
    dataset: str = "breastmnist"
    data_dir: str | None = None
    size: int = 28  # which MedMNIST file (28/64/128/224)
    img_size: int | None = None  # model input side; default: the stored image size
    model: str = "hybrid_mixer_small"
    epochs: int = 30
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.0
    optimizer: str = "adam"
    schedule: str = "cosine"
    warmup_epochs: float = 1.0
    loss: str | None = None  # default by task: ce (single label), bce (multi-label)
    alpha: float = 0.2  # ordinal loss mix
    margin: float = 0.1  # ordinal loss margin
    ordinal_variant: str = "peaked"
    label_smoothing: float = 0.0
    augment: str | None = None  # policy name; default by dataset
    drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    patience: int = 10
    monitor: str = "auto"
    precision: str = "auto"
    seed: int = 0
    out: str | None = None
    overwrite: bool = False
    download: bool = False
    eval_batch_size: int = 512
    tune_threshold: bool = False  # multi-label: per-label thresholds chosen on val (else 0.5)
    bn_recalibrate: bool = True  # re-estimate BatchNorm statistics of the best weights on un-augmented train images
    quiet: bool = False
    model_kwargs: dict = field(default_factory=dict)


@dataclass
class TrainResult:
    run_dir: Path
    best_epoch: int
    val: dict
    test: dict
    history: list[dict]
    seconds: float

    def summary(self) -> dict:
        keys = ("acc", "auc", "precision", "recall", "f1", "n", "mae", "qwk")
        return {"run_dir": str(self.run_dir), "best_epoch": self.best_epoch, "seconds": round(self.seconds, 2),
                "val": {k: self.val[k] for k in keys if k in self.val},
                "test": {k: self.test[k] for k in keys if k in self.test}}


# ----------------------------------------------------------------------------------------------- batches
def iterate_batches(n: int, batch_size: int, generator: torch.Generator | None = None, drop_last: bool = False):
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    stop = n - (n % batch_size) if drop_last and n > batch_size else n
    for i in range(0, stop, batch_size):
        yield order[i:i + batch_size]


def _autocast(precision: str):
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")


def probabilities(logits: torch.Tensor, task: str, temperature: float | list[float] | torch.Tensor = 1.0
                  ) -> torch.Tensor:
    """Logits -> the scores the official evaluator expects (sigmoid for multi-label, softmax otherwise).

    ``temperature`` divides the logits: one number, or one per column (per-label temperatures of multi-label
    tasks)."""
    if not isinstance(temperature, (int, float)):
        temperature = torch.as_tensor(temperature, dtype=torch.float32)
    z = logits.float() / temperature
    return torch.sigmoid(z) if task == MULTI_LABEL else torch.softmax(z, dim=1)


@torch.inference_mode()
def predict_logits(model: nn.Module, images: torch.Tensor, transform: BatchTransform, batch_size: int = 512,
                   precision: str = "fp32") -> torch.Tensor:
    model.eval()
    out = []
    for idx in iterate_batches(len(images), batch_size):
        with _autocast(precision):
            out.append(model(transform(images[idx])).float())
    return torch.cat(out) if out else torch.empty(0)


def evaluate_split(model: nn.Module, split: Split, transform: BatchTransform, task: str, class_names, loss_fn=None,
                   batch_size: int = 512, precision: str = "fp32", temperature: float = 1.0,
                   threshold: float | list[float] = 0.5, return_probs: bool = False) -> dict:
    logits = predict_logits(model, split.images, transform, batch_size, precision)
    probs = probabilities(logits, task, temperature).numpy()
    metrics = compute_metrics(split.labels.numpy(), probs, task, class_names, threshold=threshold)
    if return_probs:
        metrics["_probs"] = probs
    if loss_fn is not None:
        with torch.no_grad():
            metrics["loss"] = float(loss_fn(logits, split.labels))
    return metrics


# ----------------------------------------------------------------------------------------------- training
def _schedule(optimizer: torch.optim.Optimizer, kind: str, total_steps: int, warmup_steps: int):
    if kind == "none":
        return None
    if kind == "cosine":
        def f(step: int) -> float:
            if step < warmup_steps:
                return (step + 1) / warmup_steps
            t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
            return 0.5 * (1 + math.cos(math.pi * min(1.0, t)))
    elif kind == "step":  # x0.1 at 50% and 75% of training, the MedMNIST benchmark's recipe
        def f(step: int) -> float:
            return 0.01 if step >= 0.75 * total_steps else 0.1 if step >= 0.5 * total_steps else 1.0
    else:
        raise ConfigError(f"unknown schedule {kind!r}; use cosine, step or none")
    return torch.optim.lr_scheduler.LambdaLR(optimizer, f)


def _monitor(cfg_monitor: str, task: str) -> str:
    if cfg_monitor not in MONITORS:
        raise ConfigError(f"unknown monitor {cfg_monitor!r}; use one of {', '.join(MONITORS)}")
    if cfg_monitor != "auto":
        return cfg_monitor
    return "auc" if task in (BINARY, MULTI_LABEL) else "acc"


def _score(metrics: dict, monitor: str) -> float:
    v = -metrics["loss"] if monitor == "loss" else metrics[monitor]
    if monitor == "auc" and not np.isfinite(v):
        v = metrics.get("auc_defined_mean", float("nan"))
    return float(v) if np.isfinite(v) else -math.inf


def _prepare_run_dir(out: str | None, cfg: TrainConfig) -> tuple[Path, Path]:
    final = Path(out) if out else Path("runs") / f"{Path(cfg.dataset).stem}-{cfg.model}-s{cfg.seed}-{time.strftime('%Y%m%d-%H%M%S')}"
    if final.exists() and any(final.iterdir()) and not cfg.overwrite:
        raise ConfigError(f"{final} already exists and is not empty; pass --overwrite or choose another --out")
    partial = final.with_name(final.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    return final, partial


def _finish_run_dir(final: Path, partial: Path) -> None:
    if final.exists():
        trash = final.with_name(final.name + ".old")
        if trash.exists():
            shutil.rmtree(trash)
        final.rename(trash)
        partial.rename(final)
        shutil.rmtree(trash)
    else:
        partial.rename(final)


def _progress(total: int, desc: str, quiet: bool):
    if quiet:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True, file=sys.stderr, disable=None)


def build_meta(cfg: TrainConfig, bundle: DataBundle, model_kwargs: dict, img_size: int, mean, std, loss_name: str,
               augment: str) -> dict:
    return {
        "model": cfg.model, "model_kwargs": model_kwargs, "task": bundle.info.to_dict(), "dataset": bundle.name,
        "data_source": bundle.source, "data_size": bundle.image_size, "img_size": img_size, "mean": mean, "std": std,
        "temperature": 1.0, "seed": cfg.seed, "loss": loss_name, "augment": augment,
        "train_config": {k: v for k, v in asdict(cfg).items() if k not in ("quiet",)},
    }


def train(cfg: TrainConfig | None = None, *, log: Callable[[str], None] | None = None, **kwargs: Any) -> TrainResult:
    """Train a model; see :class:`TrainConfig` for the arguments (also accepted as keywords)."""
    cfg = cfg or TrainConfig(**kwargs)
    say = log or (lambda s: None if cfg.quiet else print(s, file=sys.stderr))
    if cfg.epochs < 1 or cfg.batch_size < 1:
        raise ConfigError("--epochs and --batch-size must be at least 1")
    if cfg.optimizer not in ("adam", "adamw"):
        raise ConfigError(f"unknown optimizer {cfg.optimizer!r}; use adam or adamw")
    precision = resolve_precision(cfg.precision)
    model_info(cfg.model)  # fail fast on an unknown model name, before reading data
    torch.manual_seed(cfg.seed)
    bundle = load_dataset(cfg.dataset, data_dir=cfg.data_dir, size=cfg.size, seed=cfg.seed, download=cfg.download)
    info = bundle.info
    img_size = cfg.img_size or bundle.image_size
    augment = cfg.augment or (dataset_spec(bundle.name).augment if _known(bundle.name) else "rotate_flip_zoom")
    mean, std = bundle.channel_stats()
    train_tf = BatchTransform(img_size, mean, std, get_policy(augment))
    eval_tf = BatchTransform(img_size, mean, std)
    loss_name = cfg.loss or default_loss_name(info.task)
    loss_fn = build_loss(loss_name, info.task, info.num_classes, alpha=cfg.alpha, margin=cfg.margin,
                         label_smoothing=cfg.label_smoothing, ordinal_variant=cfg.ordinal_variant)
    eval_loss = build_loss(default_loss_name(info.task), info.task, info.num_classes)
    model_kwargs = dict(num_classes=info.num_classes, in_chans=info.n_channels, img_size=img_size,
                        drop_rate=cfg.drop_rate, drop_path_rate=cfg.drop_path_rate, **cfg.model_kwargs)
    model = create_model(cfg.model, **model_kwargs).to(memory_format=torch.channels_last)
    monitor = _monitor(cfg.monitor, info.task)
    final, run = _prepare_run_dir(cfg.out, cfg)
    meta = build_meta(cfg, bundle, model_kwargs, img_size, mean, std, loss_name, augment)
    meta["monitor"], meta["precision"] = monitor, precision
    if bundle.split_indices is not None:
        from .data.folders import save_split

        save_split(run / "split.json", bundle.split_indices, cfg.seed, _all_labels(bundle), bundle.source["path"])
    atomic_write_text(run / "config.json", json.dumps(meta["train_config"], indent=2))

    params = [p for p in model.parameters() if p.requires_grad]
    opt_cls = torch.optim.Adam if cfg.optimizer == "adam" else torch.optim.AdamW
    opt = opt_cls(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    tr = bundle.splits["train"]
    drop_last = len(tr) > 2 * cfg.batch_size
    steps_per_epoch = len(tr) // cfg.batch_size if drop_last else math.ceil(len(tr) / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    sched = _schedule(opt, cfg.schedule, total, int(cfg.warmup_epochs * steps_per_epoch))
    gen = torch.Generator().manual_seed(cfg.seed)

    say(f"training {cfg.model} ({sum(p.numel() for p in params) / 1e6:.2f} M params) on {bundle.name} "
        f"[{info.task}, {info.num_classes} classes, {len(tr)}/{len(bundle.splits['val'])}/"
        f"{len(bundle.splits['test'])} images, {img_size} px, {precision}] -> {final}")
    history: list[dict] = []
    best_score, best_epoch, bad_epochs = -math.inf, 0, 0
    t_start = time.perf_counter()
    for epoch in range(1, cfg.epochs + 1):
        model.train()
        t0, seen, loss_sum = time.perf_counter(), 0, 0.0
        bar = _progress(steps_per_epoch, f"epoch {epoch}/{cfg.epochs}", cfg.quiet)
        for idx in iterate_batches(len(tr), cfg.batch_size, gen, drop_last):
            x = train_tf(tr.images[idx], train=True, generator=gen)
            y = tr.labels[idx]
            with _autocast(precision):
                logits = model(x)
            loss = loss_fn(logits.float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if sched is not None:
                sched.step()
            seen += len(idx)
            loss_sum += float(loss.detach()) * len(idx)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss_sum / seen:.4f}", img_s=f"{seen / (time.perf_counter() - t0):.0f}")
        if bar is not None:
            bar.close()
        train_time = time.perf_counter() - t0
        val = evaluate_split(model, bundle.splits["val"], eval_tf, info.task, info.class_names, eval_loss,
                             cfg.eval_batch_size, precision)
        row = {"epoch": epoch, "train_loss": loss_sum / max(seen, 1), "val_loss": val["loss"], "val_acc": val["acc"],
               "val_auc": val["auc"], "lr": opt.param_groups[0]["lr"], "train_img_s": seen / train_time,
               "epoch_seconds": time.perf_counter() - t0}
        history.append(row)
        _append_jsonl(run / "log.jsonl", row)
        score = _score(val, monitor)
        improved = score > best_score
        if improved:
            best_score, best_epoch, bad_epochs = score, epoch, 0
            save_checkpoint(run / "best_model.pth", model, {**meta, "epoch": epoch, "val_metrics": _slim(val)})
        else:
            bad_epochs += 1
        save_checkpoint(run / "last.pth", model, {**meta, "epoch": epoch, "val_metrics": _slim(val)},
                        train_state={"optimizer": opt.state_dict(), "epoch": epoch})
        say(f"epoch {epoch:3d}  loss {row['train_loss']:.4f}  val loss {val['loss']:.4f}  acc {val['acc']:.4f}  "
            f"auc {val['auc']:.4f}  {row['train_img_s']:.0f} img/s{'  *' if improved else ''}")
        if bad_epochs >= cfg.patience:
            say(f"early stop: no {monitor} improvement on val for {cfg.patience} epochs")
            break
    seconds = time.perf_counter() - t_start

    # the test split is read once, with the weights chosen on val
    from .checkpoint import load_checkpoint

    state, _, _ = load_checkpoint(run / "best_model.pth")
    model.load_state_dict(state)
    if cfg.bn_recalibrate and not get_policy(augment).identity and recalibrate_batchnorm(model, tr.images, eval_tf):
        meta["bn_recalibrated"] = True
    val = evaluate_split(model, bundle.splits["val"], eval_tf, info.task, info.class_names, eval_loss,
                         cfg.eval_batch_size, precision, return_probs=True)
    threshold: float | list[float] = 0.5
    if cfg.tune_threshold and info.task == MULTI_LABEL:
        threshold = tune_thresholds(val.pop("_probs"), bundle.splits["val"].labels.numpy())
        val = evaluate_split(model, bundle.splits["val"], eval_tf, info.task, info.class_names, eval_loss,
                             cfg.eval_batch_size, precision, threshold=threshold)
    val.pop("_probs", None)
    test = evaluate_split(model, bundle.splits["test"], eval_tf, info.task, info.class_names, eval_loss,
                          cfg.eval_batch_size, precision, threshold=threshold)
    meta.update(threshold=threshold, epoch=best_epoch, val_metrics=_slim(val), test_metrics=_slim(test), train_seconds=seconds,
                machine=machine_description())
    save_checkpoint(run / "best_model.pth", model, meta)
    metrics_doc = {"dataset": bundle.name, "model": cfg.model, "seed": cfg.seed, "best_epoch": best_epoch,
                   "monitor": monitor, "train_seconds": seconds, "machine": machine_description(),
                   "medmix_version": __version__, "val": val, "test": test}
    atomic_write_text(run / "metrics.json", json.dumps(_jsonable(metrics_doc), indent=2))
    _write_history_csv(run / "log.csv", history)
    from .report import plot_curves, write_confusion

    plot_curves(history, run / "curves.png", best_epoch)
    write_confusion(test, info, run / "confusion_test.png", f"{bundle.name} test - {cfg.model}")
    _finish_run_dir(final, run)
    return TrainResult(final, best_epoch, val, test, history, seconds)


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, images: torch.Tensor, transform: BatchTransform, batch_size: int = 256
                          ) -> bool:
    """Recompute every BatchNorm's running statistics as the average of per-batch statistics over un-augmented
    ``images`` (equal weight per batch, as ``momentum=None`` does).

    Training sees augmented images (rotated, zoomed, zero-padded), so the running statistics describe a slightly
    different distribution from the clean images met at evaluation; re-estimating them on clean training images
    removes that shift (measured on PneumoniaMNIST val: ACC .897 -> .928 at equal AUC). Returns False when the model
    has no BatchNorm."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return False
    saved = [(m.momentum, m.training) for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over all batches
    was_training = model.training
    model.eval()
    for m in bns:
        m.train()
    for idx in iterate_batches(len(images), batch_size):
        model(transform(images[idx]))
    for m, (momentum, _) in zip(bns, saved):
        m.momentum = momentum
    model.train(was_training)
    return True


def tune_thresholds(probs: np.ndarray, labels: np.ndarray, grid: int = 99) -> list[float]:
    """Per label, the threshold in (0, 1) with the best validation accuracy (ties: the one nearest 0.5)."""
    cands = np.linspace(0.01, 0.99, grid)
    out = []
    for j in range(probs.shape[1]):
        acc = ((probs[:, j][None, :] > cands[:, None]) == (labels[:, j][None, :] > 0.5)).mean(1)
        best = np.flatnonzero(acc == acc.max())
        out.append(float(cands[best[np.argmin(np.abs(cands[best] - 0.5))]]))
    return out


def _known(name: str) -> bool:
    try:
        dataset_spec(name)
        return True
    except Exception:
        return False


def _all_labels(bundle: DataBundle) -> np.ndarray:
    """Labels of the whole packed/folder dataset in its original order (for the split fingerprint)."""
    n = sum(len(v) for v in bundle.split_indices.values())
    labels = np.empty(n, dtype=np.int64)
    for k, idx in bundle.split_indices.items():
        labels[idx] = bundle.splits[k].labels.numpy()
    return labels


def _slim(m: dict) -> dict:
    keep = ("acc", "auc", "precision", "recall", "f1", "loss", "n", "mae", "qwk", "auc_defined_mean")
    return {k: (float(m[k]) if isinstance(m[k], (float, np.floating)) else m[k]) for k in keep if k in m}


def _jsonable(o: Any) -> Any:
    if isinstance(o, dict):
        return {k: _jsonable(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_jsonable(v) for v in o]
    if isinstance(o, (np.floating, float)):
        return None if not np.isfinite(o) else float(o)
    if isinstance(o, np.integer):
        return int(o)
    return o


def _append_jsonl(path: Path, row: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(_jsonable(row)) + "\n")


def _write_history_csv(path: Path, history: list[dict]) -> None:
    if not history:
        return
    cols = list(history[0])
    lines = [",".join(cols)] + [",".join(f"{r[c]:.6g}" if isinstance(r[c], float) else str(r[c]) for c in cols)
                                for r in history]
    atomic_write_text(path, "\n".join(lines) + "\n")


def machine_description() -> str:
    import platform

    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}, {platform.system()}"


def set_threads() -> None:
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    torch.set_num_threads(max(1, n))
