"""``medmix tune DATASET --budget 20m``: an Optuna study of model, width, recipe and augmentation, on val only.

>>> from medmix.tune import tune
>>> r = tune("breastmnist", budget="20m", out="runs/tune/breast")
>>> r["best"]["value"], r["config"]          # the best val score and the file `medmix train --config` takes

Every trial is a ``medmix train`` run of the sampled recipe (the one training loop, with everything it does at
the end: BatchNorm re-estimation, temperature, OOD fit) scored on the validation split by the dataset's monitored
metric (AUC for binary and multi-label tasks, ACC otherwise); the test split is never read (each trial's task
skips it). The sampler is TPE (seeded); the median pruner stops a trial whose per-epoch val score falls below the
median of earlier trials at the same epoch (after 3 complete trials and 5 epochs).

The study lives in a storage that several processes, or machines, can share: by default the journal file
``<out>/study.journal`` (Optuna's ``JournalFileBackend``, with file locks); ``--storage`` takes another journal
path or a database URL (``sqlite:///tune.db``, ``postgresql://...``: Optuna's RDBStorage, with heartbeats so a
trial of a machine that died is retried). Each trial trains into ``<out>/trials/trial-NNNN`` (NNNN: its first
attempt's number), so a study started again after a kill finds the interrupted trial (still "running" in the
study, its process gone), marks it failed, queues its parameters again and resumes that run from its last epoch.

The budget is this process's wall time: no trial starts after it, and the running one stops at its first epoch
boundary past it, its last epoch checkpointed (Optuna records it as failed, with ``stopped_at_budget``); the next
``medmix tune`` of the study queues its parameters again and resumes it from that epoch, as after a kill. So
``--budget 20m`` ends within one epoch of 20 minutes and loses no training. ``--trials`` caps the number instead
or too.
``<out>/best.json`` holds the best trial's settings as ``TrainConfig`` fields (dataset, model and recipe; epochs
and seed as tuned) and ``<out>/summary.json`` every trial; ``medmix train --config <out>/best.json`` trains it.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import socket
import time
from pathlib import Path
from typing import Any, Callable

from .atomic import atomic_write_text
from .engine import SingleTask, TrainConfig, TrainResult, _monitor, _score, launch
from .errors import ConfigError, require_extra
from .small_data import MIN_VAL_FOR_MODEL_SELECTION

AUGMENT_CHOICES = ("none", "radiology", "ultrasound", "rotation_free", "rotate_flip_zoom", "radiology_strong",
                   "ultrasound_strong", "fundus_strong", "ct_mri_strong")
MODELS = ("hybrid_mixer_small", "cnn_transformer")


def parse_budget(budget: str | float | int | None) -> float | None:
    """``"20m"``, ``"90s"``, ``"1h30m"``, ``"1.5h"`` or seconds -> seconds (None: no time limit)."""
    if budget is None:
        return None
    if isinstance(budget, (int, float)) and not isinstance(budget, bool):
        seconds = float(budget)
    else:
        text = str(budget).strip().lower()
        parts = re.fullmatch(r"(?:(\d+(?:\.\d+)?)h)?\s*(?:(\d+(?:\.\d+)?)m)?\s*(?:(\d+(?:\.\d+)?)s?)?", text)
        if not text or parts is None or not any(parts.groups()):
            raise ConfigError(f"--budget {budget!r} is not a duration; use e.g. 20m, 90s, 1h30m")
        h, m, s = (float(g) if g else 0.0 for g in parts.groups())
        seconds = 3600 * h + 60 * m + s
    if not seconds > 0:
        raise ConfigError(f"--budget must be positive, got {budget!r}")
    return seconds


def suggest(trial: Any, models: tuple[str, ...]) -> dict:
    """The search space: ``TrainConfig`` keywords for one trial."""
    model = trial.suggest_categorical("model", list(models))
    kw: dict[str, Any] = {"model": model, "model_kwargs": {}}
    if model.startswith("hybrid_mixer"):
        kw["model_kwargs"] = {"embed_dim": trial.suggest_categorical("embed_dim", [96, 128, 192]),
                              "depth": trial.suggest_categorical("depth", [2, 4, 6])}
    kw["optimizer"] = trial.suggest_categorical("optimizer", ["adam", "adamw", "sgd"])
    kw["lr"] = trial.suggest_float("lr_sgd", 1e-2, 2e-1, log=True) if kw["optimizer"] == "sgd" else \
        trial.suggest_float("lr", 3e-4, 5e-3, log=True)
    kw["weight_decay"] = trial.suggest_categorical("weight_decay", [0.0, 1e-5, 1e-4, 1e-3, 1e-2])
    kw["batch_size"] = trial.suggest_categorical("batch_size", [64, 128])
    kw["augment"] = trial.suggest_categorical("augment", list(AUGMENT_CHOICES))
    kw["label_smoothing"] = trial.suggest_categorical("label_smoothing", [0.0, 0.1])
    kw["drop_rate"] = trial.suggest_categorical("drop_rate", [0.0, 0.1, 0.3])
    kw["mixup"] = trial.suggest_categorical("mixup", [0.0, 0.2])
    kw["cutmix"] = trial.suggest_categorical("cutmix", [0.0, 1.0])
    ema = trial.suggest_categorical("ema", ["off", "0.99", "0.998"])
    kw["ema"] = None if ema == "off" else float(ema)
    return kw


def open_storage(storage: str | None, out: Path):
    """A journal file (default ``<out>/study.journal``, or a path) or an RDB URL (with heartbeats)."""
    import optuna
    from optuna.storages import JournalStorage, RDBStorage, RetryHeartbeatStaleTrialCallback
    from optuna.storages.journal import JournalFileBackend

    if storage and "://" in storage:
        try:
            return RDBStorage(storage, heartbeat_interval=60, grace_period=180,
                              heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=3))
        except Exception as e:  # a bad URL, a missing driver, an unreachable server
            raise ConfigError(f"--storage {storage}: {str(e).splitlines()[0]}") from None
    path = Path(storage or out / "study.journal")
    if path.exists() and path.is_dir():
        raise ConfigError(f"--storage {path} is a directory; give a journal file path or a database URL")
    path.parent.mkdir(parents=True, exist_ok=True)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return JournalStorage(JournalFileBackend(str(path)))


def _trial_dir(out: Path, trial: Any) -> Path:
    """``<out>/trials/trial-NNNN``; a trial queued again after a kill trains on in its first attempt's directory."""
    return out / "trials" / f"trial-{int(trial.user_attrs.get('retry_of', trial.number)):04d}"


