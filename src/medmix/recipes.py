"""Tuned recipes per dataset: the settings ``medmix tune`` found on the validation split, measured by
``benchmarks/kit.py`` (``results/kit.md``), for ``medmix train`` (``--recipe auto``, its default, and ``--recipe
tuned``) and ``medmix quickstart``.

Every recipe here was chosen on the validation split only; its figures (mean +- std of 3 seeds, test read once
per run) are recorded beside it, with the tuning budget. A recipe becomes the dataset's default (``--recipe auto``)
only where it carried a win on val: its 3-seed mean val ACC beats the package defaults' by more than the standard
error of the defaults' mean (``is_default``); the test figures play no part in that. A dataset without an entry has
no tuned recipe (``--recipe tuned`` then says so; ``auto`` uses the package defaults, as for class folders).
Torch-free.
"""
from __future__ import annotations

from typing import Any, NamedTuple

from .errors import ConfigError


class Tuned(NamedTuple):
    settings: dict[str, Any]  # TrainConfig fields
    provenance: str  # how it was found and what it measured
    is_default: bool  # the dataset's default under --recipe auto (a win on val over the package defaults)


RECIPE_NAMES = ("auto", "default", "tuned")

TUNED: dict[str, Tuned] = {
    "breastmnist": Tuned(
        {"model": "cnn_transformer", "epochs": 30, "patience": 10, "optimizer": "adam", "lr": 0.001846316577722323,
         "weight_decay": 1e-4, "batch_size": 128, "augment": "none", "label_smoothing": 0.1, "drop_rate": 0.0},
        "medmix tune breastmnist --budget 12m (6 complete trials, best val ACC 0.897); 3 seeds: val ACC 0.897 +- "
        "0.013 against the package defaults' 0.833 +- 0.026; test ACC 0.874 +- 0.004, AUC 0.892 +- 0.010 (defaults "
        "0.829 / 0.868); 46 s per run on 2 AVX-512 BF16 cores (results/kit.md)", True),
    "retinamnist": Tuned(
        {"model": "hybrid_mixer_small", "model_kwargs": {"embed_dim": 96, "depth": 2}, "epochs": 30, "patience": 10,
         "optimizer": "adamw", "lr": 0.0034943658059573626, "weight_decay": 1e-3, "batch_size": 128, "augment": "none",
         "label_smoothing": 0.1, "drop_rate": 0.0, "mixup": 0.2, "cutmix": 1.0, "ema": 0.998},
        "medmix tune retinamnist --budget 12m (15 trials); 3 seeds: val ACC 0.617 +- 0.000 against the package "
        "defaults' 0.597 +- 0.048 (a gain below the defaults' standard error, 0.028: not the default); test ACC "
        "0.529 +- 0.019, AUC 0.729 +- 0.021 (defaults 0.528 / 0.737); 93-127 s per run (results/kit.md)", False),
}


def recipe(name: str, dataset: str | None) -> dict[str, Any]:
    """The TrainConfig settings of recipe ``name`` for ``dataset``: "default" none (the config's own), "tuned" the
    dataset's tuned recipe (an error without one), "auto" the tuned recipe where it is the dataset's default."""
    if name not in RECIPE_NAMES:
        raise ConfigError(f"unknown recipe {name!r}; use one of {', '.join(RECIPE_NAMES)}")
    if name == "default" or (name == "auto" and not (dataset in TUNED and TUNED[dataset].is_default)):
        return {}
    if dataset not in TUNED:
        raise ConfigError(f"no tuned recipe for {dataset!r} yet (tuned: {', '.join(TUNED)}); run `medmix tune "
                          f"{dataset}` and train its best.json with --config")
    return {k: (dict(v) if isinstance(v, dict) else v) for k, v in TUNED[dataset].settings.items()}


def describe(settings: dict[str, Any]) -> str:
    """One line naming a recipe's model and main settings, for the note ``medmix train`` prints."""
    keys = ("model", "optimizer", "lr", "batch_size", "epochs", "label_smoothing", "mixup", "cutmix", "ema")
    return ", ".join(f"{k} {settings[k]:.4g}" if isinstance(settings[k], float) else f"{k} {settings[k]}"
                     for k in keys if k in settings)
