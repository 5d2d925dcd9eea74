"""Training and evaluation loops on in-memory uint8 data.

``train(TrainConfig(...))`` loads the data, builds the model, trains with Adam/AdamW and a per-step schedule,
evaluates on the validation split after every epoch, keeps the best weights (by the monitored validation metric) as
``best_model.pth`` and the latest as ``last.pth``, stops early after ``patience`` epochs without improvement, then
reads the test split once with the best weights. The loop is :func:`medmix.training.fit`: the run is built in
``<out>.partial`` (never half-written), every epoch's randomness (data order, augmentation, dropout) derives from
``(seed, epoch)`` and ``last.pth`` holds the whole training state, so ``resume=`` continues a killed or finished run
exactly where it stopped. Under ``torchrun`` training is data-parallel (:mod:`medmix.distributed`).
"""
from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn as nn

from . import distributed
from ._version import __version__
from .atomic import atomic_write_text
from .checkpoint import GENERALIST, is_generalist, load_checkpoint, save_checkpoint
from .config import OPTIMIZERS, TEACHER_VIEWS, RecipeConfig, TrainConfig  # noqa: F401  (medmix.engine.TrainConfig, as before)
from .corruptions import Corruption, corruption_set_name, corruptions_for, random_corruptions
from .data import (NORMALIZATIONS, BatchTransform, DataBundle, Split, dataset_spec, get_policy, load_dataset,
                   normalization)
from .data.mixing import BatchMix
from .data.tasks import BINARY, MULTI_LABEL
from .errors import ConfigError
from .evaluation import score_logits
from .inference import (autocast, bf16_supported, extract, iterate_batches, machine_description, predict_logits,
                        resolve_precision)
from .losses import build_loss, default_loss_name, distillation_loss
from .models import create_model, model_info
from .paths import check_writable_dir
from .small_data import (MIN_PER_SIDE_FOR_THRESHOLD, MIN_VAL_FOR_MODEL_SELECTION, MIN_VAL_FOR_OOD_THRESHOLD,
                         MIN_VAL_FOR_TEMPERATURE, warn)
from .training import (ResumePoint, Step, Task, Validation, check_resume_left, epoch_seed, find_resume, fit,
                       jsonable, write_history_csv)

MONITORS = ("auto", "acc", "auc", "loss", "f1")


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
    _range("ema", cfg.ema, 0.0, 1.0, lo_open=True, hi_open=True, optional=True)
    if cfg.size not in (28, 64, 128, 224):
        raise ConfigError(f"--size must be 28, 64, 128 or 224 (the MedMNIST file sizes), got {cfg.size!r}")
    if cfg.img_size is not None:
        if not isinstance(cfg.img_size, int) or isinstance(cfg.img_size, bool) or cfg.img_size < 1:
            raise ConfigError(f"--img-size must be a positive integer, got {cfg.img_size!r}")
        need = model_info(cfg.model).min_img_size
        if cfg.img_size < need:
            raise ConfigError(f"model {cfg.model!r} needs --img-size >= {need}, got {cfg.img_size}")
    if cfg.optimizer not in OPTIMIZERS:
        raise ConfigError(f"unknown optimizer {cfg.optimizer!r}; use adam, adamw or sgd")
    if cfg.schedule not in ("cosine", "step", "none"):
        raise ConfigError(f"unknown schedule {cfg.schedule!r}; use cosine, step or none")
    if cfg.normalize not in NORMALIZATIONS:
        raise ConfigError(f"unknown normalize {cfg.normalize!r}; use {' or '.join(NORMALIZATIONS)}")
    resolve_precision(cfg.precision)
    if isinstance(cfg, TrainConfig):
        _range("alpha", cfg.alpha, 0.0, 1.0)
        _range("margin", cfg.margin, 0.0)
        _range("mixup", cfg.mixup, 0.0, 100.0)
        _range("cutmix", cfg.cutmix, 0.0, 100.0)
        _range("mix_prob", cfg.mix_prob, 0.0, 1.0)
        _range("corrupt", cfg.corrupt, 0.0, 1.0)
        _range("distill_weight", cfg.distill_weight, 0.0, 1.0)
        _range("distill_temperature", cfg.distill_temperature, 0.0, 100.0, lo_open=True)
        if cfg.teacher_views not in TEACHER_VIEWS:
            raise ConfigError(f"unknown teacher_views {cfg.teacher_views!r}; use {' or '.join(TEACHER_VIEWS)}")
        _monitor(cfg.monitor, "binary-class")
        return
    if cfg.steps_per_epoch is not None and cfg.steps_per_epoch < 1:
        raise ConfigError("--steps-per-epoch must be at least 1")
    if cfg.modality_weight < 0:
        raise ConfigError(f"--modality-weight must be >= 0, got {cfg.modality_weight}")
    if cfg.channels not in (None, 1, 3):
        raise ConfigError(f"--channels must be 1 or 3, got {cfg.channels}")


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

    @classmethod
    def read(cls, run_dir: Path, rank: int = 0):
        """A finished run's result read back from its files (what processes other than 0 return)."""
        doc = json.loads((run_dir / "metrics.json").read_text())
        history = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines() if line.strip()]
        return cls(run_dir, int(doc["best_epoch"]), doc["val"], doc["test"], history,
                   float(doc.get("train_seconds") or 0.0), rank)


