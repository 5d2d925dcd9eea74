"""Training and evaluation loops on in-memory uint8 data.

``train(TrainConfig(...))`` loads the data, builds the model, trains with Adam/AdamW and a per-step schedule,
evaluates on the validation split after every epoch, keeps the best weights (by the monitored validation metric) as
``best_model.pth`` and the latest as ``last.pth``, stops early after ``patience`` epochs without improvement, then
reads the test split once with the best weights. The run is built in ``<out>.partial`` and renamed to ``<out>``
when complete, so a run directory is never half-written.

Every epoch's randomness (data order, augmentation, dropout) is derived from ``(seed, epoch)``, and ``last.pth``
holds the whole training state after each epoch (optimiser, schedule, early stopping, history), so ``resume=``
continues a killed or finished run exactly where it stopped. Under ``torchrun`` training is data-parallel
(:mod:`medmix.distributed`).
"""
from __future__ import annotations

import json
import math
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn as nn

from . import distributed
from ._version import __version__
from .checkpoint import atomic_write_text, save_checkpoint
from .data import (
    NORMALIZATIONS,
    BatchTransform,
    DataBundle,
    Split,
    dataset_spec,
    get_policy,
    load_dataset,
    normalization,
)
from .data.tasks import BINARY, MULTI_LABEL
from .errors import CheckpointError, ConfigError
from .inference import autocast as _autocast

# the inference helpers the loop uses; also importable from here, as before they moved to medmix.inference
from .inference import (  # noqa: F401
    bf16_supported,
    extract,
    iterate_batches,
    machine_description,
    predict_logits,
    probabilities,
    resolve_precision,
    set_threads,
)
from .losses import build_loss, default_loss_name
from .metrics import compute_metrics
from .models import create_model, model_info
from .paths import check_writable_dir
from .small_data import (
    MIN_PER_SIDE_FOR_THRESHOLD,
    MIN_VAL_FOR_MODEL_SELECTION,
    MIN_VAL_FOR_OOD_THRESHOLD,
    MIN_VAL_FOR_TEMPERATURE,
    warn,
)

MONITORS = ("auto", "acc", "auc", "loss", "f1")


@dataclass
class RecipeConfig:
    """The training recipe shared by single-dataset runs (:class:`TrainConfig`) and generalists
    (:class:`medmix.generalist.GeneralistConfig`)."""
    data_dir: str | None = None
    size: int = 28  # which MedMNIST file (28/64/128/224); other datasets are read at their stored size
    img_size: int | None = None  # model input side; default: the stored image size (generalist: the smallest)
    model: str = "hybrid_mixer_small"
    epochs: int = 30
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.0
    optimizer: str = "adam"
    schedule: str = "cosine"
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.0
    drop_rate: float = 0.0
    drop_path_rate: float | None = None  # None: the model's own default (MedViT's official 0.1/0.2)
    patience: int = 10
    precision: str = "auto"
    seed: int = 0
    out: str | None = None
    overwrite: bool = False
    download: bool = False
    eval_batch_size: int = 512
    normalize: str = "dataset"  # "dataset": per-channel train mean/std; "half": mean .5 / std .5 (official MedMNIST)
    bn_recalibrate: bool = True  # re-estimate BatchNorm statistics of the best weights on un-augmented train images
    calibrate: bool = True  # fit the confidence temperature on the val logits at the end (medmix.calibrate)
    ood: bool = True  # fit the out-of-distribution statistics and threshold at the end (medmix.ood)
    quiet: bool = False
    model_kwargs: dict = field(default_factory=dict)


def _range(name: str, value: float | None, lo: float, hi: float = math.inf, *, lo_open: bool = False,
           hi_open: bool = False, optional: bool = False) -> None:
    if value is None and optional:
        return
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and (
        (value > lo if lo_open else value >= lo) and (value < hi if hi_open else value <= hi))
    if not ok:
        lb, rb = "(" if lo_open else "[", ")" if hi_open or hi == math.inf else "]"
        raise ConfigError(f"--{name.replace('_', '-')} must be in {lb}{lo:g}, {hi:g}{rb}, got {value!r}")


