"""A trained run, loaded once: the checkpoint's weights and metadata, what kind of run it is, and everything a
consumer builds from it (model, input transform, training data). ``evaluate``, ``predict``, ``calibrate``,
``explain``, ``export`` and ``serve`` all start from a :class:`Run`.

>>> run = Run.load("runs/pneumonia")          # a run directory or a checkpoint file
>>> run.kind, run.task.class_names             # ('single', ('normal', 'pneumonia'))
>>> model, tf = run.build_model(), run.transform()
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .checkpoint import GENERALIST, build_model, is_generalist, load_checkpoint, load_training_data, resolve_checkpoint
from .data import BatchTransform, DataBundle
from .data.tasks import TaskInfo
from .errors import ConfigError

SINGLE = "single"


@dataclass
class Run:
    path: Path  # the checkpoint file
    meta: dict
    state: dict[str, torch.Tensor] = field(repr=False)
    extras: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    train_state: dict | None = field(default=None, repr=False)

    @classmethod
    def load(cls, run_or_checkpoint: str | os.PathLike) -> Run:
        """Read a checkpoint (or a run directory's ``best_model.pth``) once; one ``CheckpointError`` line if bad."""
        path = resolve_checkpoint(run_or_checkpoint)
        state, meta, train_state, extras = load_checkpoint(path, extras=True)
        return cls(path, meta, state, extras or {}, train_state)

    @classmethod
    def of(cls, run: Run | str | os.PathLike) -> Run:
        """``run`` itself when it is already loaded, else :meth:`load` it."""
        return run if isinstance(run, Run) else cls.load(run)

    # ------------------------------------------------------------------------------------------ what it is
    @property
    def dir(self) -> Path:
        return self.path.parent

    @property
    def kind(self) -> str:
        """``"single"`` (one dataset) or ``"generalist"`` (several datasets, one model with a router)."""
        return GENERALIST if is_generalist(self.meta) else SINGLE

    @property
    def is_generalist(self) -> bool:
        return self.kind == GENERALIST

    @property
    def task(self) -> TaskInfo:
        """The task of the model's output (a generalist's: its router's, over the datasets)."""
        return TaskInfo.from_dict(self.meta["task"])

    @property
    def dataset(self) -> str:
        return str(self.meta.get("dataset", ""))

    def require_single(self, what: str) -> Run:
        """Refuse a generalist for a command that needs a single-dataset classifier (one line naming ``what``)."""
        if self.is_generalist:
            raise ConfigError(f"{self.path} is a generalist checkpoint ({self.dataset}); {what} supports "
                              f"single-dataset checkpoints only: use `medmix predict` / `medmix evaluate` (routed), "
                              f"or train a specialist")
        return self

    # ------------------------------------------------------------------------------------------ what it builds
    def build_model(self) -> nn.Module:
        """The model with its trained weights, in eval mode."""
        return build_model(self.meta, self.state)

    def transform(self, *, channels_last: bool = True, img_size: int | None = None) -> BatchTransform:
        """uint8 batches -> the model's normalised input (no augmentation)."""
        return BatchTransform(int(img_size or self.meta["img_size"]), self.meta["mean"], self.meta["std"],
                              channels_last=channels_last)

    def training_data(self, data_dir: str | os.PathLike | None = None, split_name: str = "split.json") -> DataBundle:
        """The dataset the run was trained on, with the same split (``split.json`` beside the checkpoint); refused
        with one line when the data found there have other classes or another task than the checkpoint."""
        bundle = load_training_data(self.meta, self.dir, data_dir, split_name)
        if not self.is_generalist:
            info = self.task
            if bundle.info.class_names != info.class_names or bundle.info.task != info.task:
                raise ConfigError(f"the data found for {self.dataset!r} do not match the checkpoint's classes/task")
        return bundle
