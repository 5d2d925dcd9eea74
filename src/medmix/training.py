"""The one training loop. A :class:`Task` says what is trained (one dataset: :class:`medmix.engine.SingleTask`;
a mixture of datasets with a router: :class:`medmix.generalist.MixtureTask`); :func:`fit` owns everything else:
the optimiser and its per-step schedule, per-epoch seeding, the progress bar, validation after every epoch, the
best and last checkpoints, early stopping, resuming, data-parallel wrapping, the log and the run directory.

Written after Lightning's ``Trainer`` + ``LightningModule`` hooks and MONAI's ``SupervisedTrainer`` + handlers, but
as one function of ~150 lines: medmix needs bit-identical resume from any epoch boundary and per-image batched
augmentation in uint8, which are simplest to guarantee when the loop is this small (Lightning Fabric would add a
dependency and its own seeding and checkpoint layout without making the code shorter).

The run is built in ``<out>.partial`` and renamed to ``<out>`` when complete. After every epoch ``last.pth`` holds
the whole training state (weights, optimiser, schedule, early stopping, history, RNG state and the task's own
state), so a killed run resumed at an epoch boundary repeats exactly what the uninterrupted run would have done.
"""
from __future__ import annotations

import json
import math
import shutil
import sys
import time
from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from . import distributed
from .atomic import atomic_write_text
from .checkpoint import load_checkpoint, save_checkpoint
from .errors import CheckpointError, ConfigError


# ----------------------------------------------------------------------------------------------- the task
@dataclass
class Validation:
    """What a task reports after validating: ``fields`` go into the log row, ``score`` (higher is better) picks
    the best epoch, ``summary`` is stored in the checkpoint, ``text`` is printed."""
    fields: dict[str, Any]
    score: float
    summary: dict[str, Any]
    text: str


@dataclass
class Step:
    """One batch's result: ``objective`` is back-propagated, ``loss`` (per image) is logged over ``n`` images, and
    ``extras`` (per-image values, e.g. the router's loss) are logged as ``train_<name>``."""
    objective: torch.Tensor
    loss: torch.Tensor
    n: int
    extras: dict[str, torch.Tensor] = field(default_factory=dict)


class Task(ABC):
    """The hooks :func:`fit` calls. Subclasses set ``cfg``, ``model`` (the bare model on the device), ``meta`` (the
    checkpoint metadata) and ``steps_per_epoch`` before training starts."""

    cfg: Any
    model: nn.Module
    meta: dict
    steps_per_epoch: int

    @abstractmethod
    def describe(self, world: str) -> str:
        """The start line's middle: what is trained on what (``world``: ", N processes" or "")."""

    @abstractmethod
    def default_out(self) -> str:
        """The run directory when the config names none."""

    def write_files(self, run: Path) -> None:
        """Files written once into the run directory before training (e.g. saved splits)."""

    def begin_epoch(self, epoch: int) -> None:
        """Seed the task's own randomness (data order, augmentation) for ``epoch``."""

    @abstractmethod
    def batches(self) -> Iterable[Any]:
        """This epoch's batches, in the order the task's generator gives (one per optimiser step)."""

    @abstractmethod
    def step(self, net: nn.Module, batch: Any) -> Step | None:
        """Forward one batch through ``net`` (the model, DDP-wrapped when data-parallel); None skips it."""

    @abstractmethod
    def validate(self) -> Validation:
        """Score the current weights on the validation split (main process only)."""

    def stop_text(self) -> str:
        return f"early stop: no improvement on val for {self.cfg.patience} epochs"

    def state_dict(self) -> dict:
        """The task's own resumable state (saved in ``last.pth``)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    @abstractmethod
    def finish(self, run: Path, final: Path, best_epoch: int, history: list[dict], seconds: float,
               say: Callable[[str], None]) -> Any:
        """On the main process, after the last epoch: final fitting, the test split, the result files. Returns
        the run's result object; the loop then renames ``run`` to ``final``."""

    @abstractmethod
    def result_of_finished_run(self, final: Path, rank: int) -> Any:
        """What the other processes of a data-parallel run return (they wrote nothing)."""


# ----------------------------------------------------------------------------------------------- helpers
def epoch_seed(seed: int, epoch: int, stream: int = 0) -> int:
    """The seed of one epoch's random stream (0: data order and augmentation; 1 + rank: the global RNG)."""
    state = np.random.SeedSequence([seed & 0xFFFFFFFFFFFFFFFF, epoch, stream]).generate_state(2, np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])  # < 2**63