# ----------------------------------------------------------------------------------------------- batches
def evaluate_split(model: nn.Module, split: Split, transform: BatchTransform, task: str, class_names, loss_fn=None,
                   batch_size: int = 512, precision: str = "fp32", temperature: float = 1.0,
                   threshold: float | list[float] = 0.5, return_probs: bool = False) -> dict:
    logits = predict_logits(model, split.images, transform, batch_size, precision)
    metrics, probs = score_logits(logits, split.labels, task, class_names, temperature, threshold, loss_fn)
    if return_probs:
        metrics["_probs"] = probs
    return metrics


# ----------------------------------------------------------------------------------------------- training
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


# ----------------------------------------------------------------------------------------------- resuming
# settings a resumed run may change: they do not alter the epochs already trained
RESUME_MAY_CHANGE = ("epochs", "patience", "eval_batch_size", "tune_threshold", "bn_recalibrate", "calibrate", "ood",
                     "data_dir", "download", "overwrite", "quiet", "out", "resume", "ddp")


def _non_default_fields(cfg: RecipeConfig) -> set[str]:
    default = type(cfg)()
    return {f.name for f in fields(cfg) if getattr(cfg, f.name) != getattr(default, f.name)}


def _resumed_config(cfg: RecipeConfig, resume: ResumePoint, given: set[str]) -> RecipeConfig:
    """``cfg`` as the resumed run stored it, with the settings a resumed run may change taken from ``cfg``; a
    different value for any other setting given explicitly is refused."""
    kind = type(cfg)
    names = {f.name for f in fields(kind)}
    stored = {k: v for k, v in resume.meta["train_config"].items() if k in names}
    default = kind()
    for k in sorted(given & names - set(RESUME_MAY_CHANGE)):
        mine, theirs = _as_json(getattr(cfg, k)), _as_json(stored.get(k, getattr(default, k)))
        if mine != theirs:
            raise ConfigError(f"--{k.replace('_', '-')} {getattr(cfg, k)!r} differs from the resumed run's "
                              f"{stored.get(k, getattr(default, k))!r}; a resumed run keeps its settings (only "
                              f"--epochs, --patience, --eval-batch-size, --data-dir and the final steps may change)")
    merged = {**stored, **{k: getattr(cfg, k) for k in given & set(RESUME_MAY_CHANGE) if k in names}}
    merged.update(out=str(resume.final), resume=cfg.resume, ddp=cfg.ddp, quiet=cfg.quiet, overwrite=False)
    return kind(**merged)


def _as_json(v: Any) -> Any:
    return json.loads(json.dumps(v, default=str))


