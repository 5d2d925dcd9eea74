"""medmix: train, evaluate, explain and serve medical image classifiers on CPUs.

>>> import medmix
>>> result = medmix.train(dataset="breastmnist", epochs=5)          # a run directory with best_model.pth
>>> medmix.evaluate(result.run_dir, split="test")["acc"]
>>> medmix.Predictor(result.run_dir).predict(["image.png"])[0]["label"]

One model for several datasets (a head per dataset and a modality router, :mod:`medmix.generalist`):

>>> g = medmix.train_generalist(datasets=("pneumoniamnist", "breastmnist"), epochs=5)
>>> medmix.load_predictor(g.run_dir).predict(["image.png"])[0]     # {'dataset': ..., 'label': ..., ...}
"""
from importlib import import_module

from ._version import __version__
from .errors import MedmixError


# public name -> the module defining it, imported on first use (`import medmix` stays cheap for the CLI's --help)
_LAZY = {"train": "engine", "TrainConfig": "engine", "TrainResult": "engine", "evaluate": "evaluation",
         "Predictor": "predict", "load_predictor": "predict", "train_generalist": "generalist",
         "GeneralistConfig": "generalist", "GeneralistPredictor": "generalist", "evaluate_generalist": "evaluation"}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'medmix' has no attribute {name!r}")
    return getattr(import_module(f".{_LAZY[name]}", __name__), name)


__all__ = ["__version__", "MedmixError", *_LAZY]