def schedule(optimizer: torch.optim.Optimizer, kind: str, total_steps: int, warmup_steps: int):
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


def optimizer(params: list[nn.Parameter], name: str, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """Adam, AdamW (decoupled weight decay) or SGD with Nesterov momentum 0.9 (the classic recipe for CNNs)."""
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True, weight_decay=weight_decay)
    return (torch.optim.Adam if name == "adam" else torch.optim.AdamW)(params, lr=lr, weight_decay=weight_decay)


def weight_average(model: nn.Module, decay: float | None):
    """timm's ``ModelEmaV3`` of ``model`` (parameters and buffers) at most ``decay`` per step, with its warm-up
    (decay ``1 - (1 + step)^(-2/3)`` until that reaches ``decay``: the average forgets its random start quickly,
    which matters in runs of a few hundred steps); None when ``decay`` is None. Kept in float32, updated after every
    optimiser step with the step count, so a resumed run continues it exactly."""
    if decay is None:
        return None
    from timm.utils import ModelEmaV3

    return ModelEmaV3(model, decay=decay, use_warmup=True, foreach=True)


def jsonable(o: Any) -> Any:
    """Numbers as JSON has them: numpy scalars to Python, non-finite floats to null."""
    if isinstance(o, dict):
        return {k: jsonable(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [jsonable(v) for v in o]
    if isinstance(o, (np.floating, float)):
        return None if not np.isfinite(o) else float(o)
    if isinstance(o, np.integer):
        return int(o)
    return o


def write_history_csv(path: Path, history: list[dict]) -> None:
    if not history:
        return
    cols = list(history[0])
    lines = [",".join(cols)] + [",".join(f"{r[c]:.6g}" if isinstance(r[c], float) else str(r[c]) for c in cols)
                                for r in history]
    atomic_write_text(path, "\n".join(lines) + "\n")


# ----------------------------------------------------------------------------------------------- resuming
@dataclass
class ResumePoint:
    final: Path  # where the run ends up
    source: Path  # the directory holding last.pth: ``<final>.partial`` (a killed run) or ``final`` (a finished one)
    meta: dict
    state: dict
    train_state: dict

    @property
    def in_place(self) -> bool:
        return self.source != self.final


TRAIN_STATE_KEYS = ("optimizer", "epoch", "best_score", "best_epoch", "bad_epochs", "history")


def find_resume(out: str | None, resume: str | bool | None) -> ResumePoint | None:
    """The newest resumable state for ``resume``: the ``.partial`` build directory of a killed run first (it is
    newer than the finished run it may continue), then the finished run."""
    if resume is None or resume is False:
        return None
    if resume is True:
        if not out:
            raise ConfigError("--resume without a directory continues --out; pass --out DIR (or --resume RUN_DIR)")
        target, required = Path(out), False
    else:
        target, required = Path(resume), True
    final = target.with_name(target.name[:-len(".partial")]) if target.name.endswith(".partial") else target
    if out and resume is not True and Path(out).resolve() != final.resolve():
        raise ConfigError(f"--out {out} differs from the resumed run {final}; a run is continued where it is")
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
        return ResumePoint(final, source, meta, state, ts)
    if first_error is not None:
        raise first_error
    if required:
        raise ConfigError(f"nothing to resume in {target}: no last.pth in {final} or {partial.name} (a run killed "
                          f"before its first epoch ended has nothing saved; start it again without --resume)")
    return None


def check_resume_left(resume: ResumePoint, epochs: int, patience: int) -> None:
    """A finished run continued: is there anything left to do?"""
    ts = resume.train_state
    if resume.in_place:
        return
    if ts["epoch"] >= epochs:
        raise ConfigError(f"{resume.final} has already trained {ts['epoch']} epochs; pass --epochs greater than "
                          f"{ts['epoch']} to continue it")
    if ts["bad_epochs"] >= patience:
        raise ConfigError(f"{resume.final} stopped early after {ts['bad_epochs']} epochs without improvement; "
                          f"pass --patience greater than {ts['bad_epochs']} to continue it")


# ----------------------------------------------------------------------------------------------- the loop
def fit(task: Task, ctx: distributed.Context, resume: ResumePoint | None, say: Callable[[str], None],
        quiet: bool) -> Any:
    """Train ``task`` for ``task.cfg.epochs`` epochs (or until early stopping) and return ``task.finish``'s
    result; continue from ``resume`` when given."""
    cfg, model, meta = task.cfg, task.model, task.meta
    params = [p for p in model.parameters() if p.requires_grad]
    opt = optimizer(params, cfg.optimizer, cfg.lr, cfg.weight_decay)
    steps = task.steps_per_epoch
    sched = schedule(opt, cfg.schedule, steps * cfg.epochs, int(cfg.warmup_epochs * steps))
    history: list[dict] = []
    best_score, best_epoch, bad_epochs, start_epoch, seconds_before = -math.inf, 0, 0, 1, 0.0
    ema, ema_steps = weight_average(model, getattr(cfg, "ema", None)), 0
    if resume is not None:
        ts = resume.train_state
        try:
            model.load_state_dict(resume.state)
            opt.load_state_dict(ts["optimizer"])
            if sched is not None and ts.get("scheduler") is not None:
                sched.load_state_dict(ts["scheduler"])
            task.load_state_dict(ts.get("task") or {})
            if ema is not None:
                ema.module.load_state_dict(ts["ema"])
                ema_steps = int(ts["ema_steps"])
        except (RuntimeError, ValueError, KeyError) as e:
            raise CheckpointError(f"{resume.source / 'last.pth'}: does not fit this run's model/optimiser "
                                  f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
        history = [dict(r) for r in ts["history"]]
        best_score, best_epoch, bad_epochs = float(ts["best_score"]), int(ts["best_epoch"]), int(ts["bad_epochs"])
        start_epoch, seconds_before = int(ts["epoch"]) + 1, float(ts.get("seconds", 0.0))
        if isinstance(ts.get("rng_state"), torch.Tensor):
            torch.set_rng_state(ts["rng_state"])

    def open_run_dir() -> tuple[Path, Path]:
        """``(final, <final>.partial)``, the run built in the latter: a new directory, the killed run's own (continued
        in place) or a copy of a finished run (which stays untouched until the continued one replaces it)."""
        final = resume.final if resume is not None else Path(cfg.out or task.default_out())
        run = final.with_name(final.name + ".partial")
        if resume is None:
            if final.exists() and not final.is_dir():
                raise ConfigError(f"{final} exists and is not a directory; choose another --out")
            if final.exists() and any(final.iterdir()) and not cfg.overwrite:
                raise ConfigError(f"{final} already exists and is not empty; pass --overwrite or choose another --out")
            if run.exists():
                shutil.rmtree(run)
            run.mkdir(parents=True)
        elif resume.in_place:
            for stray in run.glob(".*.tmp*"):  # temporary files of writes the kill interrupted
                stray.unlink()
        else:
            copy = run.with_name(run.name + ".copying")
            for d in (run, copy):
                if d.exists():
                    shutil.rmtree(d)
            shutil.copytree(final, copy)
            copy.rename(run)
        task.write_files(run)
        atomic_write_text(run / "config.json", json.dumps(meta["train_config"], indent=2))
        # the log is rebuilt from the restored history: lines appended after last.pth was written are dropped
        atomic_write_text(run / "log.jsonl", "".join(json.dumps(jsonable(r)) + "\n" for r in history))
        return final, run

    final, run = ctx.on_main(open_run_dir) or (None, None)
    final = Path(ctx.broadcast_object(str(final) if final is not None else None))

    net: nn.Module = model
    if ctx.world_size > 1:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[ctx.device] if ctx.device.type == "cuda" else None)
    world = f", {ctx.world_size} processes" if ctx.world_size > 1 else ""
    say(f"{'resuming at epoch ' + str(start_epoch) + ': ' if resume is not None else ''}training "
        f"{task.describe(world)} -> {final}")

    def end_epoch() -> int:
        """Process 0, after an epoch's training: validate, log, checkpoint; 1 when training stops early."""
        nonlocal best_score, best_epoch, bad_epochs
        trained = None
        if ema is not None:  # the average is what is validated, kept as best and tested; training goes on from
            trained = {k: t.clone() for k, t in model.state_dict().items()}  # the trained weights
            model.load_state_dict(ema.module.state_dict())
        v = task.validate()
        row = {"epoch": epoch, "train_loss": loss_sum / max(seen, 1),
               **{f"train_{k}": s / max(seen, 1) for k, s in extra_sums.items()}, **v.fields,
               "lr": opt.param_groups[0]["lr"], "train_img_s": seen / train_time,
               "epoch_seconds": time.perf_counter() - t0}
        history.append(row)
        with open(run / "log.jsonl", "a") as f:
            f.write(json.dumps(jsonable(row)) + "\n")
        improved = v.score > best_score
        if improved:
            best_score, best_epoch, bad_epochs = v.score, epoch, 0
            save_checkpoint(run / "best_model.pth", model, {**meta, "epoch": epoch, "val_metrics": v.summary})
        else:
            bad_epochs += 1
        if trained is not None:
            model.load_state_dict(trained)
        # written after best_model.pth: a kill in between repeats this epoch, which improves again identically
        save_checkpoint(run / "last.pth", model, {**meta, "epoch": epoch, "val_metrics": v.summary},
                        train_state={"optimizer": opt.state_dict(),
                                     "scheduler": sched.state_dict() if sched is not None else None,
                                     "epoch": epoch, "best_score": best_score, "best_epoch": best_epoch,
                                     "bad_epochs": bad_epochs, "history": history, "rng_state": torch.get_rng_state(),
                                     "seconds": seconds_before + time.perf_counter() - t_start,
                                     "world_size": ctx.world_size, "task": task.state_dict(),
                                     **({"ema": ema.module.state_dict(), "ema_steps": ema_steps} if ema else {})})
        say(f"epoch {epoch:3d}  loss {row['train_loss']:.4f}  {v.text}  {row['train_img_s']:.0f} img/s"
            f"{'  *' if improved else ''}")
        if bad_epochs >= cfg.patience:
            say(task.stop_text())
            return 1
        return 0

    stopped = bad_epochs >= cfg.patience  # a killed run that had already stopped early only needs finishing
    t_start = time.perf_counter()
    for epoch in range(start_epoch, start_epoch if stopped else cfg.epochs + 1):
        # all randomness of an epoch derives from (seed, epoch) and the restored state: resuming at an epoch
        # boundary repeats it exactly. The task's generator is the same on every process; the global RNG (dropout)
        # differs per rank.
        task.begin_epoch(epoch)
        torch.manual_seed(epoch_seed(cfg.seed, epoch, 1 + ctx.rank))
        model.train()
        t0, seen, loss_sum = time.perf_counter(), 0, 0.0
        extra_sums: dict[str, float] = {}
        bar = tqdm(total=steps, desc=f"epoch {epoch}/{cfg.epochs}", leave=False, dynamic_ncols=True, file=sys.stderr,
                   disable=True if quiet else None)
        for batch in task.batches():
            s = task.step(net, batch)
            if s is None:
                continue
            opt.zero_grad(set_to_none=True)
            s.objective.backward()
            opt.step()
            if sched is not None:
                sched.step()
            if ema is not None:
                ema_steps += 1
                ema.update(model, step=ema_steps)
            seen += s.n
            loss_sum += float(s.loss.detach()) * s.n
            for k, v in s.extras.items():
                extra_sums[k] = extra_sums.get(k, 0.0) + float(v.detach()) * s.n
            bar.update(1)
            bar.set_postfix(loss=f"{loss_sum / seen:.4f}", img_s=f"{seen / (time.perf_counter() - t0):.0f}")
        bar.close()
        if ctx.world_size > 1:
            keys = sorted(extra_sums)
            loss_sum, seen, *summed = ctx.all_sum([loss_sum, float(seen), *(extra_sums[k] for k in keys)])
            extra_sums = dict(zip(keys, summed))
        train_time = time.perf_counter() - t0
        if ctx.broadcast_int(ctx.on_main(end_epoch) or 0):
            break
    seconds = seconds_before + time.perf_counter() - t_start

    def finish() -> Any:
        result = task.finish(run, final, best_epoch, history, seconds, say)
        trash = final.with_name(final.name + ".old")  # an existing ``final`` is replaced only now
        if final.exists():
            if trash.exists():
                shutil.rmtree(trash)
            final.rename(trash)
        run.rename(final)
        if trash.exists():  # also the leftover of a run killed between the two renames, then resumed
            shutil.rmtree(trash)
        return result

    result = ctx.on_main(finish)  # the other processes wait here until the run directory is complete
    return result if ctx.is_main else task.result_of_finished_run(final, ctx.rank)
