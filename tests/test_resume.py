"""Resume: a ``medmix train`` process killed with SIGKILL (mid-epoch, or in the middle of writing ``last.pth``) and
resumed with ``--resume`` ends bit-identically to an uninterrupted run with the same seed; a finished run continues
with more epochs; a resumed run cannot silently change its settings; nothing half-written is ever left behind.

The kills are real ``SIGKILL``s of a real ``python -m medmix``-like process: a small launcher patches the engine so
the process kills itself at a chosen, deterministic point (a timer racing the training would make the test flaky on
a loaded machine)."""
from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys

import pytest
import torch
from conftest import write_packed_npz

from medmix.checkpoint import load_checkpoint
from medmix.cli import main
from medmix.engine import epoch_seed, train

TIMING = ("train_img_s", "epoch_seconds")
# 60 images -> 42 train / 9 val / 9 test; batch 16 -> 2 optimiser steps per epoch; augmentation on (packed data)
ARGS = {"model": "hybrid_mixer_small", "epochs": 4, "batch_size": 16, "lr": 3e-3, "seed": 3, "precision": "fp32"}

KILLER = r'''
import io, os, signal, sys
import torch
import medmix.engine as engine
import medmix.inference

torch.set_num_threads(1)  # the same arithmetic as the in-process reference
medmix.inference.set_threads = lambda: None
mode, kill_epoch = sys.argv[1], int(sys.argv[2])
if mode == "mid-epoch":  # SIGKILL before the second optimiser step of epoch `kill_epoch`
    original, epochs = engine.iterate_batches, [0]

    def iterate_batches(n, batch_size, generator=None, drop_last=False):
        if generator is None:  # evaluation
            yield from original(n, batch_size, generator, drop_last)
            return
        epochs[0] += 1
        for i, idx in enumerate(original(n, batch_size, generator, drop_last)):
            if epochs[0] == kill_epoch and i == 1:
                os.kill(os.getpid(), signal.SIGKILL)
            yield idx

    engine.iterate_batches = iterate_batches
else:  # "in-save": SIGKILL after half of last.pth of epoch `kill_epoch` reached its temporary file
    original_save = torch.save

    def save(obj, f, *args, **kwargs):
        ts = obj.get("train_state") if isinstance(obj, dict) else None
        if ts and ts.get("epoch") == kill_epoch:
            buf = io.BytesIO()
            original_save(obj, buf, *args, **kwargs)
            f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
            f.flush()
            os.fsync(f.fileno())
            os.kill(os.getpid(), signal.SIGKILL)
        return original_save(obj, f, *args, **kwargs)

    torch.save = save
from medmix.cli import main
sys.exit(main(sys.argv[3:]))
'''


def without_timing(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k not in TIMING} for row in history]


def argv(data, out, **over) -> list[str]:
    args = {**ARGS, **over}
    return ["train", "--dataset", str(data), "--out", str(out), "--quiet",
            *[x for k, v in args.items() for x in (f"--{k.replace('_', '-')}", str(v))]]


def weights(path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path)[0]


def assert_same_weights(a, b) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa), [k for k in wa if not torch.equal(wa[k], wb[k])][:5]


def assert_complete(run) -> None:
    assert run.is_dir() and not run.with_name(run.name + ".partial").exists()
    assert not [p.name for p in run.parent.iterdir() if p.name.startswith(run.name + ".")]
    assert not [p.name for p in run.iterdir() if ".tmp" in p.name]
    for name in ("best_model.pth", "last.pth", "log.jsonl", "log.csv", "metrics.json", "config.json", "curves.png"):
        assert (run / name).is_file(), name


@pytest.fixture(autouse=True)
def _keep_threads(monkeypatch):
    import medmix.inference

    monkeypatch.setattr(medmix.inference, "set_threads", lambda: None)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "tiny.npz"
    write_packed_npz(path)
    return path


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data):
    """The uninterrupted run (in this process, one thread, like the killed one). Module-scoped fixtures run before
    the per-test thread reset, and earlier tests may have changed the thread count: set it here."""
    out = tmp_path_factory.mktemp("ref") / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return train(dataset=str(data), out=str(out), quiet=True, **ARGS)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("mode,kill_epoch,saved_epoch", [("mid-epoch", 3, 2), ("in-save", 2, 1)])