def train(cfg: TrainConfig | None = None, *, log: Callable[[str], None] | None = None, **kwargs: Any) -> TrainResult:
    """Train a model; see :class:`TrainConfig` for the arguments (also accepted as keywords).

    ``resume``: continue the run in this directory (a killed run's ``.partial`` build directory, else the finished
    run, for more ``epochs``) from its ``last.pth``, exactly as an uninterrupted run (:mod:`medmix.training`);
    ``resume=True`` continues ``out`` when it holds a resumable run, else starts it. Settings given explicitly must
    match the run's, except ``RESUME_MAY_CHANGE`` (``epochs``, ``patience``, ...). Under ``torchrun`` (or with
    ``ddp=True``) trains data-parallel (:mod:`medmix.distributed`); process 0 writes, every process returns."""
    given = set(kwargs) if cfg is None else _non_default_fields(cfg)
    return launch(cfg or TrainConfig(**kwargs), given, log, SingleTask)


def launch(cfg: RecipeConfig, given: set[str], log: Callable[[str], None] | None, task_cls: type[Task]) -> Any:
    """What :func:`train` and :func:`medmix.generalist.train_generalist` share before the loop: the resumed run's
    settings, every check that needs no data (so a bad value fails before any is read), the processes, then
    :func:`medmix.training.fit` on ``task_cls(cfg, ctx, resume)``."""
    resume = find_resume(cfg.out, cfg.resume)
    if resume is not None:
        if is_generalist(resume.meta) != (task_cls.kind == GENERALIST):
            raise ConfigError(f"{resume.final} is a " + ("single-dataset run; resume it without several --dataset "
                              "names" if task_cls.kind == GENERALIST else "multi-dataset run; resume it with "
                              "medmix.train_generalist"))
        cfg = _resumed_config(cfg, resume, given)
    task_cls.prepare(cfg)
    check_recipe(cfg)
    if resume is not None:
        check_resume_left(resume, cfg.epochs, cfg.patience)
    model_info(cfg.model)  # fail fast on an unknown model name, before reading data
    ctx = distributed.setup(cfg.ddp)
    try:
        if cfg.batch_size < ctx.world_size:
            raise ConfigError(f"--batch-size {cfg.batch_size} is smaller than the {ctx.world_size} processes: the "
                              f"batch is the global batch, split across processes")
        quiet = cfg.quiet or not ctx.is_main
        say = (log or (lambda s: None if quiet else print(s, file=sys.stderr))) if ctx.is_main else (lambda s: None)
        if resume is None and ctx.is_main:  # a bad --out must fail before any training, not after the first epoch
            check_writable_dir(cfg.out or "runs", "--out")
        return fit(task_cls(cfg, ctx, resume), ctx, resume, say, quiet)
    finally:
        ctx.close()


def best_model(model: nn.Module, ctx: distributed.Context, build: Callable[[], nn.Module], run: Path) -> nn.Module:
    """The best weights, in a plain model on the CPU (no SyncBatchNorm) for the end-of-run passes."""
    if ctx.world_size > 1 or ctx.device.type != "cpu":
        model = build().to(memory_format=torch.channels_last)
    model.load_state_dict(load_checkpoint(run / "best_model.pth")[0])
    return model