def check_recipe(cfg: RecipeConfig) -> None:
    """Refuse recipe values that cannot train (one line each, before any data is read). Single-dataset and
    generalist runs share it."""
    for name in ("epochs", "batch_size", "eval_batch_size", "patience"):
        v = getattr(cfg, name)
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be an integer of at least 1, got {v!r}")
    _range("lr", cfg.lr, 0.0, 10.0, lo_open=True)
    _range("weight_decay", cfg.weight_decay, 0.0)
    _range("warmup_epochs", cfg.warmup_epochs, 0.0)
    _range("label_smoothing", cfg.label_smoothing, 0.0, 1.0, hi_open=True)
    _range("drop_rate", cfg.drop_rate, 0.0, 1.0, hi_open=True)
    _range("drop_path_rate", cfg.drop_path_rate, 0.0, 1.0, hi_open=True, optional=True)
    if cfg.size not in (28, 64, 128, 224):
        raise ConfigError(f"--size must be 28, 64, 128 or 224 (the MedMNIST file sizes), got {cfg.size!r}")
    if cfg.img_size is not None:
        if not isinstance(cfg.img_size, int) or isinstance(cfg.img_size, bool) or cfg.img_size < 1:
            raise ConfigError(f"--img-size must be a positive integer, got {cfg.img_size!r}")
        need = model_info(cfg.model).min_img_size
        if cfg.img_size < need:
            raise ConfigError(f"model {cfg.model!r} needs --img-size >= {need}, got {cfg.img_size}")
    if cfg.optimizer not in ("adam", "adamw"):
        raise ConfigError(f"unknown optimizer {cfg.optimizer!r}; use adam or adamw")
    if cfg.schedule not in ("cosine", "step", "none"):
        raise ConfigError(f"unknown schedule {cfg.schedule!r}; use cosine, step or none")
    if cfg.normalize not in NORMALIZATIONS:
        raise ConfigError(f"unknown normalize {cfg.normalize!r}; use {' or '.join(NORMALIZATIONS)}")
    resolve_precision(cfg.precision)
    if isinstance(cfg, TrainConfig):
        _range("alpha", cfg.alpha, 0.0, 1.0)
        _range("margin", cfg.margin, 0.0)
        _monitor(cfg.monitor, "binary-class")


@dataclass
class TrainConfig(RecipeConfig):
    dataset: str = "breastmnist"
    loss: str | None = None  # default by task: ce (single label), bce (multi-label)
    alpha: float = 0.2  # ordinal loss mix
    margin: float = 0.1  # ordinal loss margin
    ordinal_variant: str = "peaked"
    augment: str | None = None  # policy name; default by dataset
    monitor: str = "auto"
    tune_threshold: bool = False  # multi-label: per-label thresholds chosen on val (else 0.5)
    resume: str | bool | None = None  # a run directory to continue; True: continue `out` if it holds a run
    ddp: bool | None = None  # data-parallel: None = when launched by torchrun with several processes


@dataclass
class TrainResult:
    run_dir: Path
    best_epoch: int
    val: dict
    test: dict
    history: list[dict]
    seconds: float
    rank: int = 0  # the process that returned it (data-parallel runs: only rank 0 wrote the files)

    def summary(self) -> dict:
        keys = ("acc", "auc", "precision", "recall", "f1", "n", "mae", "qwk")
        return {"run_dir": str(self.run_dir), "best_epoch": self.best_epoch, "seconds": round(self.seconds, 2),
                "val": {k: self.val[k] for k in keys if k in self.val},
                "test": {k: self.test[k] for k in keys if k in self.test}}


# ----------------------------------------------------------------------------------------------- batches
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
    if final.exists() and not final.is_dir():
        raise ConfigError(f"{final} exists and is not a directory; choose another --out")
    if final.exists() and any(final.iterdir()) and not cfg.overwrite:
        raise ConfigError(f"{final} already exists and is not empty; pass --overwrite or choose another --out")
    partial = final.with_name(final.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    return final, partial


# ----------------------------------------------------------------------------------------------- resuming
# settings a resumed run may change: they do not alter the epochs already trained
RESUME_MAY_CHANGE = ("epochs", "patience", "eval_batch_size", "tune_threshold", "bn_recalibrate", "calibrate", "ood",
                     "data_dir",
                     "download", "overwrite", "quiet", "out", "resume", "ddp")
TRAIN_STATE_KEYS = ("optimizer", "epoch", "best_score", "best_epoch", "bad_epochs", "history")


def epoch_seed(seed: int, epoch: int, stream: int = 0) -> int:
    """The seed of one epoch's random stream (0: data order and augmentation; 1 + rank: the global RNG)."""
    state = np.random.SeedSequence([seed & 0xFFFFFFFFFFFFFFFF, epoch, stream]).generate_state(2, np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])  # < 2**63


