"""``--corrupt P``: training augmentation with the MedMNIST-C corruptions of the dataset (medmix.corruptions). Off
(0) it changes nothing, on it changes the trained weights, reproducibly and resumably; the batch function corrupts
about the requested share of images, deterministically and the same way shard by shard; bad values are refused."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from medmix.checkpoint import load_checkpoint
from medmix.cli import main
from medmix.corruptions import GENERIC_GRAY, corruptions_for, random_corruptions
from medmix.data import load_dataset
from medmix.data.medmnist import ASSETS
from medmix.engine import corrupt_batch, train

RECIPE = dict(dataset="breastmnist", data_dir=str(ASSETS), model="hybrid_mixer_small", epochs=1, batch_size=32,
              precision="fp32", seed=0, quiet=True, ood=False, calibrate=False)


def weights(run_dir) -> dict[str, torch.Tensor]:
    return load_checkpoint(run_dir / "last.pth")[0]


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One-epoch runs on the embedded BreastMNIST: without the option, with 0, with 1, and twice with 0.5."""
    root = tmp_path_factory.mktemp("corrupt")
    out = {}
    for name, extra in (("absent", {}), ("off", {"corrupt": 0.0}), ("all", {"corrupt": 1.0}),
                        ("half", {"corrupt": 0.5}), ("half_again", {"corrupt": 0.5})):
        out[name] = train(**RECIPE, out=str(root / name), **extra).run_dir
    return out


def test_off_is_the_old_behaviour_and_on_changes_the_weights(runs):
    assert same(weights(runs["off"]), weights(runs["absent"]))  # 0 draws nothing: bit-identical to before
    assert not same(weights(runs["all"]), weights(runs["off"]))
    assert not same(weights(runs["half"]), weights(runs["off"]))
    assert json.loads((runs["absent"] / "config.json").read_text())["corrupt"] == 0.0
    assert json.loads((runs["all"] / "config.json").read_text())["corrupt"] == 1.0
    meta = load_checkpoint(runs["all"] / "best_model.pth")[1]
    assert meta["corrupt_augment"]["corruption_set"] == "breastmnist"
    assert meta["corrupt_augment"]["corruptions"] == list(corruptions_for("breastmnist"))
    assert "corrupt_augment" not in load_checkpoint(runs["off"] / "best_model.pth")[1]


def test_same_seed_same_weights(runs):
    assert same(weights(runs["half"]), weights(runs["half_again"]))
    history = [json.loads(line) for line in (runs["half"] / "log.jsonl").read_text().splitlines()]
    again = [json.loads(line) for line in (runs["half_again"] / "log.jsonl").read_text().splitlines()]
    assert [r["train_loss"] for r in history] == [r["train_loss"] for r in again]


def test_a_run_killed_after_an_epoch_resumes_bit_identically(tmp_path):
    """The corruption draws come from the per-epoch generator: a run stopped after epoch 1 and resumed ends with
    the weights of an uninterrupted two-epoch run."""
    recipe = {**RECIPE, "epochs": 2, "corrupt": 0.5}
    whole = train(**recipe, out=str(tmp_path / "whole")).run_dir

    class Killed(Exception):
        pass

    def kill_after_epoch_1(line: str) -> None:
        if line.startswith("epoch   1"):
            raise Killed

    with pytest.raises(Killed):
        train(**recipe, out=str(tmp_path / "cut"), log=kill_after_epoch_1)
    assert (tmp_path / "cut.partial" / "last.pth").is_file() and not (tmp_path / "cut").exists()
    resumed = train(**recipe, out=str(tmp_path / "cut"), resume=True)
    assert [r["epoch"] for r in resumed.history] == [1, 2]
    assert same(weights(resumed.run_dir), weights(whole))


# ----------------------------------------------------------------------------------------------- the batch function
@pytest.fixture(scope="module")
def images() -> np.ndarray:
    """200 real 28 px BreastMNIST training images (N, H, W)."""
    x = load_dataset("breastmnist", data_dir=ASSETS).splits["train"].images[:200, 0].numpy()
    assert x.shape == (200, 28, 28)
    return x


def changed(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a != b).reshape(len(a), -1).any(1)