class SingleTask(Task):
    """One dataset, one classifier: the task :func:`train` gives the loop."""
    kind = "single"
    reads_test = True  # False for the tuner's trials (medmix.tune): they are chosen on val and never see the test

    @staticmethod
    def prepare(cfg: TrainConfig) -> None:
        """Nothing to normalise in a single-dataset configuration (see MixtureTask.prepare)."""

    def __init__(self, cfg: TrainConfig, ctx: distributed.Context, resume: ResumePoint | None = None) -> None:
        self.cfg, self.ctx = cfg, ctx
        self.precision = resolve_precision(cfg.precision)
        torch.manual_seed(cfg.seed)
        split_file = resume.source / "split.json" if resume is not None else None
        split_seed = cfg.seed if cfg.split_seed is None else cfg.split_seed
        bundle = load_dataset(cfg.dataset, data_dir=cfg.data_dir, size=cfg.size, seed=split_seed,
                              download=cfg.download,
                              split_file=split_file if split_file is not None and split_file.is_file() else None)
        self.bundle, self.info = bundle, bundle.info
        info = bundle.info
        self.img_size = cfg.img_size or bundle.image_size
        self.augment = cfg.augment or default_augment(bundle.name)
        mean, std = normalization(cfg.normalize, [bundle.splits["train"].images])
        self.train_tf = BatchTransform(self.img_size, mean, std, get_policy(self.augment))
        self.eval_tf = BatchTransform(self.img_size, mean, std)
        loss_name = cfg.loss or default_loss_name(info.task)
        self.loss_fn = build_loss(loss_name, info.task, info.num_classes, alpha=cfg.alpha, margin=cfg.margin,
                                  label_smoothing=cfg.label_smoothing, ordinal_variant=cfg.ordinal_variant)
        self.eval_loss = build_loss(default_loss_name(info.task), info.task, info.num_classes)
        self.teacher = self._teacher(cfg.teacher, bundle, mean, std) if cfg.teacher else None
        mix = BatchMix(cfg.mixup, cfg.cutmix, cfg.mix_prob)
        self.mix = mix if mix.enabled else None  # off: no random numbers drawn, runs unchanged
        # MedMNIST-C corruptions of the set (a user's data: the generic list by channels); off: nothing drawn
        flag = bundle.name if bundle.source.get("kind") == "medmnist" else None
        if cfg.corrupt > 0 and info.n_channels not in (1, 3):
            raise ConfigError(f"--corrupt needs images with 1 or 3 channels; {bundle.name} has {info.n_channels}")
        self.corruptions = corruptions_for(flag, info.n_channels) if cfg.corrupt > 0 else None
        self.model_kwargs = dict(num_classes=info.num_classes, in_chans=info.n_channels, img_size=self.img_size,
                                 drop_rate=cfg.drop_rate, drop_path_rate=cfg.drop_path_rate, **cfg.model_kwargs)
        if loss_name == "corn":  # rank-consistent head; its outputs are class log-probabilities
            self.model_kwargs["ordinal_head"] = "corn"
        model = create_model(cfg.model, **self.model_kwargs).to(memory_format=torch.channels_last)
        if ctx.world_size > 1:
            model = distributed.convert_sync_batchnorm(model, ctx.device)
        self.model = model.to(ctx.device)
        self.monitor = _monitor(cfg.monitor, info.task)
        self.meta = {"model": cfg.model, "model_kwargs": self.model_kwargs, "task": info.to_dict(),
                     "dataset": bundle.name, "data_source": bundle.source, "data_size": bundle.image_size,
                     "img_size": self.img_size, "mean": mean, "std": std, "temperature": 1.0, "seed": cfg.seed,
                     "loss": loss_name, "augment": self.augment,
                     "train_config": {k: v for k, v in asdict(cfg).items() if k not in ("quiet", "resume", "ddp")},
                     "monitor": self.monitor, "precision": self.precision}
        if self.corruptions is not None:
            self.meta["corrupt_augment"] = {"probability": cfg.corrupt, "severities": [1, 2, 3, 4, 5],
                                            "corruption_set": corruption_set_name(flag, info.n_channels),
                                            "corruptions": list(self.corruptions)}
        self.small_val = len(bundle.splits["val"]) < MIN_VAL_FOR_MODEL_SELECTION
        if self.small_val:
            warn(f"the validation split has {len(bundle.splits['val'])} images (fewer than "
                 f"{MIN_VAL_FOR_MODEL_SELECTION}): too few to pick a best epoch or stop early; all {cfg.epochs} "
                 f"epochs are trained and the last one is kept", self.meta, show=ctx.is_main)
        tr = self.train = bundle.splits["train"]
        self.drop_last = len(tr) > 2 * cfg.batch_size
        self.steps_per_epoch = len(tr) // cfg.batch_size if self.drop_last else math.ceil(len(tr) / cfg.batch_size)
        self.gen = torch.Generator()
        self._epoch = 0

    def _teacher(self, path: str, bundle: DataBundle, mean: list[float], std: list[float]):
        """The teacher's model (eval mode, on this device) and the (scale, shift) that turn this run's normalised
        input into the teacher's; refused with one line when it was trained on other data or another input."""
        from .models.ensemble import renormalisation
        from .run import Run

        t = Run.load(path).require_single("--teacher")
        if t.dataset != bundle.name or t.task.class_names != bundle.info.class_names:
            raise ConfigError(f"--teacher {path} was trained on {t.dataset!r} ({', '.join(t.task.class_names)}), "
                              f"not on this run's {bundle.name!r}")
        if int(t.meta["img_size"]) != self.img_size or t.task.n_channels != bundle.info.n_channels:
            raise ConfigError(f"--teacher {path} takes {t.task.n_channels}x{t.meta['img_size']} px inputs; this run "
                              f"trains on {bundle.info.n_channels}x{self.img_size} px")
        if bundle.split_indices is not None:  # split by seed: the teacher must not have trained on our val/test
            f = t.dir / "split.json"
            theirs = json.loads(f.read_text()) if f.is_file() else {}
            if any(list(map(int, theirs.get(k, []))) != bundle.split_indices[k].tolist() for k in ("train", "val",
                                                                                                  "test")):
                raise ConfigError(f"--teacher {path} was trained on another train/val/test split of {bundle.name!r} "
                                  f"(packed and folder data are split by --seed): it may have seen this run's "
                                  f"validation and test images; use a teacher trained with --seed {self.cfg.seed}")
        scale, shift = renormalisation(mean, std, t.meta["mean"], t.meta["std"])
        with torch.random.fork_rng(devices=[]):  # building it must not move the global RNG (the student's init)
            model = t.build_model().to(self.ctx.device).eval()
        if self.cfg.teacher_views == "identity" and hasattr(model, "views"):  # an ensemble: its members, unviewed
            model.views = ("identity",)
        for p in model.parameters():
            p.requires_grad_(False)
        as_map = dict(device=self.ctx.device, dtype=torch.float32)
        return (model, torch.tensor(scale, **as_map).view(1, -1, 1, 1),
                torch.tensor(shift, **as_map).view(1, -1, 1, 1))

    def default_out(self) -> str:
        cfg = self.cfg
        return str(Path("runs") / f"{Path(cfg.dataset).stem}-{cfg.model}-s{cfg.seed}-{time.strftime('%Y%m%d-%H%M%S')}")

    def describe(self, world: str) -> str:
        b, info = self.bundle, self.info
        n_params = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        return (f"{self.cfg.model} ({n_params / 1e6:.2f} M params) on {b.name} [{info.task}, {info.num_classes} "
                f"classes, {len(self.train)}/{len(b.splits['val'])}/{len(b.splits['test'])} images, "
                f"{self.img_size} px, {self.precision}{world}]")

    def write_files(self, run: Path) -> None:
        if self.bundle.split_indices is not None:
            from .data.folders import save_split

            b = self.bundle
            save_split(run / "split.json", b.split_indices, int(b.source.get("split_seed", self.cfg.seed)),
                       all_labels(b.split_indices, b.splits), b.source["path"])

    def begin_epoch(self, epoch: int) -> None:
        self.gen.manual_seed(epoch_seed(self.cfg.seed, epoch))  # data order and augmentation, equal on every process
        self._epoch = epoch

    def batches(self):
        return iterate_batches(len(self.train), self.cfg.batch_size, self.gen, self.drop_last)

    def step(self, net: nn.Module, idx: torch.Tensor) -> Step | None:
        ctx, tr = self.ctx, self.train
        rows, weight = None, 1.0
        if ctx.world_size > 1:
            if len(idx) < ctx.world_size:  # a last batch too small to give every process an image
                return None
            rows = distributed.shard(len(idx), ctx.rank, ctx.world_size)
            weight = (rows.stop - rows.start) * ctx.world_size / len(idx)  # DDP averages; this makes it a sum
        images = tr.images[idx]
        if self.corruptions is not None:  # on the stored uint8 images, before the resize and the augmentation
            seed = int(torch.randint(0, 2 ** 62, (1,), generator=self.gen))
            images = corrupt_batch(images, self.corruptions, self.cfg.corrupt, seed, rows)
        x = self.train_tf(images, train=True, generator=self.gen, rows=rows)
        y = tr.labels[idx] if rows is None else tr.labels[idx[rows]]
        if ctx.device.type != "cpu":
            x, y = x.to(ctx.device, non_blocking=True), y.to(ctx.device, non_blocking=True)
        partner, lam = None, 1.0
        if self.mix is not None:
            x, partner, lam = self.mix(x, len(idx), self.gen, rows)
        with autocast(self.precision):
            logits = net(x)
        loss = self.loss_fn(logits.float(), y)
        if partner is not None:
            loss = lam * loss + (1.0 - lam) * self.loss_fn(logits.float(), y[partner])
        if self.teacher is not None:
            teacher, scale, shift = self.teacher
            with torch.no_grad(), autocast(self.precision):
                soft = teacher(x * scale + shift)
            w = self.cfg.distill_weight
            loss = (1.0 - w) * loss + w * distillation_loss(logits, soft, self.info.task == MULTI_LABEL,
                                                            self.cfg.distill_temperature)
        return Step(loss * weight if rows is not None else loss, loss, len(y))

    def _evaluate(self, model: nn.Module, split: str, **kw: Any) -> dict:
        return evaluate_split(model, self.bundle.splits[split], self.eval_tf, self.info.task, self.info.class_names,
                              self.eval_loss, self.cfg.eval_batch_size, self.precision, **kw)

    def validate(self) -> Validation:
        val = self._evaluate(self.model, "val")
        # too few val images to choose an epoch: every epoch "improves", so the last one is kept, none stops early
        score = float(self._epoch) if self.small_val else _score(val, self.monitor)
        return Validation({"val_loss": val["loss"], "val_acc": val["acc"], "val_auc": val["auc"]}, score,
                          _slim(val), f"val loss {val['loss']:.4f}  acc {val['acc']:.4f}  auc {val['auc']:.4f}")

    def stop_text(self) -> str:
        return f"early stop: no {self.monitor} improvement on val for {self.cfg.patience} epochs"

    def finish(self, run: Path, final: Path, best_epoch: int, history: list[dict], seconds: float,
               say: Callable[[str], None]) -> TrainResult:
        # the test split is read once, with the weights chosen on val
        cfg, info, bundle, meta, eval_tf = self.cfg, self.info, self.bundle, self.meta, self.eval_tf
        final_model = best_model(self.model, self.ctx, lambda: create_model(cfg.model, **self.model_kwargs), run)
        if cfg.bn_recalibrate and not get_policy(self.augment).identity and \
                recalibrate_batchnorm(final_model, self.train.images, eval_tf):
            meta["bn_recalibrated"] = True
        extras = fit_confidence(final_model, bundle, eval_tf, info.task, meta, calibrate=cfg.calibrate, ood=cfg.ood,
                                batch_size=cfg.eval_batch_size, seed=cfg.seed, say=say)
        val = self._evaluate(final_model, "val", return_probs=True)
        threshold: float | list[float] = 0.5
        if cfg.tune_threshold and info.task == MULTI_LABEL:
            threshold = tune_thresholds(val.pop("_probs"), bundle.splits["val"].labels.numpy(), info.class_names,
                                        meta, show=self.ctx.is_main)
            val = self._evaluate(final_model, "val", threshold=threshold)
        val.pop("_probs", None)
        test = self._evaluate(final_model, "test", threshold=threshold) if self.reads_test else {}
        meta.update(threshold=threshold, epoch=best_epoch, epochs_run=len(history), val_metrics=_slim(val),
                    test_metrics=_slim(test), train_seconds=seconds, machine=machine_description())
        save_checkpoint(run / "best_model.pth", final_model, meta, extras=extras)
        metrics_doc = {"dataset": bundle.name, "model": cfg.model, "seed": cfg.seed, "best_epoch": best_epoch,
                       "epochs_run": len(history), "monitor": self.monitor, "float_precision": self.precision,
                       "train_seconds": seconds, "machine": machine_description(), "native_bf16": bf16_supported(),
                       "medmix_version": __version__, "warnings": meta.get("warnings", []), "val": val, "test": test}
        write_run_files(run, metrics_doc, history)
        from .report import plot_curves, write_confusion

        plot_curves(history, run / "curves.png", best_epoch)
        if test:
            write_confusion(test, info, run / "confusion_test.png", f"{bundle.name} test - {cfg.model}")
        return TrainResult(final, best_epoch, val, test, history, seconds)

    def result_of_finished_run(self, final: Path, rank: int) -> TrainResult:
        return TrainResult.read(final, rank)