@dataclass
class _ResumePoint:
    final: Path  # where the run ends up
    source: Path  # the directory holding last.pth: ``<final>.partial`` (a killed run) or ``final`` (a finished one)
    checkpoint: Path
    meta: dict
    state: dict
    train_state: dict

    @property
    def in_place(self) -> bool:
        return self.source != self.final


def _non_default_fields(cfg: TrainConfig) -> set[str]:
    from dataclasses import fields

    default = TrainConfig()
    return {f.name for f in fields(TrainConfig) if getattr(cfg, f.name) != getattr(default, f.name)}


def _find_resume(cfg: TrainConfig) -> _ResumePoint | None:
    """The newest resumable state for ``cfg.resume``: the ``.partial`` build directory of a killed run first (it is
    newer than the finished run it may continue), then the finished run."""
    from .checkpoint import load_checkpoint

    if cfg.resume is None or cfg.resume is False:
        return None
    if cfg.resume is True:
        if not cfg.out:
            raise ConfigError("--resume without a directory continues --out; pass --out DIR (or --resume RUN_DIR)")
        target, required = Path(cfg.out), False
    else:
        target, required = Path(cfg.resume), True
    final = target.with_name(target.name[:-len(".partial")]) if target.name.endswith(".partial") else target
    if cfg.out and cfg.resume is not True and Path(cfg.out).resolve() != final.resolve():
        raise ConfigError(f"--out {cfg.out} differs from the resumed run {final}; a run is continued where it is")
    partial = final.with_name(final.name + ".partial")
    first_error = None
    for source in (partial, final):
        ckpt = source / "last.pth"
        if not ckpt.is_file():
            continue
        try:
            state, meta, ts = load_checkpoint(ckpt)
        except CheckpointError as e:  # e.g. a copy interrupted mid-file: fall back to the finished run
            first_error = first_error or e
            continue
        missing = [k for k in TRAIN_STATE_KEYS if not isinstance(ts, dict) or k not in ts]
        if missing:
            raise CheckpointError(f"{ckpt}: no resumable training state (lacks {', '.join(missing)}; written by an "
                                  f"older medmix?)")
        if not isinstance(meta.get("train_config"), dict):
            raise CheckpointError(f"{ckpt}: the checkpoint does not record its training configuration")
        return _ResumePoint(final, source, ckpt, meta, state, ts)
    if first_error is not None:
        raise first_error
    if required:
        raise ConfigError(f"nothing to resume in {target}: no last.pth in {final} or {partial.name} (a run killed "
                          f"before its first epoch ended has nothing saved; start it again without --resume)")
    return None


def _resumed_config(cfg: TrainConfig, resume: _ResumePoint, given: set[str]) -> TrainConfig:
    from dataclasses import fields

    names = {f.name for f in fields(TrainConfig)}
    stored = {k: v for k, v in resume.meta["train_config"].items() if k in names}
    default = TrainConfig()
    for k in sorted(given & names - set(RESUME_MAY_CHANGE)):
        mine, theirs = _as_json(getattr(cfg, k)), _as_json(stored.get(k, getattr(default, k)))
        if mine != theirs:
            raise ConfigError(f"--{k.replace('_', '-')} {getattr(cfg, k)!r} differs from the resumed run's "
                              f"{stored.get(k, getattr(default, k))!r}; a resumed run keeps its settings (only "
                              f"--epochs, --patience, --eval-batch-size, --data-dir and the final steps may change)")
    merged = {**stored, **{k: getattr(cfg, k) for k in given & set(RESUME_MAY_CHANGE) if k in names}}
    merged.update(out=str(resume.final), resume=cfg.resume, ddp=cfg.ddp, quiet=cfg.quiet, overwrite=False)
    return TrainConfig(**merged)


def _as_json(v: Any) -> Any:
    return json.loads(json.dumps(v))


def _resume_run_dir(resume: _ResumePoint) -> tuple[Path, Path]:
    """Continue in the ``.partial`` directory of a killed run, or in a copy of a finished run (the finished run
    stays untouched until the continued one replaces it)."""
    partial = resume.final.with_name(resume.final.name + ".partial")
    if resume.in_place:
        for stray in partial.glob(".*.tmp*"):  # temporary files of writes the kill interrupted
            stray.unlink()
        return resume.final, partial
    copy = partial.with_name(partial.name + ".copying")
    for d in (partial, copy):
        if d.exists():
            shutil.rmtree(d)
    shutil.copytree(resume.final, copy)
    copy.rename(partial)
    return resume.final, partial


