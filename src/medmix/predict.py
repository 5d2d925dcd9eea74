"""Ask a trained model about new images: label, confidence and the full probability distribution.

>>> from medmix import Predictor
>>> p = Predictor("runs/quickstart")                   # a run directory or a best_model.pth
>>> p.predict(["scan.png"])[0]
{'file': 'scan.png', 'label': 'normal, benign', 'index': 1, 'confidence': 0.93, 'probabilities': {...},
 'in_distribution': True, 'ood_score': 41.7}

Confidences are calibrated (divided by the temperature stored in the checkpoint). ``in_distribution`` is False when
the image does not look like the training data (:mod:`medmix.ood`; ``ood_score`` higher = more unusual, flagged above
the threshold fixed on the validation split); checkpoints trained before the OOD fit carry neither field.

Images are converted exactly like the training data (see :mod:`medmix.data.images`): channels matched to the model,
resized to the stored image size, then the same resize/normalisation transform as evaluation.
"""
from __future__ import annotations

import os
from typing import Any, Iterable

import torch

from .calibrate import stored_temperature
from .data.images import load_image
from .errors import ConfigError, check_top_k
from .imaging import as_inputs, describe, format_answer, per_class
from .generalist_predictor import GeneralistPredictor
from .inference import extract, predict_logits, probabilities
from .ood import Detector
from .run import Run


class Predictor:
    """Loads a checkpoint once and classifies images (paths, bytes, PIL images or arrays)."""

    def __init__(self, checkpoint: str | os.PathLike | Run, *, threshold: float | None = None,
                 ordinal_mode: str = "argmax", ood_method: str | None = None) -> None:
        """``threshold``: multi-label decision threshold (default: the checkpoint's, tuned on val, else 0.5).
        ``ordinal_mode``: for ordinal tasks, report the argmax grade or the rounded expected grade.
        ``ood_method``: the OOD score (``mahalanobis`` or ``energy``; default: the checkpoint's)."""
        if ordinal_mode not in ("argmax", "expected"):
            raise ConfigError(f"unknown ordinal mode {ordinal_mode!r}; use argmax or expected")
        self.ordinal_mode = ordinal_mode
        self.run = Run.of(checkpoint).require_single("Predictor (and explain, serve)")
        self.path, self.meta = self.run.path, self.run.meta
        self.model = self.run.build_model()
        self.ood = Detector.from_checkpoint(self.meta, self.run.extras, ood_method)  # None: no OOD data
        self.info = self.run.task
        self.transform = self.run.transform()
        self.temperature = stored_temperature(self.meta)  # one number, or one per label (multi-label)
        if threshold is not None and not (isinstance(threshold, (int, float)) and 0.0 <= threshold <= 1.0):
            raise ConfigError(f"--threshold must be in [0, 1], got {threshold!r}")
        t = threshold if threshold is not None else self.meta.get("threshold", 0.5)
        self.thresholds = per_class(t, len(self.class_names))

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.info.class_names

    def load(self, src: Any, name: str | None = None) -> torch.Tensor:
        """One input -> uint8 ``(C, H, W)`` at the stored data size."""
        return load_image(src, self.info.n_channels, int(self.meta["data_size"]), name)

    def probabilities(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 batch ``(B, C, H, W)`` -> calibrated probabilities ``(B, K)``."""
        logits = predict_logits(self.model, images, self.transform)
        return probabilities(logits, self.info.task, self.temperature)

    def predict(self, inputs: Iterable[Any], top_k: int | None = None) -> list[dict]:
        check_top_k(top_k)
        items, names = as_inputs(inputs)
        batch = torch.stack([self.load(x, n) for x, n in zip(items, names)])
        logits, ood = self.logits_and_ood(batch)
        probs = probabilities(logits, self.info.task, self.temperature)
        return [self._describe(n, p, top_k, o) for n, p, o in zip(names, probs, ood)]

    def logits_and_ood(self, images: torch.Tensor) -> tuple[torch.Tensor, list[dict | None]]:
        """uint8 batch -> raw logits ``(B, K)`` and per image ``{"in_distribution", "ood_score"}`` (None when the
        checkpoint has no OOD data), from one forward pass."""
        needs_features = self.ood is not None and self.ood.needs_features
        logits, features = extract(self.model, images, self.transform, features=needs_features)
        return logits, [None] * len(images) if self.ood is None else self.ood(logits, features, images)

    def _describe(self, name: str, p: torch.Tensor, top_k: int | None, ood: dict | None = None) -> dict:
        answer = describe(p, self.class_names, self.info.task, self.thresholds, top_k, self.ordinal_mode)
        return {"file": name, **answer, **(ood or {})}


def load_predictor(checkpoint: str | os.PathLike, **kwargs: Any):
    """A :class:`Predictor`, or a :class:`medmix.generalist.GeneralistPredictor` for a generalist checkpoint."""
    run = Run.of(checkpoint)  # read once, handed to the predictor
    if run.is_generalist:
        return GeneralistPredictor(run, threshold=kwargs.get("threshold"))
    return Predictor(run, **kwargs)


def format_prediction(r: dict) -> str:
    """A readable block: the file, the answer and the distribution sorted by probability."""
    return format_answer(r, f"{r['file']}: {r['label']}  (confidence {r['confidence']:.2%})",
                         "does not look like the training data")
