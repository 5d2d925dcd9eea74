"""End to end through the same engine, checkpoint and predictor: every model family, every task kind."""
from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import write_official_npz

from medmix.cli import main
from medmix.engine import train
from medmix.evaluation import evaluate
from medmix.metrics import medmnist_acc, medmnist_auc
from medmix.predict import Predictor

FAMILIES = ["hybrid_mixer_small", "cnn_transformer", "resnet18_28", "medvit_small"]


@pytest.mark.parametrize("model", FAMILIES)
def test_every_family_trains_evaluates_and_predicts(tmp_path, model):
    path = tmp_path / "data" / "bloodmnist.npz"
    arrays = write_official_npz(path, 8, sizes=(32, 16, 16), channels=3)
    r = train(dataset=str(path), model=model, epochs=1, batch_size=16, lr=1e-3, precision="fp32", quiet=True,
              out=str(tmp_path / "run"))
    assert (r.run_dir / "best_model.pth").is_file()
    m = evaluate(r.run_dir, split="test")
    assert m["n"] == 16 and 0.0 <= m["acc"] <= 1.0
    np.save(tmp_path / "x.npy", arrays["test_images"][0])
    out = Predictor(r.run_dir).predict([tmp_path / "x.npy"])[0]
    assert out["label"] in out["probabilities"]
    assert sum(out["probabilities"].values()) == pytest.approx(1.0, abs=1e-4)


def test_multilabel_end_to_end_with_thresholds_tuned_on_val(tmp_path, capsys):
    path = tmp_path / "data" / "chestmnist.npz"
    arrays = write_official_npz(path, 14, sizes=(64, 32, 32), multi_label=True)
    r = train(dataset=str(path), epochs=2, batch_size=16, lr=3e-3, precision="fp32", quiet=True,
              tune_threshold=True, out=str(tmp_path / "run"))
    from medmix.checkpoint import load_checkpoint

    _, meta, _ = load_checkpoint(r.run_dir / "best_model.pth")
    assert isinstance(meta["threshold"], list) and len(meta["threshold"]) == 14
    assert all(0 < t < 1 for t in meta["threshold"])
    # evaluation uses the stored thresholds: recompute ACC from predicted probabilities with them
    pred = Predictor(r.run_dir)
    import torch

    probs = pred.probabilities(torch.from_numpy(arrays["test_images"][:, None])).numpy()
    m = evaluate(r.run_dir, split="test")
    assert m["acc"] == pytest.approx(medmnist_acc(arrays["test_labels"], probs, m["task"], np.array(meta["threshold"])))
    assert m["auc"] == pytest.approx(medmnist_auc(arrays["test_labels"], probs, m["task"]))
    # predict lists every label with its probability and a yes/no
    from PIL import Image

    Image.fromarray(arrays["test_images"][0]).save(tmp_path / "x.png")
    assert main(["predict", str(r.run_dir), str(tmp_path / "x.png"), "--json", "--threshold", "0.5"]) == 0
    (res,) = json.loads(capsys.readouterr().out)
    assert set(res["probabilities"]) == set(res["present"]) and len(res["present"]) == 14
    assert res["labels"] == [c for c, p in res["probabilities"].items() if p > 0.5]


def test_binary_scores_have_two_columns_last_is_positive(trained_run):
    pred = Predictor(trained_run.run_dir)
    from medmix.data import load_dataset

    test = load_dataset("breastmnist").splits["test"]
    probs = pred.probabilities(test.images).numpy()
    assert probs.shape == (len(test), 2)
    m = evaluate(trained_run.run_dir, split="test")
    assert m["auc"] == pytest.approx(medmnist_auc(test.labels.numpy(), probs, "binary-class"))
    from sklearn.metrics import roc_auc_score

    assert m["auc"] == pytest.approx(roc_auc_score(test.labels.numpy(), probs[:, 1]))


def test_ordinal_loss_trains_and_reports_ordinal_metrics(tmp_path):
    path = tmp_path / "data" / "retinamnist.npz"
    arrays = write_official_npz(path, 5, sizes=(40, 20, 20), channels=3)
    r = train(dataset=str(path), epochs=1, batch_size=16, precision="fp32", quiet=True, loss="ordinal", alpha=0.3,
              out=str(tmp_path / "run"))
    assert {"mae", "qwk", "mae_expected", "qwk_expected"} <= set(r.test)
    np.save(tmp_path / "x.npy", arrays["test_images"][0])
    out = Predictor(r.run_dir, ordinal_mode="expected").predict([tmp_path / "x.npy"])[0]
    grade = sum(k * p for k, p in enumerate(out["probabilities"][str(k)] for k in range(5)))
    assert out["expected_grade"] == pytest.approx(grade, abs=1e-3)
    assert out["index"] == min(4, int(grade + 0.5))


def test_ordinal_loss_refused_for_non_ordinal_task(capsys):
    assert main(["train", "--dataset", "breastmnist", "--loss", "ordinal", "--epochs", "1", "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "ordinal" in err[0]
