"""Tuned recipes per dataset: the settings ``medmix tune`` found on the validation split, measured by
``benchmarks/kit.py`` (``results/kit.md``), for ``medmix train`` (``--recipe auto``, its default, and ``--recipe
tuned``) and ``medmix quickstart``.

Every recipe here was chosen on the validation split only; its figures (mean +- std of 3 seeds, test read once
per run) are recorded beside it, with the tuning budget. A recipe becomes the dataset's default (``--recipe auto``)
only where it carried a win on val: its 3-seed mean val ACC beats the package defaults' by more than the standard
error of the defaults' mean (``Tuned.is_default``, computed from the per-seed val figures recorded here); the test
figures play no part in that. A dataset without an entry has no tuned recipe (``--recipe tuned`` then says so;
``auto`` uses the package defaults, as for class folders).
Torch-free.
"""
from __future__ import annotations

import statistics
from typing import Any, NamedTuple

from .errors import ConfigError


class Tuned(NamedTuple):
    settings: dict[str, Any]  # TrainConfig fields
    provenance: str  # how it was found and what it measured
    val_acc: tuple[float, ...]  # best-epoch val ACC of each seed's run of this recipe (results/kit.json)
    defaults_val_acc: tuple[float, ...]  # the same for the package defaults, one run per seed

    @property
    def val_gain(self) -> float:
        """Mean val ACC of this recipe minus that of the package defaults."""
        return statistics.fmean(self.val_acc) - statistics.fmean(self.defaults_val_acc)

    @property
    def is_default(self) -> bool:
        """The dataset's default under ``--recipe auto``: the val gain exceeds the standard error of the defaults'
        mean (sample standard deviation over the square root of the seeds)."""
        d = self.defaults_val_acc
        return self.val_gain > statistics.stdev(d) / len(d) ** 0.5


RECIPE_NAMES = ("auto", "default", "tuned")

TUNED: dict[str, Tuned] = {
    "breastmnist": Tuned(
        {"model": "cnn_transformer", "epochs": 30, "patience": 10, "optimizer": "adam", "lr": 0.001846316577722323,
         "weight_decay": 1e-4, "batch_size": 128, "augment": "none", "label_smoothing": 0.1, "drop_rate": 0.0},
        "medmix tune breastmnist --budget 12m (6 complete trials, best val ACC 0.897); 3 seeds: val ACC 0.897 +- "
        "0.013 against the package defaults' 0.833 +- 0.026; test ACC 0.874 +- 0.004, AUC 0.892 +- 0.010 (defaults "
        "0.829 / 0.868); 9 s per run on 2 idle AVX-512 BF16 cores, 46 s beside other jobs (results/kit.md)",
        (0.8974358974358975, 0.9102564102564102, 0.8846153846153846),
        (0.8589743589743589, 0.8333333333333334, 0.8076923076923077)),
    "retinamnist": Tuned(
        {"model": "hybrid_mixer_small", "model_kwargs": {"embed_dim": 96, "depth": 2}, "epochs": 30, "patience": 10,
         "optimizer": "adamw", "lr": 0.0034943658059573626, "weight_decay": 1e-3, "batch_size": 128, "augment": "none",
         "label_smoothing": 0.1, "drop_rate": 0.0, "mixup": 0.2, "cutmix": 1.0, "ema": 0.998},
        "medmix tune retinamnist --budget 12m (15 trials); 3 seeds: val ACC 0.617 +- 0.000 against the package "
        "defaults' 0.597 +- 0.048 (a gain below the defaults' standard error, 0.028: not the default); test ACC "
        "0.529 +- 0.019, AUC 0.729 +- 0.021 (defaults 0.528 / 0.737); 10 s per run on the idle CPU (results/kit.md)",
        (0.6166666666666667, 0.6166666666666667, 0.6166666666666667), (0.5416666666666666, 0.625, 0.625)),
    "pneumoniamnist": Tuned(
        {"model": "cnn_transformer", "epochs": 30, "patience": 10, "optimizer": "sgd", "lr": 0.07710253564584056,
         "weight_decay": 1e-4, "batch_size": 64, "augment": "radiology_strong", "label_smoothing": 0.0,
         "drop_rate": 0.0, "mixup": 0.2, "cutmix": 1.0, "ema": 0.99},
        "medmix tune pneumoniamnist --budget 12m (2 complete trials on a shared CPU, best val AUC 0.997); 3 seeds: "
        "val ACC 0.933 +- 0.007 against the package defaults' 0.947 +- 0.019 (a loss: not the default; val AUC "
        "0.996 against 0.995); test ACC 0.925 +- 0.002, AUC 0.970 +- 0.002 (defaults 0.920 / 0.974); 83-88 s per "
        "run on 2 AVX-512 BF16 cores (results/kit.md)",
        (0.933206106870229, 0.9255725190839694, 0.9389312977099237),
        (0.9255725190839694, 0.9637404580152672, 0.950381679389313)),
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
