"""Answers of a generalist checkpoint (several datasets, one model): route each image to a dataset's head, answer
with it, flag images that look like none of the training datasets. Inference only: nothing here imports the
training loop, so the predictor, the CLI's predict and the server stay free of it."""
from __future__ import annotations

import os
import warnings
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch

from .data.images import load_image
from .data.tasks import MULTI_CLASS, TaskInfo
from .errors import ConfigError, check_top_k
from .imaging import as_inputs, describe, format_answer, per_class, pixel_std
from .inference import extract, probabilities
from .ood import EXTRA_MEANS, EXTRA_PRECISION, GateDetector, mahalanobis_score
from .run import Run


class GeneralistPredictor:
    """Routes each image to the dataset the modality head recognises and answers with that dataset's head.

    ``predict`` returns per image ``{"file", "dataset", "dataset_confidence", "routed", "label", "index",
    "confidence", "probabilities", "dataset_probabilities", "in_distribution", "ood_score"}``; with ``dataset=NAME``
    that head is used for every image (``routed`` False; ``dataset_confidence`` is still the router's probability of
    that dataset). ``in_distribution`` is False when the image is far from every (dataset, class) of the training
    data, by the threshold of the dataset it was routed to, or blank.
    """

    def __init__(self, checkpoint: str | os.PathLike | Run, *, threshold: float | None = None) -> None:
        run = Run.of(checkpoint)
        self.run, self.path, self.meta, extras = run, run.path, run.meta, run.extras
        if not run.is_generalist:
            raise ConfigError(f"{self.path} is not a generalist checkpoint; use medmix.Predictor")
        self.model = run.build_model()
        g = self.meta["generalist"]
        self.datasets = g["datasets"]
        self.names = [d["name"] for d in self.datasets]
        self.infos = [TaskInfo.from_dict(d["task"]) for d in self.datasets]
        self.channels, self.img_size = int(g["channels"]), int(g["img_size"])
        self.transform = run.transform(img_size=self.img_size)
        self.threshold = threshold
        self.ood = self.meta.get("ood") if isinstance(self.meta.get("ood"), dict) else None
        self.stats = {k: extras[k] for k in (EXTRA_MEANS, EXTRA_PRECISION)} if self.ood and extras and \
            EXTRA_MEANS in extras else None
        self.gate = None
        if self.stats is not None and isinstance(self.ood.get("gate"), dict):
            try:
                self.gate = GateDetector(self.ood["gate"], extras)
            except ConfigError as e:  # fitted on another gate version: the model's own score still works
                warnings.warn(f"modality gate not used: {e}", stacklevel=2)

    def load(self, src: Any, name: str | None = None) -> torch.Tensor:
        return load_image(src, self.channels, self.img_size, name)

    def analyse(self, images: torch.Tensor, dataset: str | None = None, batch_size: int = 256) -> dict[str, Any]:
        """uint8 images in the common format ``(N, C, S, S)`` -> ``{"logits" (N, columns), "router" (N, datasets)
        calibrated router probabilities, "dataset_index" (N,) the routed (or forced) dataset, "ood_score" and
        "in_distribution" (N,) numpy arrays, or None without OOD data}``."""
        self._check_dataset(dataset)
        logits, feats = extract(self.model, images, self.transform, batch_size, features=self.stats is not None)
        n_d = len(self.names)
        router = probabilities(logits[:, :n_d], MULTI_CLASS, self.meta["generalist"].get("modality_temperature", 1.0))
        index = torch.full((len(images),), self.names.index(dataset)) if dataset is not None else router.argmax(1)
        out: dict[str, Any] = {"logits": logits, "router": router, "dataset_index": index, "ood_score": None,
                               "in_distribution": None}
        if self.stats is not None:
            scores = mahalanobis_score(feats, self.stats)
            thresholds = np.array([float(self.ood["thresholds_by_dataset"][n]) for n in self.names])
            guard = self.ood.get("min_pixel_std_by_dataset") or {}
            floor = np.array([float(guard.get(n, self.ood.get("min_pixel_std") or 0.0)) for n in self.names])
            blank = pixel_std(images) < floor[index.numpy()]
            out["ood_score"] = scores
            out["over"], out["blank"] = scores > thresholds[index.numpy()], blank
            out["in_distribution"] = ~out["over"] & ~blank
            if self.gate is not None:
                out["gate"] = self.gate(images)
                out["in_distribution"] &= out["gate"][1]
        return out

    def predict(self, inputs: Iterable[Any], dataset: str | None = None, top_k: int | None = None) -> list[dict]:
        check_top_k(top_k)
        self._check_dataset(dataset)
        items, names = as_inputs(inputs)
        a = self.analyse(torch.stack([self.load(x, n) for x, n in zip(items, names)]), dataset)
        out = []
        for i, name in enumerate(names):
            k, p = self.head_probabilities(a, i)
            d, info = self.datasets[k], self.infos[k]
            r = {"file": name, "dataset": d["name"], "dataset_confidence": round(float(a["router"][i, k]), 6),
                 "routed": dataset is None,
                 "dataset_probabilities": {n: round(float(a["router"][i, j]), 6) for j, n in enumerate(self.names)}}
            t = self.threshold if self.threshold is not None else d.get("threshold", 0.5)
            answer = describe(p, info.class_names, info.task, per_class(t, len(p)), top_k)
            r.update((key, v) for key, v in answer.items() if key not in ("present", "thresholds", "expected_grade"))
            if a["ood_score"] is not None:
                r["in_distribution"] = bool(a["in_distribution"][i])
                r["ood_score"] = round(float(a["ood_score"][i]), 6)
            if a.get("gate") is not None:
                gs, gok, guess = a["gate"]
                r.update(modality_score=round(float(gs[i]), 6), modality_match=bool(gok[i]), looks_like=guess[i][0],
                         looks_like_probability=round(guess[i][1], 6))
            if a["ood_score"] is not None and not r["in_distribution"]:
                r["flagged_by"] = [n for n, hit in (("features", a["over"][i]), ("modality", a.get("gate") is not None
                                                    and not a["gate"][1][i]), ("blank", a["blank"][i])) if hit]
            out.append(r)
        return out

    def head_probabilities(self, a: dict[str, Any], i: int) -> tuple[int, torch.Tensor]:
        """Image ``i`` of an :meth:`analyse` result -> its dataset's index and that head's calibrated probabilities."""
        k = int(a["dataset_index"][i])
        d = self.datasets[k]
        lo, hi = d["columns"]
        return k, probabilities(a["logits"][i:i + 1, lo:hi], self.infos[k].task, d.get("temperature", 1.0) or 1.0)[0]

    def _check_dataset(self, dataset: str | None) -> None:
        if dataset is not None and dataset not in self.names:
            raise ConfigError(f"--dataset {dataset!r} is not one of this generalist's datasets: "
                              f"{', '.join(self.names)}")


def format_routed(r: dict) -> str:
    """A readable block for one routed prediction."""
    how = "routed to" if r["routed"] else "forced head"
    first = (f"{r['file']}: {r['dataset']} ({how}; router confidence {r['dataset_confidence']:.2%}) -> "
             f"{r['label']}  (confidence {r['confidence']:.2%})")
    return format_answer(r, first, "looks like none of the training datasets")