def _requeue_orphans(study: Any) -> list[int]:
    """Each trial's last attempt, where it is still "running" with its process on this machine gone (a killed
    tune: marked failed) or was stopped by a budget: its parameters queued again under its first attempt's number,
    so its run directory resumes."""
    from optuna.trial import TrialState

    host, again = socket.gethostname(), []
    latest: dict[int, Any] = {}  # each trial's last attempt, by its first attempt's number
    for t in study.get_trials(deepcopy=False):  # in number order
        latest[int(t.user_attrs.get("retry_of", t.number))] = t
    for first, t in latest.items():
        if t.state == TrialState.RUNNING:
            owner = t.user_attrs.get("owner", {})
            if owner.get("host") != host or _alive(int(owner.get("pid", -1))):
                continue
            study._storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
        elif not (t.state == TrialState.FAIL and t.user_attrs.get("stopped_at_budget")):
            continue
        study.enqueue_trial(t.params, user_attrs={"retry_of": first})
        again.append(t.number)
    return again


class BudgetSpent(Exception):
    """Raised at an epoch boundary of a trial once the study's wall-time budget in this process is spent."""


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def tune(dataset: str, *, budget: str | float | None = "20m", trials: int | None = None, out: str | os.PathLike = "",
         storage: str | None = None, study_name: str | None = None, epochs: int = 30, patience: int = 10,
         seed: int = 0, data_dir: str | None = None, models: tuple[str, ...] = MODELS,
         say: Callable[[str], None] | None = None, **fixed: Any) -> dict:
    """Run (or join, or continue) the study; returns the best trial, the config file and every trial. ``fixed``:
    ``TrainConfig`` fields held constant in every trial (e.g. ``precision``)."""
    require_extra("tune", "medmix tune")
    import optuna

    say = say or (lambda s: None)
    seconds = parse_budget(budget)
    if trials is not None and (isinstance(trials, bool) or not isinstance(trials, int) or trials < 1):
        raise ConfigError(f"--trials must be a positive integer, got {trials!r}")
    if seconds is None and trials is None:
        raise ConfigError("give --budget or --trials (or both): an unbounded study never ends")
    from .models import model_info

    for m in models:
        model_info(m)
    out = Path(out or Path("runs") / "tune" / Path(dataset).stem)
    base = TrainConfig(dataset=dataset, data_dir=data_dir, epochs=epochs, patience=patience, seed=seed, quiet=True,
                       **fixed)
    from .engine import check_recipe

    check_recipe(base)
    from .data import load_dataset

    bundle = load_dataset(dataset, data_dir=data_dir, seed=seed)
    n_val = len(bundle.splits["val"])
    if n_val < MIN_VAL_FOR_MODEL_SELECTION:
        raise ConfigError(f"the validation split of {bundle.name!r} has {n_val} images (fewer than "
                          f"{MIN_VAL_FOR_MODEL_SELECTION}): too few to compare recipes on")
    monitor = _monitor(base.monitor, bundle.info.task)
    name = study_name or f"medmix-{bundle.name}"
    study = optuna.create_study(study_name=name, storage=open_storage(storage, out), direction="maximize",
                                sampler=optuna.samplers.TPESampler(seed=seed),
                                pruner=optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=5),
                                load_if_exists=True)
    again = _requeue_orphans(study)
    if again:
        say(f"resuming interrupted trial(s) {', '.join(map(str, again))}")
    owner = {"host": socket.gethostname(), "pid": os.getpid()}
    t_start = time.perf_counter()
    deadline = None if seconds is None else t_start + seconds

    def objective(trial: Any) -> float:
        trial.set_user_attr("owner", owner)
        kw = suggest(trial, tuple(models))
        run_dir = _trial_dir(out, trial)
        cfg = TrainConfig(**{**vars(base), **kw, "out": str(run_dir), "resume": True})
        trial.set_user_attr("run_dir", str(run_dir))
        t0 = time.perf_counter()
        try:
            if (run_dir / "metrics.json").is_file():  # trained to the end before a kill stopped the study
                r = TrainResult.read(run_dir)
            else:
                r = launch(cfg, set(), lambda s: None, _trial_task(trial, deadline))
        except BudgetSpent as e:  # recorded as failed (a NaN value), no new trial starts, the run dir is kept
            trial.set_user_attr("stopped_at_budget", True)
            trial.set_user_attr("seconds", time.perf_counter() - t0)
            say(f"trial {trial.number}: budget spent; stopped after epoch {e.args[0]} (checkpointed; `medmix tune` "
                f"of this study again resumes it)")
            quiet_failure.numbers.add(trial.number)
            study.stop()
            return float("nan")
        except optuna.TrialPruned:
            shutil.rmtree(run_dir.with_name(run_dir.name + ".partial"), ignore_errors=True)
            say(f"trial {trial.number}: pruned after {time.perf_counter() - t0:.0f} s")
            raise
        value = _score(r.val, monitor)
        trial.set_user_attr("val", {k: r.val[k] for k in ("acc", "auc", "loss") if k in r.val})
        trial.set_user_attr("seconds", time.perf_counter() - t0)
        best = max([value] + [t.value for t in study.get_trials(deepcopy=False)
                              if t.value is not None and t.number != trial.number])
        say(f"trial {trial.number}: val {value:.4f} (best {best:.4f}) in {time.perf_counter() - t0:.0f} s  "
            f"{_short(kw)}")
        return value

    quiet_failure = _QuietBudgetFailure()
    optuna.logging.get_logger("optuna").addFilter(quiet_failure)
    try:
        study.optimize(objective, n_trials=trials, timeout=seconds, catch=())
    except ValueError as e:  # Optuna refuses a categorical parameter whose choices changed within a study
        if "dynamic value space" not in str(e):
            raise
        raise ConfigError(f"study {name!r} was made with another search space (an older medmix); continue it "
                          f"with that version, or start a new study (another --out, --storage or --study)") from None
    finally:
        optuna.logging.get_logger("optuna").removeFilter(quiet_failure)
    return summarise(study, out, base, models, time.perf_counter() - t_start)