def _result_of_finished_run(run_dir: Path, rank: int = 0) -> TrainResult:
    """A finished run's result read back from its files (what processes other than 0 return)."""
    doc = json.loads((run_dir / "metrics.json").read_text())
    history = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines() if line.strip()]
    return TrainResult(run_dir, int(doc["best_epoch"]), doc["val"], doc["test"], history,
                       float(doc.get("train_seconds") or 0.0), rank)


def _finish_run_dir(final: Path, partial: Path) -> None:
    trash = final.with_name(final.name + ".old")
    if final.exists():
        if trash.exists():
            shutil.rmtree(trash)
        final.rename(trash)
        partial.rename(final)
    else:
        partial.rename(final)
    if trash.exists():  # also the leftover of a run killed between the two renames, then resumed
        shutil.rmtree(trash)


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
        "train_config": {k: v for k, v in asdict(cfg).items() if k not in ("quiet", "resume", "ddp")},
    }


def train(cfg: TrainConfig | None = None, *, log: Callable[[str], None] | None = None, **kwargs: Any) -> TrainResult:
    """Train a model; see :class:`TrainConfig` for the arguments (also accepted as keywords).

    ``resume``: continue the run in this directory (its ``.partial`` build directory when a run was killed, else the
    finished run, for more ``epochs``) from its ``last.pth``: weights, optimiser, schedule, early-stopping state,
    history and data order, so the result is the one an uninterrupted run would have given. ``resume=True``
    continues ``out`` when it holds a resumable run, else starts it. Settings given explicitly must match the
    run's, except those in ``RESUME_MAY_CHANGE`` (``epochs``, ``patience``, ...).

    Launched by ``torchrun`` with several processes (or with ``ddp=True``), trains data-parallel; see
    :mod:`medmix.distributed`. Only process 0 writes; every process returns the result.
    """
    given = set(kwargs) if cfg is None else _non_default_fields(cfg)
    cfg = cfg or TrainConfig(**kwargs)
    ctx = distributed.setup(cfg.ddp)
    try:
        return _train(cfg, given, ctx, log)
    finally:
        ctx.close()


