"""Several trained runs (and test-time views) as one checkpoint: ``medmix ensemble RUN1 RUN2 ... --out ENS``.

>>> from medmix.ensemble import make_ensemble
>>> r = make_ensemble(["runs/a", "runs/b", "runs/c"], "runs/abc", tta="auto")
>>> r["views"], r["val"]["auc"], r["test"]["auc"]

The members must be single-dataset runs of the same data, split, task, classes, channels and input size (any
model families, any normalisation: each member keeps its own). The ensemble is a
:class:`medmix.models.ensemble.Averaged`: the mean of the members' calibrated probabilities over the chosen views.
``tta="auto"`` chooses the views on the validation split (the run's monitored metric; ties go to fewer views):
the identity alone, with horizontal and/or vertical flips, with one-pixel shifts. Then, as at the end of
training, the ensemble's own confidence temperature and out-of-distribution statistics are fitted (validation and
training splits), and the test split is read once. The result is a run directory (``best_model.pth``,
``metrics.json``, ``ensemble.json``, the members' ``split.json`` when they have one) that ``predict``,
``evaluate``, ``explain`` (the mean of the members' Grad-CAMs), ``calibrate``, ``serve`` and ``export`` (one ONNX
graph) take like any run. One member with ``tta`` is test-time augmentation of that model alone.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from .atomic import atomic_write_text
from .checkpoint import ENSEMBLE, save_checkpoint
from .errors import ConfigError
from .models.ensemble import VIEWS, Averaged, renormalisation
from .run import Run

# candidate view sets for tta="auto", in order of cost (ties keep the earlier)
TTA_CANDIDATES = (("identity",), ("identity", "hflip"), ("identity", "vflip"), ("identity", "hflip", "vflip"),
                  ("identity", "shift"), ("identity", "hflip", "shift"))


def parse_views(tta: str | Sequence[str] | None) -> tuple[str, ...] | None:
    """``None``/"none" -> the identity; "auto" -> None (choose on val); "hflip,shift" or a list -> those views
    (the identity always included)."""
    if tta is None or tta == "none":
        return ("identity",)
    if tta == "auto":
        return None
    names = [v.strip() for v in (tta.split(",") if isinstance(tta, str) else tta) if v.strip()]
    bad = [v for v in names if v not in VIEWS]
    if bad or not names:
        raise ConfigError(f"unknown test-time view {', '.join(bad) or repr(tta)}; use auto, none or a comma-separated "
                          f"list of {', '.join(VIEWS)}")
    return ("identity", *dict.fromkeys(v for v in names if v != "identity"))


def _split_of(run: Run) -> dict | None:
    p = run.dir / "split.json"
    if not p.is_file():
        return None
    doc = json.loads(p.read_text())
    return {k: doc[k] for k in ("train", "val", "test", "labels_md5") if k in doc}


def check_members(runs: Sequence[Run]) -> None:
    """One line for the first way the members cannot be averaged."""
    if not runs:
        raise ConfigError("medmix ensemble needs at least one run")
    first = runs[0]
    for r in runs:
        r.require_single("medmix ensemble")
        if r.meta["model"] == ENSEMBLE:
            raise ConfigError(f"{r.path} is itself an ensemble; list its member runs instead")
    for r in runs[1:]:
        for key, what in (("dataset", "dataset"), ("img_size", "input size")):
            if r.meta.get(key) != first.meta.get(key):
                raise ConfigError(f"{r.path}: {what} {r.meta.get(key)!r} differs from {first.path}'s "
                                  f"{first.meta.get(key)!r}; ensemble members need the same")
        if r.task.to_dict() != first.task.to_dict():
            raise ConfigError(f"{r.path}: task or classes differ from {first.path}'s")
        if _split_of(r) != _split_of(first):
            raise ConfigError(f"{r.path} was trained on another train/val/test split than {first.path} (a class-"
                              f"folder or packed dataset is split by --seed): its test images may be another "
                              f"member's training images; train the members on one split (--split-seed N)")


def make_ensemble(runs: Sequence[str | os.PathLike | Run], out: str | os.PathLike, *, tta: Any = "none",
                  data_dir: str | os.PathLike | None = None, overwrite: bool = False, batch_size: int = 256,
                  say: Callable[[str], None] | None = None) -> dict:
    """Build the ensemble of ``runs`` into the run directory ``out``; returns its summary (members, views, the
    view scores on val, val and test metrics, seconds)."""
    from .data.tasks import MULTI_LABEL
    from .engine import _monitor, _score, _slim, evaluate_split, fit_confidence
    from .inference import resolve_precision
    from .losses import build_loss, default_loss_name
    from .paths import check_writable_dir

    say = say or (lambda s: None)
    views = parse_views(tta)
    t0 = time.perf_counter()
    members = [Run.of(r) for r in runs]
    check_members(members)
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise ConfigError(f"{out} already exists and is not empty; pass --overwrite or choose another --out")
    if any(out.resolve() == m.dir.resolve() for m in members):
        raise ConfigError(f"--out {out} is one of the members' run directories; choose another")
    check_writable_dir(out.parent if str(out.parent) else ".", "--out")
    first = members[0]
    info = first.task
    bundle = first.training_data(data_dir)
    mean, std = first.meta["mean"], first.meta["std"]
    transform = first.transform()
    precision = resolve_precision(first.meta.get("precision", "fp32"))
    eval_loss = build_loss(default_loss_name(info.task), info.task, info.num_classes)
    monitor = _monitor(first.meta.get("monitor", "auto"), info.task)
    built = [m.build_model() for m in members]
    renorm = [renormalisation(mean, std, m.meta["mean"], m.meta["std"]) for m in members]
    temps = [m.meta.get("temperature", 1.0) for m in members]

    def averaged(vs: Sequence[str]) -> Averaged:
        return Averaged(built, vs, renorm, temps, info.task == MULTI_LABEL).eval()

    def scored(model, split: str, **kw) -> dict:
        return evaluate_split(model, bundle.splits[split], transform, info.task, info.class_names, eval_loss,
                              batch_size, precision, **kw)

    view_scores = {}
    if views is None:
        for cand in TTA_CANDIDATES:
            m = scored(averaged(cand), "val")
            view_scores[",".join(cand)] = {"score": _score(m, monitor), "acc": m["acc"], "auc": m["auc"]}
            say(f"views {','.join(cand):28s} val {monitor} {_score(m, monitor):.4f}  acc {m['acc']:.4f}  "
                f"auc {m['auc']:.4f}")
        best = max(view_scores.values(), key=lambda s: s["score"])["score"]
        views = next(c for c in TTA_CANDIDATES if view_scores[",".join(c)]["score"] == best)
    model = averaged(views)
    member_meta = [{"model": m.meta["model"], "model_kwargs": m.meta["model_kwargs"], "scale": s, "shift": b,
                    "temperature": t} for m, (s, b), t in zip(members, renorm, temps)]
    meta = {k: v for k, v in first.meta.items() if k not in ("ood", "calibration", "warnings", "epoch", "epochs_run",
                                                             "val_metrics", "test_metrics", "bn_recalibrated")}
    meta.update(model=ENSEMBLE, model_kwargs={"members": member_meta, "views": list(views),
                                              "multi_label": info.task == MULTI_LABEL},
                temperature=1.0, threshold=first.meta.get("threshold", 0.5), precision=precision, monitor=monitor,
                ensemble={"members": [str(m.path) for m in members], "views": list(views),
                          "view_scores_val": view_scores})
    build = out.with_name(out.name + ".partial")
    if build.exists():
        shutil.rmtree(build)
    build.mkdir(parents=True)
    try:
        extras = fit_confidence(model, bundle, transform, info.task, meta, batch_size=batch_size,
                                seed=int(first.meta.get("seed", 0)), say=say)
        val = scored(model, "val", temperature=meta["temperature"], threshold=meta["threshold"])
        test = scored(model, "test", temperature=meta["temperature"], threshold=meta["threshold"])  # read once
        meta.update(val_metrics=_slim(val), test_metrics=_slim(test), epoch=0)
        save_checkpoint(build / "best_model.pth", model, meta, extras=extras)
        if (first.dir / "split.json").is_file():
            shutil.copy2(first.dir / "split.json", build / "split.json")
        summary = {"members": [str(m.path) for m in members], "views": list(views), "view_scores_val": view_scores,
                   "member_val": [m.meta.get("val_metrics", {}) for m in members],
                   "member_test": [m.meta.get("test_metrics", {}) for m in members],
                   "val": _slim(val), "test": _slim(test), "temperature": meta["temperature"],
                   "seconds": time.perf_counter() - t0, "run_dir": str(out)}
        atomic_write_text(build / "ensemble.json", json.dumps(summary, indent=2, default=str))
        atomic_write_text(build / "metrics.json", json.dumps(
            {"dataset": first.dataset, "model": ENSEMBLE, "best_epoch": 0, "epochs_run": 0, "val": _slim(val),
             "test": _slim(test), "train_seconds": 0.0, "float_precision": precision}, indent=2, default=str))
    except BaseException:
        shutil.rmtree(build, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out)
    build.rename(out)
    return summary
