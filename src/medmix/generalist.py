"""One model for several datasets: joint training, a modality router, routed prediction and per-dataset evaluation.

>>> from medmix.generalist import GeneralistConfig, train_generalist, GeneralistPredictor
>>> r = train_generalist(GeneralistConfig(datasets=("pneumoniamnist", "breastmnist"), epochs=5, out="runs/gen"))
>>> GeneralistPredictor("runs/gen").predict("scan.png")[0]
{'file': 'scan.png', 'dataset': 'breastmnist', 'dataset_confidence': 0.99, 'label': 'malignant', ...}

**Model.** One backbone (any registered model) with one linear head per dataset and a modality head that predicts
which dataset an image comes from (:class:`medmix.models.multihead.MultiHeadClassifier`).

**Data.** Every dataset is brought to one size and channel count when loaded (:mod:`medmix.data.mixture`: grayscale
replicated to 3 channels when any dataset is in colour), normalised with the mean/std of the pooled training images
(one normalisation, because at prediction time the dataset is not known), and augmented with its own policy.
Batches mix the datasets by temperature-scaled sampling (``p_d ∝ n_d^(1/T)``, ``T = 2`` by default).

**Loss.** Each batch element contributes its own dataset's loss on its own head (cross-entropy for single-label
tasks, ordinal grades included; BCE for multi-label), plus ``modality_weight`` × the cross-entropy of the modality
head; all averaged over the batch.

**Selection.** After every epoch (``steps_per_epoch`` batches, default one pass over the pooled training images)
each dataset's validation split is scored with its own head (AUC for binary and multi-label tasks, ACC otherwise);
the mean of those scores picks the best epoch and drives early stopping. The test splits are read once, at the end,
with the best weights.

**Trust.** At the end, BatchNorm statistics are re-estimated on clean training images drawn with the sampling
weights; every head gets its own temperature fitted on its dataset's validation logits, and the modality head one
fitted on all validation images; the out-of-distribution check fits a Mahalanobis model whose classes are the
(dataset, class) pairs, with one threshold per dataset (95% of that dataset's validation images pass), and a blank
guard per dataset (half the 0.1% quantile of its training images' pixel std), both applied to the dataset the router
chose. Resume, data-parallel training, explain, serve, export, calibrate and evaluate work as for one dataset.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from . import distributed
from ._version import __version__
from .checkpoint import GENERALIST, is_generalist, save_checkpoint
from .config import GeneralistConfig
from .data import BatchTransform, DataBundle, Split, get_policy, load_dataset, normalization
from .data.mixture import MixedBatchSampler, common_channels, sampling_weights, to_common_format
from .data.tasks import MULTI_CLASS, MULTI_LABEL, TaskInfo
from .engine import (TrainResult, _as_json, _non_default_fields, all_labels, best_model, default_augment, launch,
                     recalibrate_batchnorm, write_run_files)
from .errors import ConfigError
from .evaluation import (_Member, _members_of, evaluate_generalist, evaluate_heads,  # noqa: F401  (the API, as before)
                         format_generalist, format_temperature, summarize)
from .generalist_predictor import GeneralistPredictor, format_routed  # noqa: F401  (medmix.generalist API)
from .inference import autocast, extract, machine_description, resolve_precision
from .losses import build_loss, default_loss_name
from .metrics import plot_confusion
from .models import model_info
from .models.multihead import MultiHeadClassifier, head_layout
from .report import plot_curves
from .small_data import MIN_VAL_FOR_OOD_THRESHOLD, MIN_VAL_FOR_TEMPERATURE, warn
from .training import Step, Task, Validation, epoch_seed

__all__ = ["GeneralistConfig", "GeneralistPredictor", "GeneralistResult", "evaluate_generalist", "is_generalist",
           "parse_datasets", "train_generalist"]

KIND = GENERALIST
MAX_RECALIBRATE_IMAGES = 16_384  # clean training images (drawn with the sampling weights) for BatchNorm statistics
MAX_OOD_IMAGES_PER_DATASET = 5_000  # training images per dataset for the Mahalanobis fit


def parse_datasets(value: str | Sequence[str]) -> tuple[str, ...]:
    """``"a,b,c"`` or ``["a", "b"]`` -> ``("a", "b", "c")``; duplicates and empty names are errors."""
    names = [s.strip() for s in (value.split(",") if isinstance(value, str) else value)]
    if not names or any(not s for s in names):
        raise ConfigError(f"--dataset lists an empty name: {value!r}")
    dup = sorted({s for s in names if names.count(s) > 1})
    if dup:
        raise ConfigError(f"--dataset lists {', '.join(dup)} more than once")
    return tuple(names)


class GeneralistResult(TrainResult):
    """:class:`medmix.engine.TrainResult` whose ``val``/``test`` are :func:`evaluate_heads` results."""

    def summary(self) -> dict:
        return {"run_dir": str(self.run_dir), "best_epoch": self.best_epoch, "seconds": round(self.seconds, 2),
                "val": summarize(self.val), "test": summarize(self.test)}


def _load_members(cfg: GeneralistConfig) -> tuple[list[_Member], int, int]:
    split_seed = cfg.seed if cfg.split_seed is None else cfg.split_seed
    bundles: list[DataBundle] = [load_dataset(n, data_dir=cfg.data_dir, size=cfg.size, seed=split_seed,
                                              download=cfg.download) for n in cfg.datasets]
    names = [b.name for b in bundles]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConfigError(f"the datasets {', '.join(dup)} appear more than once")
    side = int(cfg.img_size or min(b.image_size for b in bundles))
    channels = int(cfg.channels or common_channels([b.info.n_channels for b in bundles]))
    members = []
    for b in bundles:
        splits = {k: Split(to_common_format(s.images, side, channels), s.labels) for k, s in b.splits.items()}
        info = TaskInfo(b.info.task, b.info.class_names, channels)
        members.append(_Member(b.name, info, splits, b.source, b.image_size, default_augment(b.name),
                               b.split_indices))
    return members, side, channels


# ----------------------------------------------------------------------------------------------- training
def train_generalist(cfg: GeneralistConfig | None = None, *, log: Callable[[str], None] | None = None,
                     **kwargs: Any) -> GeneralistResult:
    """Train one model on several datasets (see the module docstring); arguments as :class:`GeneralistConfig`.

    ``resume`` continues a killed (or finished, for more ``epochs``) run bit-identically, as :func:`medmix.train`
    does: the shared loop (:mod:`medmix.training`) also restores the RNG and the mixed-batch sampler."""
    given = set(kwargs) if cfg is None else _non_default_fields(cfg)
    return launch(cfg or GeneralistConfig(**kwargs), given, log, MixtureTask)


class MixtureTask(Task):
    """Several datasets, one backbone: a head per dataset plus the modality router, trained on mixed batches."""
    kind = KIND

    @staticmethod
    def prepare(cfg: GeneralistConfig) -> None:
        cfg.datasets = parse_datasets(cfg.datasets)

    def __init__(self, cfg: GeneralistConfig, ctx: distributed.Context | None = None, resume: Any = None) -> None:
        self.cfg, self.ctx = cfg, ctx or distributed.Context()
        self.precision = resolve_precision(cfg.precision)
        torch.manual_seed(cfg.seed)
        members, side, channels = _load_members(cfg)
        if resume is not None:
            _check_saved_splits(members, resume.source)
        if side < model_info(cfg.model).min_img_size:
            raise ConfigError(f"model {cfg.model!r} needs img_size >= {model_info(cfg.model).min_img_size}, "
                              f"got {side}")
        self.members, self.side, self.channels = members, side, channels
        self.sizes = [len(m.splits["train"]) for m in members]
        self.weights = sampling_weights(self.sizes, cfg.sampling_temperature)
        mean, std = normalization(cfg.normalize, [m.splits["train"].images for m in members])
        self.train_tfs = [BatchTransform(side, mean, std, get_policy(m.augment)) for m in members]
        self.eval_tf = BatchTransform(side, mean, std)
        self.losses = [build_loss(default_loss_name(m.info.task), m.info.task, m.info.num_classes,
                                  label_smoothing=cfg.label_smoothing if m.info.task != MULTI_LABEL else 0.0)
                       for m in members]
        self.head_sizes = [m.info.num_classes for m in members]
        model_kwargs = dict(in_chans=channels, img_size=side, drop_rate=cfg.drop_rate,
                            drop_path_rate=cfg.drop_path_rate, **cfg.model_kwargs)
        try:
            model = MultiHeadClassifier(cfg.model, self.head_sizes, **model_kwargs)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"model {cfg.model!r}: {e}") from None
        model = model.to(memory_format=torch.channels_last)
        if self.ctx.world_size > 1:
            model = distributed.convert_sync_batchnorm(model, self.ctx.device)
        self.model, self.model_kwargs = model.to(self.ctx.device), model_kwargs
        self.datasets_meta = datasets_meta = [
            {"name": m.name, "task": m.info.to_dict(), "columns": list(cols), "data_source": m.source,
             "data_size": m.data_size, "augment": m.augment, "temperature": 1.0, "threshold": 0.5,
             "n_train": len(m.splits["train"])} for m, cols in zip(members, head_layout(self.head_sizes)[1:])]
        # the checkpoint's "task" is the router's (one class per dataset); a one-dataset run (a specialist trained by
        # the same pipeline, as benchmarks/generalist.py does) has no routing question, so it records its dataset's
        modality_info = TaskInfo(MULTI_CLASS, tuple(m.name for m in members), channels) if len(members) > 1 else \
            members[0].info
        self.meta: dict[str, Any] = {
            "kind": KIND, "model": cfg.model, "model_kwargs": model_kwargs, "task": modality_info.to_dict(),
            "dataset": ",".join(m.name for m in members), "img_size": side, "data_size": side, "mean": mean,
            "std": std, "temperature": 1.0, "seed": cfg.seed, "precision": self.precision,
            "generalist": {"datasets": datasets_meta, "modality_columns": [0, len(members)],
                           "modality_temperature": 1.0,
                           "sampling": {"temperature": cfg.sampling_temperature, "weights": self.weights.tolist()},
                           "channels": channels, "img_size": side, "channel_rule":
                           "grayscale replicated to 3 channels" if channels == 3 else "colour -> BT.601 luma"},
            "train_config": _as_json({k: v for k, v in asdict(cfg).items() if k not in ("quiet", "resume", "ddp")})}
        self.steps_per_epoch = cfg.steps_per_epoch or max(1, sum(self.sizes) // cfg.batch_size)
        # one generator for the whole run (data order across epochs, augmentation); its state and the sampler's
        # running permutations are part of the resumable state
        self.gen = torch.Generator().manual_seed(epoch_seed(cfg.seed, 0))
        self.sampler = MixedBatchSampler(self.sizes, cfg.batch_size, self.weights, self.gen)

    def default_out(self) -> str:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        return str(Path("runs") / f"generalist-{len(self.cfg.datasets)}sets-{self.cfg.model}-s{self.cfg.seed}-{stamp}")

    def describe(self, world: str) -> str:
        n_params = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        parts = ", ".join(f"{m.name} ({n}, p={w:.2f})" for m, n, w in zip(self.members, self.sizes, self.weights))
        return (f"a generalist {self.cfg.model} ({n_params / 1e6:.2f} M params) on {parts} [{self.side} px, "
                f"{self.channels} channels, {self.steps_per_epoch} steps/epoch, {self.precision}{world}]")

    def write_files(self, run: Path) -> None:
        from .data.folders import save_split

        for m in self.members:
            if m.split_indices is not None:
                save_split(run / f"split_{m.name}.json", m.split_indices,
                           int(m.source.get("split_seed", self.cfg.seed)), all_labels(m.split_indices, m.splits),
                           m.source["path"])

    def batches(self):
        return self.sampler.batches(self.steps_per_epoch)

    def step(self, net: nn.Module, batch: list) -> Step | None:
        """The mixed batch's loss, mean over its images of ``modality_weight`` x the router's cross-entropy plus each
        image's own head loss. Data-parallel: this process trains on its contiguous slice of the global batch (every
        process draws every augmentation, so the generator advances identically, and keeps its rows); its loss is
        scaled by its share of the batch so that DDP's gradient average is the one-process gradient."""
        ctx, members, n_d = self.ctx, self.members, len(self.members)
        n, sharded = sum(len(idx) for _, idx in batch), ctx.world_size > 1
        if sharded and n < ctx.world_size:  # too small to give every process an image (the same on every process)
            return None
        mine = distributed.shard(n, ctx.rank, ctx.world_size) if sharded else slice(0, n)
        xs, targets, parts, offset = [], [], [], 0
        for d, idx in batch:
            lo, hi = max(mine.start, offset) - offset, min(mine.stop, offset + len(idx)) - offset
            tf, images = self.train_tfs[d], members[d].splits["train"].images[idx]
            if hi > lo:
                xs.append(tf(images, train=True, generator=self.gen, rows=slice(lo, hi) if sharded else None))
                targets.append(torch.full((hi - lo,), d, dtype=torch.long))
                parts.append((d, idx[lo:hi]))
            elif not tf.augment.identity:  # none of these rows is ours: draw their augmentation all the same
                tf._random_affine(len(idx), self.gen)
            offset += len(idx)
        x = torch.cat(xs).contiguous(memory_format=torch.channels_last).to(ctx.device)
        with autocast(self.precision):
            logits = net(x)
        logits, m = logits.float(), x.shape[0]
        mod_loss = F.cross_entropy(logits[:, :n_d], torch.cat(targets).to(ctx.device))
        loss, row = self.cfg.modality_weight * mod_loss, 0
        for d, idx in parts:
            a, b = self.datasets_meta[d]["columns"]
            labels = members[d].splits["train"].labels[idx].to(ctx.device)
            loss = loss + self.losses[d](logits[row:row + len(idx), a:b], labels) * (len(idx) / m)
            row += len(idx)
        return Step(loss * (m * ctx.world_size / n) if sharded else loss, loss, m, {"modality_loss": mod_loss})

    def validate(self) -> Validation:
        val = evaluate_heads(self.model, self.members, "val", self.eval_tf, self.meta,
                             batch_size=self.cfg.eval_batch_size, precision=self.precision, temperatures=False,
                             with_loss=True)
        fields = {"val_loss": val["loss"], "val_score": val["score"], "val_routing_acc": val["routing_acc"],
                  **{f"val_{k}/{n}": v[k] for n, v in val["datasets"].items() for k in ("acc", "auc")}}
        per = "  ".join(f"{n} {v['monitor']} {v['score']:.4f}" for n, v in val["datasets"].items())
        return Validation(fields, val["score"], summarize(val),
                          f"val score {val['score']:.4f}  routing {val['routing_acc']:.4f}  {per}")

    def stop_text(self) -> str:
        return f"early stop: no improvement of the mean validation score for {self.cfg.patience} epochs"

    def state_dict(self) -> dict:
        return {"generator": self.gen.get_state(), "sampler": self.sampler.state_dict()}

    def result_of_finished_run(self, final: Path, rank: int) -> GeneralistResult:
        return GeneralistResult.read(final, rank)

    def load_state_dict(self, state: dict) -> None:
        if state:
            self.gen.set_state(state["generator"])
            self.sampler.load_state_dict(state["sampler"])

    def finish(self, run: Path, final: Path, best_epoch: int, history: list[dict], seconds: float,
               say: Callable[[str], None]) -> GeneralistResult:
        cfg, members, meta, eval_tf, precision = self.cfg, self.members, self.meta, self.eval_tf, self.precision
        # the best weights, their trust data, then the test splits, read once
        model = best_model(self.model, self.ctx, lambda: MultiHeadClassifier(cfg.model, self.head_sizes,
                                                                             **self.model_kwargs), run)
        if cfg.bn_recalibrate and any(not get_policy(m.augment).identity for m in members):
            pool = _mixture_sample(members, "train", self.weights, MAX_RECALIBRATE_IMAGES, cfg.seed)
            if recalibrate_batchnorm(model, pool, eval_tf):
                meta["bn_recalibrated"] = True
        extras = _fit_trust(model, members, eval_tf, meta, cfg, precision, say)
        val, test = ({**evaluate_heads(model, members, split, eval_tf, meta, batch_size=cfg.eval_batch_size,
                                       precision=precision), "kind": KIND, "split": split, "model": cfg.model}
                     for split in ("val", "test"))
        meta.update(epoch=best_epoch, epochs_run=len(history), val_metrics=summarize(val),
                    test_metrics=summarize(test), train_seconds=seconds, machine=machine_description())
        save_checkpoint(run / "best_model.pth", model, meta, extras=extras)
        doc = {"kind": KIND, "datasets": [m.name for m in members], "model": cfg.model, "seed": cfg.seed,
               "best_epoch": best_epoch, "epochs_run": len(history), "train_seconds": seconds,
               "machine": machine_description(), "medmix_version": __version__, "img_size": self.side,
               "channels": self.channels, "float_precision": precision, "warnings": meta.get("warnings", []),
               "sampling_weights": dict(zip([m.name for m in members], self.weights.tolist())), "val": val,
               "test": test}
        write_run_files(run, doc, history)
        plot_curves(history, run / "curves.png", best_epoch, losses=(
            ("train_loss", "train loss (all heads)"), ("train_modality_loss", "train loss (router)"),
            ("val_loss", "val loss (mean of heads)")), scores=(
            ("val_score", "*mean val score"), ("val_routing_acc", ":val routing ACC"),
            *((f"val_acc/{m.name}", f"{m.name} val ACC") for m in members)))
        plot_confusion(test["routing_confusion"], [m.name for m in members], run / "routing_confusion_test.png",
                       f"modality routing, test - {cfg.model}")
        return GeneralistResult(final, best_epoch, val, test, history, seconds)


