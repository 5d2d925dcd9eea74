"""Tuned recipes per dataset: the settings ``medmix tune`` found on the validation split, measured by
``benchmarks/kit.py`` (``results/kit.md``), for ``medmix train --recipe tuned`` and ``medmix quickstart``.

Every recipe here was chosen on the validation split only; its test figures (mean +- std of 3 seeds, test read
once per run) are recorded beside it, with the tuning budget. A dataset without an entry has no tuned recipe
(``--recipe tuned`` then says so). Torch-free.
"""
from __future__ import annotations

from typing import Any

from .errors import ConfigError

RECIPE_NAMES = ("default", "tuned")

# dataset -> (TrainConfig settings, provenance)
TUNED: dict[str, tuple[dict[str, Any], str]] = {
    "breastmnist": (
        {"model": "cnn_transformer", "epochs": 30, "patience": 10, "optimizer": "adam", "lr": 1.846e-3,
         "weight_decay": 1e-4, "batch_size": 128, "augment": "none", "label_smoothing": 0.1, "drop_rate": 0.0},
        "medmix tune breastmnist --budget 12m (6 complete trials, best val ACC 0.897); test ACC 0.874 +- 0.004, "
        "AUC 0.892 +- 0.010 over 3 seeds, 46 s per run on 2 AVX-512 BF16 cores (results/kit.md)"),
}


def recipe(name: str, dataset: str | None) -> dict[str, Any]:
    """The TrainConfig settings of recipe ``name`` for ``dataset`` ("default": none, the config's own)."""
    if name not in RECIPE_NAMES:
        raise ConfigError(f"unknown recipe {name!r}; use one of {', '.join(RECIPE_NAMES)}")
    if name == "default":
        return {}
    if dataset not in TUNED:
        raise ConfigError(f"no tuned recipe for {dataset!r} yet (tuned: {', '.join(TUNED)}); run `medmix tune "
                          f"{dataset}` and train its best.json with --config")
    return dict(TUNED[dataset][0])