def _train(cfg: TrainConfig, given: set[str], ctx: distributed.Context, log: Callable[[str], None] | None
           ) -> TrainResult:
    resume = _find_resume(cfg)
    if resume is not None:
        cfg = _resumed_config(cfg, resume, given)
    quiet = cfg.quiet or not ctx.is_main
    say = (log or (lambda s: None if quiet else print(s, file=sys.stderr))) if ctx.is_main else (lambda s: None)
    check_recipe(cfg)
    if cfg.batch_size < ctx.world_size:
        raise ConfigError(f"--batch-size {cfg.batch_size} is smaller than the {ctx.world_size} processes: the batch "
                          f"is the global batch, split across processes")
    ts = resume.train_state if resume is not None else None
    if resume is not None and not resume.in_place:  # a finished run: is there anything left to do?
        if ts["epoch"] >= cfg.epochs:
            raise ConfigError(f"{resume.final} has already trained {ts['epoch']} epochs; pass --epochs greater than "
                              f"{ts['epoch']} to continue it")
        if ts["bad_epochs"] >= cfg.patience:
            raise ConfigError(f"{resume.final} stopped early after {ts['bad_epochs']} epochs without improvement; "
                              f"pass --patience greater than {ts['bad_epochs']} to continue it")
    precision = resolve_precision(cfg.precision)
    model_info(cfg.model)  # fail fast on an unknown model name, before reading data
    if resume is None and ctx.is_main:  # a bad --out must fail before any training, not after the first epoch
        check_writable_dir(cfg.out or "runs", "--out")
    torch.manual_seed(cfg.seed)
    split_file = resume.source / "split.json" if resume is not None else None
    bundle = load_dataset(cfg.dataset, data_dir=cfg.data_dir, size=cfg.size, seed=cfg.seed, download=cfg.download,
                          split_file=split_file if split_file is not None and split_file.is_file() else None)
    info = bundle.info
    img_size = cfg.img_size or bundle.image_size
    augment = cfg.augment or (dataset_spec(bundle.name).augment if _known(bundle.name) else "rotate_flip_zoom")
    mean, std = normalization(cfg.normalize, [bundle.splits["train"].images])
    train_tf = BatchTransform(img_size, mean, std, get_policy(augment))
    eval_tf = BatchTransform(img_size, mean, std)
    loss_name = cfg.loss or default_loss_name(info.task)
    loss_fn = build_loss(loss_name, info.task, info.num_classes, alpha=cfg.alpha, margin=cfg.margin,
                         label_smoothing=cfg.label_smoothing, ordinal_variant=cfg.ordinal_variant)
    eval_loss = build_loss(default_loss_name(info.task), info.task, info.num_classes)
    model_kwargs = dict(num_classes=info.num_classes, in_chans=info.n_channels, img_size=img_size,
                        drop_rate=cfg.drop_rate, drop_path_rate=cfg.drop_path_rate, **cfg.model_kwargs)
    model = create_model(cfg.model, **model_kwargs).to(memory_format=torch.channels_last)
    if ctx.world_size > 1:
        model = distributed.convert_sync_batchnorm(model, ctx.device)
    model = model.to(ctx.device)
    monitor = _monitor(cfg.monitor, info.task)
    meta = build_meta(cfg, bundle, model_kwargs, img_size, mean, std, loss_name, augment)
    meta["monitor"], meta["precision"] = monitor, precision
    small_val = len(bundle.splits["val"]) < MIN_VAL_FOR_MODEL_SELECTION
    if small_val:
        warn(f"the validation split has {len(bundle.splits['val'])} images (fewer than "
             f"{MIN_VAL_FOR_MODEL_SELECTION}): too few to pick a best epoch or stop early; all {cfg.epochs} epochs "
             f"are trained and the last one is kept", meta, show=ctx.is_main)

    params = [p for p in model.parameters() if p.requires_grad]
    opt_cls = torch.optim.Adam if cfg.optimizer == "adam" else torch.optim.AdamW
    opt = opt_cls(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    tr = bundle.splits["train"]
    drop_last = len(tr) > 2 * cfg.batch_size
    steps_per_epoch = len(tr) // cfg.batch_size if drop_last else math.ceil(len(tr) / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    sched = _schedule(opt, cfg.schedule, total, int(cfg.warmup_epochs * steps_per_epoch))
    history: list[dict] = []
    best_score, best_epoch, bad_epochs, start_epoch, seconds_before = -math.inf, 0, 0, 1, 0.0
    if ts is not None:
        try:
            model.load_state_dict(resume.state)
            opt.load_state_dict(ts["optimizer"])
            if sched is not None and ts.get("scheduler") is not None:
                sched.load_state_dict(ts["scheduler"])
        except (RuntimeError, ValueError, KeyError) as e:
            raise CheckpointError(f"{resume.checkpoint}: does not fit this run's model/optimiser "
                                  f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
        history = [dict(r) for r in ts["history"]]
        best_score, best_epoch, bad_epochs = float(ts["best_score"]), int(ts["best_epoch"]), int(ts["bad_epochs"])
        start_epoch, seconds_before = int(ts["epoch"]) + 1, float(ts.get("seconds", 0.0))
        if isinstance(ts.get("rng_state"), torch.Tensor):
            torch.set_rng_state(ts["rng_state"])

    def open_run_dir() -> tuple[Path, Path]:
        final, run = _resume_run_dir(resume) if resume is not None else _prepare_run_dir(cfg.out, cfg)
        if bundle.split_indices is not None:
            from .data.folders import save_split

            save_split(run / "split.json", bundle.split_indices, cfg.seed, _all_labels(bundle),
                       bundle.source["path"])
        atomic_write_text(run / "config.json", json.dumps(meta["train_config"], indent=2))
        # the log is rebuilt from the restored history: lines appended after last.pth was written are dropped
        atomic_write_text(run / "log.jsonl", "".join(json.dumps(_jsonable(r)) + "\n" for r in history))
        return final, run

    final, run = ctx.on_main(open_run_dir) or (None, None)
    final = Path(ctx.broadcast_object(str(final) if final is not None else None))

    net: nn.Module = model
    if ctx.world_size > 1:
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(model, device_ids=[ctx.device] if ctx.device.type == "cuda" else None)
    gen = torch.Generator()
    world = f", {ctx.world_size} processes" if ctx.world_size > 1 else ""
    say(f"{'resuming at epoch ' + str(start_epoch) + ': ' if resume is not None else ''}training {cfg.model} "
        f"({sum(p.numel() for p in params) / 1e6:.2f} M params) on {bundle.name} "
        f"[{info.task}, {info.num_classes} classes, {len(tr)}/{len(bundle.splits['val'])}/"
        f"{len(bundle.splits['test'])} images, {img_size} px, {precision}{world}] -> {final}")
    stopped = bad_epochs >= cfg.patience  # a killed run that had already stopped early only needs finishing
    t_start = time.perf_counter()
    for epoch in range(start_epoch, cfg.epochs + 1):
        if stopped:
            break
        # all randomness of an epoch derives from (seed, epoch): resuming at an epoch boundary repeats it exactly.
        # `gen` (data order, augmentation) is the same on every process; the global RNG (dropout) differs per rank.
        gen.manual_seed(epoch_seed(cfg.seed, epoch))
        torch.manual_seed(epoch_seed(cfg.seed, epoch, 1 + ctx.rank))
        model.train()
        t0, seen, loss_sum = time.perf_counter(), 0, 0.0
        bar = _progress(steps_per_epoch, f"epoch {epoch}/{cfg.epochs}", quiet)
        for idx in iterate_batches(len(tr), cfg.batch_size, gen, drop_last):
            rows, weight = None, 1.0
            if ctx.world_size > 1:
                if len(idx) < ctx.world_size:  # a last batch too small to give every process an image
                    continue
                rows = distributed.shard(len(idx), ctx.rank, ctx.world_size)
                weight = (rows.stop - rows.start) * ctx.world_size / len(idx)  # DDP averages; this makes it a sum
            x = train_tf(tr.images[idx], train=True, generator=gen, rows=rows)
            y = tr.labels[idx] if rows is None else tr.labels[idx[rows]]
            if ctx.device.type != "cpu":
                x, y = x.to(ctx.device, non_blocking=True), y.to(ctx.device, non_blocking=True)
            with _autocast(precision):
                logits = net(x)
            loss = loss_fn(logits.float(), y)
            opt.zero_grad(set_to_none=True)
            (loss * weight if rows is not None else loss).backward()
            opt.step()
            if sched is not None:
                sched.step()
            seen += len(y)
            loss_sum += float(loss.detach()) * len(y)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss_sum / seen:.4f}", img_s=f"{seen / (time.perf_counter() - t0):.0f}")
        if bar is not None:
            bar.close()
        if ctx.world_size > 1:
            loss_sum, seen = ctx.all_sum([loss_sum, float(seen)])
        train_time = time.perf_counter() - t0

        def end_epoch(epoch: int, loss_sum: float, seen: float, train_time: float, t0: float) -> int:
            nonlocal best_score, best_epoch, bad_epochs
            val = evaluate_split(model, bundle.splits["val"], eval_tf, info.task, info.class_names, eval_loss,
                                 cfg.eval_batch_size, precision)
            row = {"epoch": epoch, "train_loss": loss_sum / max(seen, 1), "val_loss": val["loss"],
                   "val_acc": val["acc"], "val_auc": val["auc"], "lr": opt.param_groups[0]["lr"],
                   "train_img_s": seen / train_time, "epoch_seconds": time.perf_counter() - t0}
            history.append(row)
            _append_jsonl(run / "log.jsonl", row)
            # too few val images to choose an epoch: every epoch "improves", so the last one is kept, none stops early
            score = float(epoch) if small_val else _score(val, monitor)
            improved = score > best_score
            if improved:
                best_score, best_epoch, bad_epochs = score, epoch, 0
                save_checkpoint(run / "best_model.pth", model, {**meta, "epoch": epoch, "val_metrics": _slim(val)})
            else:
                bad_epochs += 1
            # written after best_model.pth: a kill in between repeats this epoch, which improves again identically
            save_checkpoint(run / "last.pth", model, {**meta, "epoch": epoch, "val_metrics": _slim(val)},
                            train_state={"optimizer": opt.state_dict(),
                                         "scheduler": sched.state_dict() if sched is not None else None,
                                         "epoch": epoch, "best_score": best_score, "best_epoch": best_epoch,
                                         "bad_epochs": bad_epochs, "history": history,
                                         "rng_state": torch.get_rng_state(),
                                         "seconds": seconds_before + time.perf_counter() - t_start,
                                         "world_size": ctx.world_size})
            say(f"epoch {epoch:3d}  loss {row['train_loss']:.4f}  val loss {val['loss']:.4f}  acc {val['acc']:.4f}  "
                f"auc {val['auc']:.4f}  {row['train_img_s']:.0f} img/s{'  *' if improved else ''}")
            if bad_epochs >= cfg.patience:
                say(f"early stop: no {monitor} improvement on val for {cfg.patience} epochs")
                return 1
            return 0

        if ctx.broadcast_int(ctx.on_main(lambda e=epoch, ls=loss_sum, n=seen, tt=train_time, t=t0:
                                         end_epoch(e, ls, n, tt, t)) or 0):
            break
    seconds = seconds_before + time.perf_counter() - t_start

    def finish() -> TrainResult:
        # the test split is read once, with the weights chosen on val
        from .checkpoint import load_checkpoint

        final_model = model
        if ctx.world_size > 1 or ctx.device.type != "cpu":  # plain BatchNorm, on the CPU, for the last passes
            final_model = create_model(cfg.model, **model_kwargs).to(memory_format=torch.channels_last)
        state, _, _ = load_checkpoint(run / "best_model.pth")
        final_model.load_state_dict(state)
        if cfg.bn_recalibrate and not get_policy(augment).identity and \
                recalibrate_batchnorm(final_model, tr.images, eval_tf):
            meta["bn_recalibrated"] = True
        extras = fit_confidence(final_model, bundle, eval_tf, info.task, meta, calibrate=cfg.calibrate, ood=cfg.ood,
                                batch_size=cfg.eval_batch_size, seed=cfg.seed, say=say)
        val = evaluate_split(final_model, bundle.splits["val"], eval_tf, info.task, info.class_names, eval_loss,
                             cfg.eval_batch_size, precision, return_probs=True)
        threshold: float | list[float] = 0.5
        if cfg.tune_threshold and info.task == MULTI_LABEL:
            threshold = tune_thresholds(val.pop("_probs"), bundle.splits["val"].labels.numpy(), info.class_names,
                                        meta, show=ctx.is_main)
            val = evaluate_split(final_model, bundle.splits["val"], eval_tf, info.task, info.class_names, eval_loss,
                                 cfg.eval_batch_size, precision, threshold=threshold)
        val.pop("_probs", None)
        test = evaluate_split(final_model, bundle.splits["test"], eval_tf, info.task, info.class_names, eval_loss,
                              cfg.eval_batch_size, precision, threshold=threshold)
        meta.update(threshold=threshold, epoch=best_epoch, epochs_run=len(history), val_metrics=_slim(val),
                    test_metrics=_slim(test),
                    train_seconds=seconds, machine=machine_description())
        save_checkpoint(run / "best_model.pth", final_model, meta, extras=extras)
        metrics_doc = {"dataset": bundle.name, "model": cfg.model, "seed": cfg.seed, "best_epoch": best_epoch,
                       "epochs_run": len(history), "monitor": monitor, "float_precision": precision,
                       "train_seconds": seconds, "machine": machine_description(), "native_bf16": bf16_supported(),
                       "medmix_version": __version__, "warnings": meta.get("warnings", []), "val": val, "test": test}
        atomic_write_text(run / "metrics.json", json.dumps(_jsonable(metrics_doc), indent=2))
        _write_history_csv(run / "log.csv", history)
        from .report import plot_curves, write_confusion

        plot_curves(history, run / "curves.png", best_epoch)
        write_confusion(test, info, run / "confusion_test.png", f"{bundle.name} test - {cfg.model}")
        _finish_run_dir(final, run)
        return TrainResult(final, best_epoch, val, test, history, seconds)

    result = ctx.on_main(finish)  # the other processes wait here until the run directory is complete
    return result if ctx.is_main else _result_of_finished_run(final, ctx.rank)

@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, images: torch.Tensor, transform: BatchTransform, batch_size: int = 256
                          ) -> bool:
    """Recompute every BatchNorm's running statistics as the average of per-batch statistics over un-augmented
    ``images`` (equal weight per batch, as ``momentum=None`` does).

    Training sees augmented images (rotated, zoomed, zero-padded), so the running statistics describe a slightly
    different distribution from the clean images met at evaluation; re-estimating them on clean training images
    removes that shift (measured on PneumoniaMNIST val: ACC .897 -> .928 at equal AUC). Returns False when the model
    has no BatchNorm.

    The batches are drawn in a fixed random order: in storage order a class-sorted split (a packed npz whose split
    indices are sorted) gives single-class batches, whose variances miss the between-class spread; that collapsed
    MedNIST from .9997 to .80 val ACC before the order was shuffled."""
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
    for idx in iterate_batches(len(images), batch_size, torch.Generator().manual_seed(0)):
        model(transform(images[idx]))
    for m, (momentum, _) in zip(bns, saved):
        m.momentum = momentum
    model.train(was_training)
    return True