def _check_saved_splits(members: Sequence[_Member], run_dir: Path) -> None:
    """A resumed run must see the splits it was trained on (the data may have changed since)."""
    for m in members:
        f = run_dir / f"split_{m.name}.json"
        if m.split_indices is None or not f.is_file():
            continue
        saved = json.loads(f.read_text())
        if any(sorted(saved.get(k, [])) != sorted(np.asarray(v).tolist()) for k, v in m.split_indices.items()):
            raise ConfigError(f"{m.name}: the data found now give another split than {f}; resume with the data the "
                              f"run was trained on")


def _mixture_sample(members: Sequence[_Member], split: str, weights: np.ndarray, limit: int, seed: int
                    ) -> torch.Tensor:
    """Up to ``limit`` images of ``split``, each dataset contributing in proportion to ``weights`` (capped at its
    size), shuffled."""
    g = torch.Generator().manual_seed(seed)
    parts = []
    for m, w in zip(members, weights):
        x = m.splits[split].images
        k = min(len(x), max(1, int(round(limit * float(w)))))
        parts.append(x[torch.randperm(len(x), generator=g)[:k]])
    pool = torch.cat(parts)
    return pool[torch.randperm(len(pool), generator=g)]


def fit_temperatures(members: Sequence[_Member], val_logits: Sequence[torch.Tensor], meta: dict) -> None:
    """A temperature per head (on its dataset's val images) and one for the router (on all of them), written into
    ``meta["generalist"]``; a head with too few val images keeps T = 1 (one warning)."""
    from .calibrate import fit_calibration

    g = meta["generalist"]
    n_d = len(members)
    for m, d, logits in zip(members, g["datasets"], val_logits):
        a, b = d["columns"]
        if len(m.splits["val"]) < MIN_VAL_FOR_TEMPERATURE:
            warn(f"{m.name}: the validation split has {len(m.splits['val'])} images (fewer than "
                 f"{MIN_VAL_FOR_TEMPERATURE}): no confidence temperature fitted for its head (T = 1)", meta)
            continue
        d["temperature"], d["calibration"] = fit_calibration(logits[:, a:b], m.splits["val"].labels, m.info.task)
    if n_d > 1:
        mod_logits = torch.cat([lo[:, :n_d] for lo in val_logits])
        mod_labels = torch.cat([torch.full((len(m.splits["val"]),), k, dtype=torch.long)
                                for k, m in enumerate(members)])
        g["modality_temperature"], g["modality_calibration"] = fit_calibration(mod_logits, mod_labels, MULTI_CLASS)