def corrupt_batch(x: torch.Tensor, corruptions: dict[str, Corruption], p: float, seed: int,
                  rows: slice | None = None) -> torch.Tensor:
    """A uint8 ``(B, C, H, W)`` batch (C = 1 or 3) with each image corrupted with probability ``p`` by one of
    ``corruptions`` at a random severity (:func:`medmix.corruptions.random_corruptions`, its draws from ``seed``);
    ``rows``: only those rows are corrupted, with the pixels they would get without ``rows``."""
    a = x.numpy()
    if a.shape[1] not in (1, 3):
        raise ConfigError(f"--corrupt needs images with 1 or 3 channels, got {a.shape[1]}")
    images = a[:, 0] if a.shape[1] == 1 else np.ascontiguousarray(a.transpose(0, 2, 3, 1))
    out = random_corruptions(images, corruptions, p, seed, rows)
    return torch.from_numpy(np.ascontiguousarray(out[:, None] if out.ndim == 3 else out.transpose(0, 3, 1, 2)))


def write_run_files(run: Path, metrics_doc: dict, history: list[dict]) -> None:
    atomic_write_text(run / "metrics.json", json.dumps(jsonable(metrics_doc), indent=2))
    write_history_csv(run / "log.csv", history)


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
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over all batches
    was_training = model.training
    model.eval()
    for m in bns:
        m.train()
    for idx in iterate_batches(len(images), batch_size, torch.Generator().manual_seed(0)):
        model(transform(images[idx]))
    for m, momentum in zip(bns, momenta):
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
        t, c = fit_calibration(logits, val.labels, task)
        meta["temperature"], meta["calibration"] = t, c
        if say is not None:
            say(f"calibration on val: T = {t:.3f}  NLL {c['nll_before']:.4f} -> {c['nll_after']:.4f}  ECE "
                f"{c['ece_before']:.4f} -> {c['ece_after']:.4f}" if isinstance(t, float) else
                f"calibration on val: per-label T, NLL {c['nll_before']:.4f} -> {c['nll_after']:.4f}")
    if ood:
        tr, pool = bundle.splits["train"], len(val) < MIN_VAL_FOR_OOD_THRESHOLD
        if pool:
            warn(f"the validation split has {len(val)} images (fewer than {MIN_VAL_FOR_OOD_THRESHOLD}): the "
                 f"out-of-distribution threshold is set on the training and validation images together "
                 f"(stricter: more images flagged)", meta, show=say is not None)
        meta["ood"], extras = ood_mod.fit(model, tr.images, tr.labels, val.images, transform, task,
                                          batch_size=batch_size, seed=seed, val=(logits, features), pool_train=pool)
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


def default_augment(name: str) -> str:
    """The augmentation policy a dataset trains with by default (a user's own folder: rotate_flip_zoom)."""
    try:
        return dataset_spec(name).augment
    except Exception:
        return "rotate_flip_zoom"


def all_labels(split_indices: dict, splits: dict[str, Split]) -> np.ndarray:
    """Labels of the whole packed/folder dataset in its original order (for the split fingerprint)."""
    labels = np.empty(sum(len(v) for v in split_indices.values()), dtype=np.int64)
    for k, idx in split_indices.items():
        labels[idx] = splits[k].labels.numpy()
    return labels


def _slim(m: dict) -> dict:
    keep = ("acc", "auc", "precision", "recall", "f1", "loss", "n", "mae", "qwk", "auc_defined_mean")
    return {k: (float(m[k]) if isinstance(m[k], (float, np.floating)) else m[k]) for k in keep if k in m}