def fit_confidence(model: nn.Module, bundle: DataBundle, transform: BatchTransform, task: str, meta: dict, *,
                   calibrate: bool = True, ood: bool = True, batch_size: int = 512, seed: int = 0,
                   say: Callable[[str], None] | None = None) -> dict[str, torch.Tensor]:
    """The final weights' trust data, written into ``meta``: the temperature fitted on the val logits
    (``meta["temperature"]``, ``meta["calibration"]``, :mod:`medmix.calibrate`) and the out-of-distribution
    thresholds (``meta["ood"]``, :mod:`medmix.ood`). Returns the checkpoint extras (the OOD statistics)."""
    from . import ood as ood_mod
    from .calibrate import fit_calibration

    if not (calibrate or ood):
        return {}
    val = bundle.splits["val"]
    if calibrate and len(val) < MIN_VAL_FOR_TEMPERATURE:
        warn(f"the validation split has {len(val)} images (fewer than {MIN_VAL_FOR_TEMPERATURE}): no confidence "
             f"temperature fitted (T = 1); probabilities are the model's own", meta, show=say is not None)
        calibrate = False
    logits, features = extract(model, val.images, transform, batch_size)
    extras: dict[str, torch.Tensor] = {}
    if calibrate:
        meta["temperature"], meta["calibration"] = fit_calibration(logits, val.labels, task)
        c = meta["calibration"]
        t = meta["temperature"]
        if say is not None:
            say(f"calibration on val: T = {t:.3f}  NLL {c['nll_before']:.4f} -> {c['nll_after']:.4f}  ECE "
                f"{c['ece_before']:.4f} -> {c['ece_after']:.4f}" if isinstance(t, float) else
                f"calibration on val: per-label T, NLL {c['nll_before']:.4f} -> {c['nll_after']:.4f}")
    if ood:
        tr = bundle.splits["train"]
        if len(val) < MIN_VAL_FOR_OOD_THRESHOLD:
            warn(f"the validation split has {len(val)} images (fewer than {MIN_VAL_FOR_OOD_THRESHOLD}): the "
                 f"out-of-distribution threshold is set on the training and validation images together "
                 f"(stricter: more images flagged)", meta, show=say is not None)
        meta["ood"], extras = ood_mod.fit(model, tr.images, tr.labels, val.images, transform, task,
                                          batch_size=batch_size, seed=seed, val=(logits, features),
                                          pool_train=len(val) < MIN_VAL_FOR_OOD_THRESHOLD)
    return extras


