"""medmix: train, evaluate, explain and serve medical image classifiers on CPUs.

>>> import medmix
>>> result = medmix.train(dataset="breastmnist", epochs=5)          # a run directory with best_model.pth
>>> medmix.evaluate(result.run_dir, split="test")["acc"]
>>> medmix.Predictor(result.run_dir).predict(["image.png"])[0]["label"]

One model for several datasets (a head per dataset and a modality router, :mod:`medmix.generalist`):

>>> g = medmix.train_generalist(datasets=("pneumoniamnist", "breastmnist"), epochs=5)
>>> medmix.load_predictor(g.run_dir).predict(["image.png"])[0]     # {'dataset': ..., 'label': ..., ...}
"""
from ._version import __version__
from .errors import MedmixError


def __getattr__(name: str):  # lazy: `import medmix` stays cheap for the CLI's --help
    if name in ("train", "TrainConfig", "TrainResult"):
        from . import engine

        return getattr(engine, name)
    if name == "evaluate":
        from .evaluation import evaluate

        return evaluate
    if name in ("Predictor", "load_predictor"):
        from . import predict

        return getattr(predict, name)
    if name in ("train_generalist", "GeneralistConfig", "GeneralistPredictor", "evaluate_generalist"):
        from . import generalist

        return getattr(generalist, name)
    raise AttributeError(f"module 'medmix' has no attribute {name!r}")


__all__ = ["__version__", "MedmixError", "train", "TrainConfig", "TrainResult", "evaluate", "Predictor",
           "load_predictor", "train_generalist", "GeneralistConfig", "GeneralistPredictor", "evaluate_generalist"]