def test_the_share_of_corrupted_images(images):
    before = images.copy()
    table = corruptions_for("breastmnist")
    none = random_corruptions(images, table, 0.0, seed=3)
    assert np.array_equal(none, images)
    half = changed(random_corruptions(images, table, 0.5, seed=3), images).mean()
    assert 0.3 <= half <= 0.7, half
    # every BreastMNIST corruption changes a real 28 px image at every severity (measured: 200 of 200)
    assert changed(random_corruptions(images, table, 1.0, seed=3), images).all()
    # the generic grayscale list holds a Gaussian blur that is sub-pixel at 28 px at every severity (sigma 0.1-0.25
    # px, medmix.corruptions): 1 of its 8 corruptions leaves the image as it is, so about 7 in 8 images change
    # (measured over seeds 0-4: 81-90 %); 75 % is 5 standard deviations below 7/8 for 200 images
    generic = changed(random_corruptions(images, GENERIC_GRAY, 1.0, seed=3), images).mean()
    assert 0.75 <= generic < 1.0, generic
    assert np.array_equal(images, before)  # the input is left as it was


def test_the_batch_function_is_deterministic_and_shards_agree(images):
    table = corruptions_for("breastmnist")
    a = random_corruptions(images[:60], table, 0.5, seed=11)
    assert np.array_equal(a, random_corruptions(images[:60], table, 0.5, seed=11))
    assert not np.array_equal(a, random_corruptions(images[:60], table, 0.5, seed=12))
    # a data-parallel process corrupts only its rows of the global batch, with the pixels one process would give
    parts = [random_corruptions(images[:60], table, 0.5, seed=11, rows=slice(lo, hi))
             for lo, hi in ((0, 21), (21, 41), (41, 60))]
    assert np.array_equal(np.concatenate([p[lo:hi] for p, (lo, hi) in zip(parts, ((0, 21), (21, 41), (41, 60)))]), a)
    assert np.array_equal(parts[0][21:], images[21:60])  # the other rows are left alone


def test_torch_batches_grayscale_and_colour(images):
    gray = torch.from_numpy(images[:40, None].copy())
    out = corrupt_batch(gray, corruptions_for("breastmnist"), 1.0, seed=5)
    assert out.shape == gray.shape and out.dtype == torch.uint8
    assert np.array_equal(out[:, 0].numpy(), random_corruptions(images[:40], corruptions_for("breastmnist"), 1.0, 5))
    rgb = torch.from_numpy(np.stack([images[:8]] * 3, 1).copy())
    table = corruptions_for("dermamnist", 3)
    out = corrupt_batch(rgb, table, 1.0, seed=5)
    assert out.shape == rgb.shape
    expect = random_corruptions(np.ascontiguousarray(rgb.numpy().transpose(0, 2, 3, 1)), table, 1.0, 5)
    assert np.array_equal(out.numpy().transpose(0, 2, 3, 1), expect)


def test_bad_probabilities_in_the_library():
    x = np.zeros((2, 28, 28), np.uint8)
    for p in (-0.1, 1.5, float("nan")):
        with pytest.raises(Exception, match=r"\[0, 1\]"):
            random_corruptions(x, GENERIC_GRAY, p, seed=0)


# ----------------------------------------------------------------------------------------------- the command line
from test_bad_inputs import refused  # noqa: E402  (one definition of the one-line refusal check)


@pytest.mark.parametrize("value", ["1.5", "-0.2", "nan"])
def test_cli_refuses_a_probability_outside_0_1(value, capsys, tmp_path):
    line = refused(["train", "--dataset", "breastmnist", "--data-dir", str(ASSETS), "--corrupt", value,
                    "--out", str(tmp_path / "r")], capsys, "--corrupt")
    assert "[0, 1]" in line
    assert not (tmp_path / "r").exists() and not (tmp_path / "r.partial").exists()


def test_cli_refuses_it_for_several_datasets(capsys):
    refused(["train", "--dataset", "breastmnist,pneumoniamnist", "--corrupt", "0.5"], capsys, "--corrupt")


def test_cli_help_names_it(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--corrupt" in text and "MedMNIST-C corruptions" in text and "(default: 0.0)" in text