def tune_thresholds(probs: np.ndarray, labels: np.ndarray, class_names: list[str] | None = None,
                    meta: dict | None = None, *, show: bool = True, grid: int = 99) -> list[float]:
    """Per label, the threshold in (0, 1) with the best validation accuracy (ties: the one nearest 0.5). A label
    with fewer than ``MIN_PER_SIDE_FOR_THRESHOLD`` positive or negative val images keeps 0.5 (one warning)."""
    cands = np.linspace(0.01, 0.99, grid)
    out, kept = [], []
    for j in range(probs.shape[1]):
        pos = int((labels[:, j] > 0.5).sum())
        if min(pos, len(labels) - pos) < MIN_PER_SIDE_FOR_THRESHOLD:
            out.append(0.5)
            kept.append(class_names[j] if class_names else str(j))
            continue
        acc = ((probs[:, j][None, :] > cands[:, None]) == (labels[:, j][None, :] > 0.5)).mean(1)
        best = np.flatnonzero(acc == acc.max())
        out.append(float(cands[best[np.argmin(np.abs(cands[best] - 0.5))]]))
    if kept:
        warn(f"{len(kept)} label(s) have fewer than {MIN_PER_SIDE_FOR_THRESHOLD} positive or negative validation "
             f"images ({', '.join(kept[:5])}{', ...' if len(kept) > 5 else ''}): their decision threshold stays 0.5",
             meta, show=show)
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