def test_sigkilled_run_resumes_to_the_uninterrupted_result(data, reference, tmp_path, capsys, mode, kill_epoch,
                                                           saved_epoch):
    out = tmp_path / "run"
    script = tmp_path / "killer.py"
    script.write_text(KILLER)
    p = subprocess.run([sys.executable, str(script), mode, str(kill_epoch), *argv(data, out)], cwd=tmp_path,
                       capture_output=True, text=True, timeout=600, check=False)
    assert p.returncode == -signal.SIGKILL, p.stderr[-2000:]
    partial = tmp_path / "run.partial"
    assert not out.exists() and partial.is_dir()  # killed runs never look finished
    _, _, ts = load_checkpoint(partial / "last.pth")  # the last good checkpoint survived the kill
    assert ts["epoch"] == saved_epoch and len(ts["history"]) == saved_epoch
    if mode == "in-save":
        assert [p.name for p in partial.glob(".last.pth.tmp*")]  # the interrupted write, never renamed

    rc = main(["train", "--resume", str(partial), "--quiet"])  # the .partial directory or the run's own name
    assert rc == 0, capsys.readouterr().err
    assert_complete(out)
    resumed = json.loads((out / "metrics.json").read_text())
    expected = json.loads((reference.run_dir / "metrics.json").read_text())
    assert resumed["val"] == expected["val"] and resumed["test"] == expected["test"]  # bit-identical numbers
    assert resumed["best_epoch"] == expected["best_epoch"]
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2, 3, 4]  # rebuilt from the checkpoint: no duplicate or torn lines
    assert without_timing(log) == without_timing(json.loads(json.dumps(reference.history)))
    assert_same_weights(out / "last.pth", reference.run_dir / "last.pth")
    assert_same_weights(out / "best_model.pth", reference.run_dir / "best_model.pth")
    _, _, ts = load_checkpoint(out / "last.pth")
    assert ts["epoch"] == 4 and ts["world_size"] == 1


def test_finished_run_continues_with_more_epochs(data, reference, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(reference.run_dir, run)
    rc, err = main(["train", "--resume", str(run), "--quiet"]), capsys.readouterr().err
    assert rc == 2 and "already trained 4 epochs" in err and len(err.strip().splitlines()) == 1
    rc, err = main(["train", "--resume", str(run), "--epochs", "6", "--lr", "0.1"]), capsys.readouterr().err
    assert rc == 2 and "--lr 0.1 differs" in err and len(err.strip().splitlines()) == 1
    assert_same_weights(run / "last.pth", reference.run_dir / "last.pth")  # refused runs change nothing

    more = train(resume=str(run), epochs=6, quiet=True)
    assert more.run_dir == run and [r["epoch"] for r in more.history] == [1, 2, 3, 4, 5, 6]
    assert without_timing(more.history[:4]) == without_timing(reference.history)
    assert_complete(run)
    assert json.loads((run / "config.json").read_text())["epochs"] == 6
    assert load_checkpoint(run / "last.pth")[2]["epoch"] == 6
    assert len((run / "log.jsonl").read_text().splitlines()) == 6


def test_nothing_to_resume(data, tmp_path, capsys):
    """A run killed before its first epoch ended left no checkpoint: ``--resume RUN`` says so; ``--resume``
    without a directory (resume ``--out`` if possible) starts the run afresh."""
    (tmp_path / "run.partial").mkdir()
    (tmp_path / "run.partial" / "config.json").write_text("{}")
    rc, err = main(["train", "--resume", str(tmp_path / "run")]), capsys.readouterr().err
    assert rc == 2 and "nothing to resume" in err and len(err.strip().splitlines()) == 1
    rc, err = main([*argv(data, tmp_path / "run", epochs=1), "--resume"]), capsys.readouterr().err
    assert rc == 0, err
    assert_complete(tmp_path / "run")
    rc, err = main(["train", "--epochs", "1"]), capsys.readouterr().err  # neither --dataset nor --resume
    assert rc == 2 and "--dataset is required" in err


def test_cli_option_defaults_are_the_library_defaults():
    """``medmix train`` passes only the options given (so a resumed run keeps its own); that is only the same as
    passing all of them if every option's default is TrainConfig's."""
    from medmix.cli import TRAIN_FIELDS, _Default, build_parser
    from medmix.engine import TrainConfig

    sub = next(a for a in build_parser()._actions if a.dest == "command").choices["train"]
    defaults = {a.dest: a.default for a in sub._actions}
    for name in TRAIN_FIELDS:
        assert isinstance(defaults[name], _Default), name
        if name != "dataset":  # required unless --resume RUN_DIR
            assert defaults[name].value == getattr(TrainConfig(), name), name
    for flag in (d for d in defaults if d.startswith("no_")):  # --no-X switches TrainConfig.X (default on) off
        assert defaults[flag].value is False and getattr(TrainConfig(), flag[3:]) is True, flag


def test_epoch_seeds_are_distinct_and_stable():
    seeds = {epoch_seed(s, e, k) for s in (0, 1, -1) for e in range(1, 30) for k in range(3)}
    assert len(seeds) == 3 * 29 * 3 and all(0 <= s < 2 ** 63 for s in seeds)
    assert epoch_seed(0, 1) == epoch_seed(0, 1, 0)
