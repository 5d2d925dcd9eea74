"""Answers of a generalist checkpoint (several datasets, one model): route each image to a dataset's head, answer
with it, flag images that look like none of the training datasets. Inference only: nothing here imports the
training loop, so the predictor, the CLI's predict and the server stay free of it."""
from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch

from .run import Run
from .data.tasks import MULTI_CLASS, MULTI_LABEL, TaskInfo
from .errors import ConfigError, check_top_k
from .inference import extract


class GeneralistPredictor:
    """Routes each image to the dataset the modality head recognises and answers with that dataset's head.

    ``predict`` returns per image ``{"file", "dataset", "dataset_confidence", "routed", "label", "index",
    "confidence", "probabilities", "dataset_probabilities", "in_distribution", "ood_score"}``; with ``dataset=NAME``
    that head is used for every image (``routed`` False; ``dataset_confidence`` is still the router's probability of
    that dataset). ``in_distribution`` is False when the image is far from every (dataset, class) of the training
    data, by the threshold of the dataset it was routed to, or blank.
    """

    def __init__(self, checkpoint: str | os.PathLike | Run, *, threshold: float | None = None) -> None:
        from .ood import EXTRA_MEANS, EXTRA_PRECISION

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

    def load(self, src: Any, name: str | None = None) -> torch.Tensor:
        from .data.images import load_image

        return load_image(src, self.channels, self.img_size, name)

    def analyse(self, images: torch.Tensor, dataset: str | None = None, batch_size: int = 256) -> dict[str, Any]:
        """uint8 images in the common format ``(N, C, S, S)`` -> ``{"logits" (N, columns), "router" (N, datasets)
        calibrated router probabilities, "dataset_index" (N,) the routed (or forced) dataset, "ood_score" and
        "in_distribution" (N,) numpy arrays, or None without OOD data}``."""
        from .inference import probabilities
        from .ood import mahalanobis_score, pixel_std

        if dataset is not None and dataset not in self.names:
            raise ConfigError(f"--dataset {dataset!r} is not one of this generalist's datasets: "
                              f"{', '.join(self.names)}")
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
            out["in_distribution"] = (scores <= thresholds[index.numpy()]) & ~blank
        return out

    def predict(self, inputs: Iterable[Any], dataset: str | None = None, top_k: int | None = None) -> list[dict]:
        from .inference import probabilities
        from .inference import single_input as _single_input

        check_top_k(top_k)
        if dataset is not None and dataset not in self.names:
            raise ConfigError(f"--dataset {dataset!r} is not one of this generalist's datasets: "
                              f"{', '.join(self.names)}")
        items = [inputs] if _single_input(inputs) else list(inputs)
        if not items:
            raise ConfigError("no images given")
        names = [os.fspath(x) if isinstance(x, (str, os.PathLike)) else f"image[{i}]" for i, x in enumerate(items)]
        a = self.analyse(torch.stack([self.load(x, n) for x, n in zip(items, names)]), dataset)
        out = []
        for i, name in enumerate(names):
            k = int(a["dataset_index"][i])
            d, info = self.datasets[k], self.infos[k]
            lo, hi = d["columns"]
            p = probabilities(a["logits"][i:i + 1, lo:hi], info.task, d.get("temperature", 1.0) or 1.0)[0]
            r = {"file": name, "dataset": d["name"], "dataset_confidence": round(float(a["router"][i, k]), 6),
                 "routed": dataset is None,
                 "dataset_probabilities": {n: round(float(a["router"][i, j]), 6) for j, n in enumerate(self.names)}}
            r.update(self._answer(p, info, d, top_k))
            if a["ood_score"] is not None:
                r["in_distribution"] = bool(a["in_distribution"][i])
                r["ood_score"] = round(float(a["ood_score"][i]), 6)
            out.append(r)
        return out

    def _answer(self, p: torch.Tensor, info: TaskInfo, d: dict, top_k: int | None) -> dict:
        order = torch.argsort(p, descending=True).tolist()[:top_k or None]
        dist = {info.class_names[j]: round(float(p[j]), 6) for j in order}
        if info.task == MULTI_LABEL:
            t = self.threshold if self.threshold is not None else d.get("threshold", 0.5)
            ts = [float(v) for v in t] if isinstance(t, (list, tuple)) else [float(t)] * len(p)
            yes = [info.class_names[j] for j in order if float(p[j]) > ts[j]]
            return {"label": ", ".join(yes) if yes else "(none)", "index": None, "labels": yes,
                    "confidence": round(float(p.max()), 6), "probabilities": dist}
        j = int(torch.argmax(p))
        return {"label": info.class_names[j], "index": j, "confidence": round(float(p[j]), 6), "probabilities": dist}


def format_routed(r: dict) -> str:
    """A readable block for one routed prediction."""
    how = "routed to" if r["routed"] else "forced head"
    lines = [f"{r['file']}: {r['dataset']} ({how}; router confidence {r['dataset_confidence']:.2%}) -> "
             f"{r['label']}  (confidence {r['confidence']:.2%})"]
    if r.get("in_distribution") is False:
        lines.append(f"  WARNING: out of distribution (OOD score {r['ood_score']:.4g}): this image looks like none of "
                     f"the training datasets; do not trust the label")
    w = max(len(c) for c in r["probabilities"])
    for c, p in r["probabilities"].items():
        lines.append(f"  {c:<{w}}  {p:7.2%}  {'#' * int(round(p * 30))}")
    return "\n".join(lines)
