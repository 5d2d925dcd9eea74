"""Weight averaging (``--ema``): the average is what is validated, kept and tested; it never changes the trained
weights; a resumed run continues the average exactly; bad decays are refused with one line."""
from __future__ import annotations

import pytest
import torch

from medmix.checkpoint import load_checkpoint
from medmix.cli import main
from medmix.engine import train

# 60 images -> 42 train / 9 val / 9 test (too few val images to pick an epoch: the last one is kept, so the best
# checkpoint is the last epoch's); batch 16 -> 2 optimiser steps per epoch; nothing refitted at the end
ARGS = dict(model="hybrid_mixer_small", batch_size=16, lr=3e-3, seed=3, precision="fp32", quiet=True,
            bn_recalibrate=False, calibrate=False, ood=False)


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def one_thread(fn):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return fn()
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, packed_data):
    root = tmp_path_factory.mktemp("ema")
    return one_thread(lambda: (train(dataset=str(packed_data), out=str(root / "plain"), epochs=3, **ARGS),
                               train(dataset=str(packed_data), out=str(root / "ema"), epochs=3, ema=0.9, **ARGS)))


def test_the_average_is_kept_and_the_training_is_untouched(runs):
    plain, averaged = runs
    w_plain, _, ts_plain = load_checkpoint(plain.run_dir / "last.pth")
    w_trained, meta, ts = load_checkpoint(averaged.run_dir / "last.pth")
    assert same(w_plain, w_trained)  # swapping the average in for validation leaves training exactly as it was
    assert "ema" not in ts_plain and ts["ema_steps"] == 3 * 2
    best, best_meta, _ = load_checkpoint(averaged.run_dir / "best_model.pth")
    assert same(best, ts["ema"])  # the kept (and tested) model is the average
    assert not same(best, w_trained)
    assert best_meta["train_config"]["ema"] == 0.9 and meta["train_config"]["ema"] == 0.9
    assert averaged.test != plain.test or averaged.val != plain.val or not same(best, w_plain)


def test_a_tiny_decay_averages_nothing(tmp_path, packed_data):
    r = one_thread(lambda: train(dataset=str(packed_data), out=str(tmp_path / "r"), epochs=2, ema=1e-9, **ARGS))
    trained, _, ts = load_checkpoint(r.run_dir / "last.pth")
    for k, v in ts["ema"].items():
        if v.is_floating_point():
            torch.testing.assert_close(v, trained[k], rtol=1e-6, atol=1e-7)


def test_a_resumed_run_continues_the_average_exactly(tmp_path, packed_data):
    # no schedule: a finished 2-epoch run continued to 3 is then the same computation as a 3-epoch run
    full, out = tmp_path / "full", tmp_path / "resumed"
    one_thread(lambda: train(dataset=str(packed_data), out=str(full), epochs=3, ema=0.9, schedule="none", **ARGS))
    one_thread(lambda: train(dataset=str(packed_data), out=str(out), epochs=2, ema=0.9, schedule="none", **ARGS))
    one_thread(lambda: train(resume=str(out), epochs=3, quiet=True))
    for name in ("best_model.pth", "last.pth"):
        a, _, ts_a = load_checkpoint(out / name)
        b, _, ts_b = load_checkpoint(full / name)
        assert same(a, b), name
        if ts_a is not None:
            assert same(ts_a["ema"], ts_b["ema"]) and ts_a["ema_steps"] == ts_b["ema_steps"]


@pytest.mark.parametrize("value", ["0", "1", "1.5", "-0.1", "nan"])
def test_a_bad_decay_is_one_line(value, capsys, tmp_path):
    assert main(["train", "--dataset", "breastmnist", "--ema", value, "--out", str(tmp_path / "r")]) == 2
    assert not (tmp_path / "r").exists()
    err = capsys.readouterr().err
    assert err.startswith("medmix: error: --ema must be in (0, 1)") and err.count("\n") == 1


def test_the_command_line_option(tmp_path, packed_data):
    out = tmp_path / "cli"
    assert main(["train", "--dataset", str(packed_data), "--ema", "0.99", "--epochs", "1", "--batch-size", "16",
                 "--no-ood", "--no-calibrate", "--out", str(out), "--quiet"]) == 0
    import json

    assert json.loads((out / "config.json").read_text())["ema"] == 0.99
    assert load_checkpoint(out / "last.pth")[2]["ema_steps"] == 2


def test_a_generalist_averages_too(tmp_path):
    from test_generalist import _two_modalities

    from medmix.generalist import train_generalist

    root = _two_modalities(tmp_path / "data")
    r = one_thread(lambda: train_generalist(
        datasets=("pneumoniamnist", str(root / "stripes.npz")), data_dir=str(root), epochs=2, steps_per_epoch=3,
        batch_size=32, lr=3e-3, precision="fp32", seed=0, out=str(tmp_path / "gen"), quiet=True, ema=0.9,
        bn_recalibrate=False, calibrate=False, ood=False))
    _, _, ts = load_checkpoint(r.run_dir / "last.pth")
    assert ts["ema_steps"] == 6
    best = load_checkpoint(r.run_dir / "best_model.pth")[0]
    assert r.best_epoch != 2 or same(best, ts["ema"])