class _QuietBudgetFailure(logging.Filter):
    """Drops Optuna's warning that a trial stopped at the budget "failed" (medmix says what happened instead)."""

    def __init__(self) -> None:
        super().__init__()
        self.numbers: set[int] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        m = re.match(r"Trial (\d+) failed with value nan", record.getMessage())
        return not (m and int(m.group(1)) in self.numbers)


def _short(kw: dict) -> str:
    keep = {k: v for k, v in kw.items() if k != "model_kwargs" and v not in (None, 0.0)}
    keep.update(kw["model_kwargs"])
    return " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in keep.items())


def _trial_task(trial: Any, deadline: float | None = None) -> type[SingleTask]:
    """The single-dataset task of one trial: reports every epoch's val score to Optuna (which may prune it), stops
    at the first epoch boundary past ``deadline`` (``time.perf_counter()``; the previous epoch is checkpointed by
    then) and never reads the test split."""
    import optuna

    class TrialTask(SingleTask):
        reads_test = False

        def begin_epoch(self, epoch: int) -> None:
            # never before this process's first epoch of the trial: a trial Optuna started inside the budget
            # trains at least one epoch (and checkpoints it)
            if getattr(self, "_trained_here", False) and deadline is not None and time.perf_counter() > deadline:
                raise BudgetSpent(epoch - 1)
            self._trained_here = True
            super().begin_epoch(epoch)

        def validate(self):
            v = super().validate()
            trial.report(v.score, self._epoch)
            if trial.should_prune():
                raise optuna.TrialPruned()
            return v

    return TrialTask


