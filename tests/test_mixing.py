"""Mixup / CutMix: the blend and the box are what the weight says, pairs are never an image with itself, the draws
do not depend on the data-parallel shard, runs with them train and resume exactly, and bad values are one line."""
from __future__ import annotations

import json

import pytest
import torch
from test_ema import ARGS, one_thread, same

from medmix.checkpoint import load_checkpoint
from medmix.cli import main
from medmix.data.mixing import BatchMix
from medmix.engine import train


def batch(n: int = 8, side: int = 12) -> torch.Tensor:
    return torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 1, side, side).clone() + 1.0


def test_mixup_is_the_weighted_blend_of_two_different_images():
    x = batch()
    out, partner, lam = BatchMix(mixup=0.4)(x, len(x), torch.Generator().manual_seed(0))
    assert 0.0 < lam < 1.0 and sorted(partner.tolist()) == list(range(len(x)))
    assert all(p != i for i, p in enumerate(partner.tolist()))
    torch.testing.assert_close(out, lam * x + (1 - lam) * x[partner])


def test_cutmix_keeps_the_area_its_weight_says():
    x = batch(side=28)
    for seed in range(10):
        out, partner, lam = BatchMix(cutmix=1.0)(x, len(x), torch.Generator().manual_seed(seed))
        kept = (out == x).float().mean(dim=(1, 2, 3))
        torch.testing.assert_close(kept, torch.full_like(kept, lam))
        assert torch.equal(out[out != x], x[partner].expand_as(x)[out != x])


def test_draws_are_the_same_whatever_the_shard():
    x, mix = batch(), BatchMix(mixup=0.2, cutmix=1.0, prob=0.5)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    for _ in range(6):
        mix(x, len(x), g1)
        mix(x[2:5], len(x), g2, rows=slice(2, 5))
        assert torch.equal(g1.get_state(), g2.get_state())


def test_prob_mixes_about_that_share_of_batches():
    x, g = batch(), torch.Generator().manual_seed(0)
    mixed = sum(BatchMix(mixup=0.2, prob=0.3)(x, len(x), g)[1] is not None for _ in range(400))
    assert 80 <= mixed <= 160


def test_a_mixed_run_trains_differs_and_resumes_exactly(tmp_path, packed_data):
    kw = dict(ARGS, schedule="none", mixup=0.4, cutmix=1.0)
    plain = one_thread(lambda: train(dataset=str(packed_data), out=str(tmp_path / "p"), epochs=2,
                                     **dict(ARGS, schedule="none")))
    full = one_thread(lambda: train(dataset=str(packed_data), out=str(tmp_path / "full"), epochs=3, **kw))
    one_thread(lambda: train(dataset=str(packed_data), out=str(tmp_path / "r"), epochs=2, **kw))
    one_thread(lambda: train(resume=str(tmp_path / "r"), epochs=3, quiet=True))
    assert same(load_checkpoint(full.run_dir / "last.pth")[0], load_checkpoint(tmp_path / "r" / "last.pth")[0])
    two = load_checkpoint(tmp_path / "p" / "last.pth")[0]
    assert not same(two, load_checkpoint(tmp_path / "r" / "best_model.pth")[0])
    assert [r["train_loss"] for r in plain.history] != [r["train_loss"] for r in full.history[:2]]


def test_the_command_line_options(tmp_path, packed_data, capsys):
    out = tmp_path / "cli"
    assert main(["train", "--dataset", str(packed_data), "--mixup", "0.2", "--cutmix", "1", "--mix-prob", "0.5",
                 "--epochs", "1", "--batch-size", "16", "--no-ood", "--out", str(out), "--quiet"]) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["mixup"], cfg["cutmix"], cfg["mix_prob"]) == (0.2, 1.0, 0.5)
    for bad, msg in ((["--mix-prob", "1.5"], "--mix-prob must be in [0, 1]"), (["--mixup", "-1"], "--mixup must"),
                     (["--cutmix", "inf"], "--cutmix must")):
        capsys.readouterr()
        assert main(["train", "--dataset", str(packed_data), "--out", str(tmp_path / "bad"), *bad]) == 2
        err = capsys.readouterr().err
        assert err.startswith("medmix: error: " + msg) and err.count("\n") == 1, err
    assert main(["train", "--dataset", f"{packed_data},pneumoniamnist", "--mixup", "0.2",
                 "--out", str(tmp_path / "gen")]) == 2
    assert "--mixup" in capsys.readouterr().err


@pytest.mark.parametrize("task_data", ["ordinal", "multi-label"])
def test_other_tasks_mix_their_own_loss(task_data, tmp_path):
    from conftest import write_official_npz

    if task_data == "ordinal":
        write_official_npz(tmp_path / "retinamnist.npz", 5, sizes=(40, 10, 10), channels=3)
        name, loss = "retinamnist", "ordinal"
    else:
        write_official_npz(tmp_path / "chestmnist.npz", 14, sizes=(40, 10, 10), multi_label=True)
        name, loss = "chestmnist", None
    r = one_thread(lambda: train(dataset=name, data_dir=str(tmp_path), out=str(tmp_path / "run"), epochs=1,
                                 mixup=0.3, loss=loss, **{k: v for k, v in ARGS.items() if k != "seed"}))
    assert r.history and all(torch.isfinite(torch.tensor(h["train_loss"])) for h in r.history)