def calibrate_generalist(run: Any, data_dir: str | os.PathLike | None = None, batch_size: int = 512) -> dict:
    """`medmix calibrate` for a generalist: refit every head's temperature and the router's on the validation splits
    and store them in the checkpoint (same weights, rewritten atomically)."""
    meta, g = run.meta, run.meta["generalist"]
    members = _members_of(meta, run.dir, data_dir)
    model, tf = run.build_model(), run.transform()
    precision = resolve_precision(meta.get("precision") or "auto")
    previous = {d["name"]: d.get("temperature", 1.0) for d in g["datasets"]}
    previous_router = g.get("modality_temperature", 1.0)
    val_logits = [extract(model, m.splits["val"].images, tf, batch_size, precision=precision, features=False)[0]
                  for m in members]
    n_warned = len(meta.get("warnings", []))
    fit_temperatures(members, val_logits, meta)
    save_checkpoint(run.path, run.state, meta, run.train_state, run.extras)  # keeps the OOD statistics
    heads = {d["name"]: {"n": len(m.splits["val"]), "task": m.info.task, "temperature": d.get("temperature", 1.0),
                         "previous_temperature": previous[d["name"]], **(d.get("calibration") or {})}
             for m, d in zip(members, g["datasets"])}
    return {"checkpoint": str(run.path), "kind": KIND, "dataset": meta["dataset"], "model": meta["model"],
            "split": "val", "router_temperature": g.get("modality_temperature", 1.0),
            "previous_router_temperature": previous_router, "router_calibration": g.get("modality_calibration"),
            "heads": heads, "warnings": meta.get("warnings", [])[n_warned:]}


