"""``medmix quickstart``: train the default model on the embedded BreastMNIST, evaluate, predict one image."""
from __future__ import annotations

import sys
from pathlib import Path

from PIL import Image

from .data import load_dataset
from .engine import TrainConfig, check_recipe, train
from .paths import check_writable_dir
from .predict import Predictor, format_prediction
from .recipes import recipe
from .report import OFFICIAL_BENCHMARK, format_metrics


def quickstart(out: str = "runs/quickstart", epochs: int | None = None, quiet: bool = False, seed: int = 0) -> dict:
    """Returns the test metrics; writes the run folder (checkpoint, log, curves, confusion matrix, a sample).

    The recipe is BreastMNIST's tuned one (:data:`medmix.recipes.TUNED`: the CNN + Transformer model with the
    settings ``medmix tune`` chose on the validation split); ``epochs`` overrides its 30."""
    check_writable_dir(out, "--out")
    settings = recipe("tuned", "breastmnist")
    if epochs is not None:
        settings["epochs"] = epochs
    cfg = TrainConfig(dataset="breastmnist", seed=seed, out=out, overwrite=True, quiet=quiet, **settings)
    check_recipe(cfg)  # a bad --epochs fails before anything is printed
    print(f"medmix quickstart: {cfg.model} (tuned recipe) on BreastMNIST (embedded, 28 px, CC BY 4.0)",
          file=sys.stderr)
    result = train(cfg)
    print(format_metrics(result.test, f"BreastMNIST test split ({result.test['n']} images), best epoch "
                                      f"{result.best_epoch}, {result.seconds:.0f} s of training:"))
    ref_acc, ref_auc = OFFICIAL_BENCHMARK["breastmnist"]["ResNet-18 (28)"]
    print(f"\n{'':<28} {'ACC':>6} {'AUC':>6}")
    print(f"{'medmix ' + cfg.model:<28} {result.test['acc']:6.3f} {result.test['auc']:6.3f}")
    print(f"{'official ResNet-18 (28)':<28} {ref_acc:6.3f} {ref_auc:6.3f}   (MedMNIST v2 paper)")

    # one test image, written as a PNG and read back through the same path a user's file takes
    test = load_dataset("breastmnist").splits["test"]
    sample = Path(result.run_dir) / "sample_test_image.png"
    Image.fromarray(test.images[0, 0].numpy()).save(sample)
    pred = Predictor(result.run_dir).predict([sample])[0]
    truth = ("malignant", "normal, benign")[int(test.labels[0])]
    print(f"\n{format_prediction(pred)}\n  (true label: {truth})")
    print(f"\nrun folder: {result.run_dir}  (best_model.pth, last.pth, log.jsonl, curves.png, confusion_test.png)")
    print(f"next: medmix predict {result.run_dir} YOUR_IMAGE.png")
    return result.test