def summarise(study: Any, out: Path, base: TrainConfig, models: tuple[str, ...], seconds: float) -> dict:
    from optuna.trial import TrialState

    from .training import jsonable

    done = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
    rows = [{"number": t.number, "state": t.state.name.lower(), "value": t.value, "params": t.params,
             "val": t.user_attrs.get("val"), "seconds": t.user_attrs.get("seconds"),
             "run_dir": t.user_attrs.get("run_dir"), "retry_of": t.user_attrs.get("retry_of"),
             "stopped_at_budget": bool(t.user_attrs.get("stopped_at_budget"))}
            for t in study.get_trials(deepcopy=False)]
    doc: dict[str, Any] = {"study": study.study_name, "dataset": base.dataset, "trials": rows,
                           "n_complete": len(done), "seconds_this_process": seconds}
    out.mkdir(parents=True, exist_ok=True)
    if done:
        best = max(done, key=lambda t: t.value)
        fixed = optuna_fixed(best)
        kw = suggest(fixed, models)
        config = {"dataset": base.dataset, "data_dir": base.data_dir, "epochs": base.epochs,
                  "patience": base.patience, "seed": base.seed, "precision": base.precision, **kw}
        config = {k: v for k, v in config.items() if v is not None}
        atomic_write_text(out / "best.json", json.dumps(jsonable(config), indent=2))
        doc.update(best={"number": best.number, "value": best.value, "params": best.params,
                         "run_dir": best.user_attrs.get("run_dir")}, config=str(out / "best.json"))
    atomic_write_text(out / "summary.json", json.dumps(jsonable(doc), indent=2))
    return doc


def optuna_fixed(trial: Any) -> Any:
    """A stand-in trial that answers every suggestion with ``trial``'s value (to turn its parameters back into
    ``TrainConfig`` keywords through the same :func:`suggest`)."""
    import optuna

    return optuna.trial.FixedTrial(trial.params)