def _fit_trust(model: nn.Module, members: Sequence[_Member], tf: BatchTransform, meta: dict, cfg: GeneralistConfig,
               precision: str, say: Callable[[str], None]) -> dict[str, torch.Tensor]:
    """Temperatures (per head and for the router) on val; OOD statistics on train with per-dataset thresholds."""
    from . import ood as ood_mod

    g = meta["generalist"]
    val_out = [extract(model, m.splits["val"].images, tf, cfg.eval_batch_size, precision=precision)
               for m in members]
    if cfg.calibrate:
        fit_temperatures(members, [lo for lo, _ in val_out], meta)
        say("calibration on val: router T = {:.3f}; heads {}".format(g["modality_temperature"], ", ".join(
            f"{d['name']} T = {format_temperature(d['temperature'], 3)}" for d in g["datasets"])))
    if not cfg.ood:
        return {}
    gen = torch.Generator().manual_seed(cfg.seed)
    feats, labels, offset, fitted = [], [], 0, []
    for m in members:
        tr = m.splits["train"]
        idx = torch.randperm(len(tr), generator=gen)[:MAX_OOD_IMAGES_PER_DATASET]
        fitted.append(tr.images[idx])
        feats.append(extract(model, tr.images[idx], tf, cfg.eval_batch_size, precision=precision)[1])
        # classes of the Mahalanobis model: the (dataset, class) pairs; multi-label datasets get one Gaussian
        ml = m.info.task == MULTI_LABEL
        cls = torch.zeros(len(idx), dtype=torch.long) if ml else tr.labels[idx].reshape(len(idx), -1)[:, 0]
        labels.append(cls + offset)
        offset += 1 if ml else m.info.num_classes
    stats = ood_mod.fit_mahalanobis(torch.cat(feats), torch.cat(labels), MULTI_CLASS)
    thresholds, splits = {}, {}
    for m, (_, f), ft in zip(members, val_out, feats):
        pool = len(m.splits["val"]) < MIN_VAL_FOR_OOD_THRESHOLD
        if pool:
            warn(f"{m.name}: the validation split has {len(m.splits['val'])} images (fewer than "
                 f"{MIN_VAL_FOR_OOD_THRESHOLD}): its out-of-distribution threshold is set on its training and "
                 f"validation images together (stricter)", meta)
        thresholds[m.name] = ood_mod.threshold_at_tpr(ood_mod.mahalanobis_score(f, stats), ood_mod.TPR,
                                                      ood_mod.mahalanobis_score(ft, stats) if pool else None)
        splits[m.name] = "train+val" if pool else "val"
    # the blank guard per dataset, applied to the dataset an image is routed to: pooled, one dataset that holds
    # blank images (MedNIST has constant slices) switched it off for all (measured: 71% of blank images flagged)
    min_std = {m.name: ood_mod.min_pixel_std(m.splits["train"].images) for m in members}
    meta["ood"] = {"method": "mahalanobis", "per_dataset": True, "thresholds_by_dataset": thresholds,
                   "tpr": ood_mod.TPR, "split": "val", "split_by_dataset": splits, "min_pixel_std_by_dataset": min_std,
                   "n_fit": int(sum(len(f) for f in feats)), "n_means": int(stats[ood_mod.EXTRA_MEANS].shape[0]),
                   "feature_dim": int(stats[ood_mod.EXTRA_MEANS].shape[1])}
    if ood_mod.gate_available():  # the modality gate, one Gaussian per (dataset, class) on its features
        meta["ood"]["gate"], gate_stats, _ = ood_mod.fit_gate(
            torch.cat(fitted), torch.cat(labels), torch.cat([m.splits["val"].images for m in members]), MULTI_CLASS)
        stats.update(gate_stats)
    return stats


