"""Data-parallel training: ``torchrun --nproc_per_node=2 -m medmix train`` (gloo, two CPU processes on 127.0.0.1)
gives the same model as one process with the same global batch and seed, and only process 0 writes.

Why the two agree: both processes draw the same per-epoch permutation and augmentation from the shared seed and
each trains on its half of every global batch; BatchNorm statistics are synchronised across processes
(:class:`medmix.distributed.CPUSyncBatchNorm`, since ``nn.SyncBatchNorm`` does not run on CPUs); the per-process
losses are weighted so that DDP's gradient average is the gradient of the global batch mean. The remaining
differences are float rounding (sums in another order), measured at ~3e-5 relative at most per tensor after 3
epochs. One exception: the token-mixing output biases of the hybrid mixer (``mlp_tokens.fc2.bias``) have an exactly
zero gradient (the next LayerNorm removes a per-token constant), so Adam moves them by rounding noise alone and they
differ; the test checks that the model's outputs do not depend on them instead of comparing them."""
from __future__ import annotations

import json
import socket
import subprocess
import sys

import pytest
import torch
from conftest import write_packed_npz

from medmix.checkpoint import load_checkpoint, load_model
from medmix.cli import main
from medmix.data import BatchTransform, get_policy
from medmix.distributed import shard
from medmix.engine import train

ARGS = {"model": "hybrid_mixer_small", "epochs": 3, "batch_size": 16, "lr": 3e-3, "seed": 1, "precision": "fp32"}
TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one(tmp_path):
    data = tmp_path / "tiny.npz"
    write_packed_npz(data)  # 42 train images: 2 global batches of 16 per epoch, 8 images per process
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", "-m", "medmix", "train", "--dataset", str(data), "--out", str(out),
           "--json", *[x for k, v in ARGS.items() for x in (f"--{k.replace('_', '-')}", str(v))]]
    p = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=900, check=False)
    assert p.returncode == 0, p.stderr[-3000:]
    summary = json.loads(p.stdout)  # process 0's report only (process 1 prints nothing)
    assert summary["run_dir"] == str(out) and "Traceback" not in p.stderr

    ref = train(dataset=str(data), out=str(tmp_path / "single"), quiet=True, **ARGS)

    # only process 0 wrote: one complete run directory, one log line per epoch
    assert not (tmp_path / "ddp.partial").exists()
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2, 3]
    _, _, ts = load_checkpoint(out / "last.pth")
    assert ts["world_size"] == 2 and ts["epoch"] == 3
    for mine, theirs in zip(log, ref.history):  # losses reduced over both processes
        assert mine["train_loss"] == pytest.approx(theirs["train_loss"], rel=1e-5)
        assert mine["val_loss"] == pytest.approx(theirs["val_loss"], rel=1e-5)

    a, _, _ = load_checkpoint(out / "last.pth")
    b, _, _ = load_checkpoint(ref.run_dir / "last.pth")
    assert a.keys() == b.keys()
    gradient_free = [k for k in a if k.endswith("mlp_tokens.fc2.bias")]
    for k in a:
        if k in gradient_free or not a[k].is_floating_point():
            continue
        rel = float((a[k] - b[k]).norm() / b[k].norm().clamp_min(1e-12))
        assert rel < 1e-4, (k, rel)
    assert all(torch.equal(a[k], b[k]) for k in a if not a[k].is_floating_point())  # BatchNorm batch counts

    # same function: logits of both final models on the test images, with the gradient-free biases zeroed in both
    model_a, meta = load_model(out / "last.pth")
    model_b, _ = load_model(ref.run_dir / "last.pth")
    x = BatchTransform(meta["img_size"], meta["mean"], meta["std"])(ref_images(data))
    with torch.no_grad():
        ya, yb = model_a(x), model_b(x)
        for k in gradient_free:
            model_a.get_parameter(k).zero_()
        assert torch.allclose(model_a(x), ya, atol=1e-5)  # they are indeed irrelevant to the output
    assert torch.allclose(ya, yb, rtol=1e-4, atol=1e-4)


def ref_images(data) -> torch.Tensor:
    import numpy as np

    with np.load(data) as z:
        return torch.from_numpy(z["images"][:16, None].copy())


def test_shards_cover_every_row_once():
    for n in (1, 2, 5, 16, 17):
        for world in range(1, min(n, 5) + 1):
            rows = [shard(n, r, world) for r in range(world)]
            assert [i for s in rows for i in range(n)[s]] == list(range(n))
            sizes = [s.stop - s.start for s in rows]
            assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 1


def test_sharded_augmentation_is_the_global_batch_augmentation():
    """Each process draws the augmentation of the whole global batch and keeps its rows: the union of the shards
    is bit-identical to the single-process batch."""
    x = torch.randint(0, 256, (10, 1, 20, 20), dtype=torch.uint8)
    tf = BatchTransform(24, [0.5], [0.2], get_policy("rotation_free"))
    whole = tf(x, train=True, generator=torch.Generator().manual_seed(5))
    parts = [tf(x, train=True, generator=torch.Generator().manual_seed(5), rows=shard(10, r, 3)) for r in range(3)]
    assert torch.equal(torch.cat(parts), whole)


def test_ddp_without_torchrun_is_one_line(tmp_path, monkeypatch, capsys):
    for k in TORCHRUN_ENV:
        monkeypatch.delenv(k, raising=False)
    rc = main(["train", "--dataset", "breastmnist", "--ddp", "--epochs", "1", "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "torchrun" in err
    assert not (tmp_path / "r").exists() and not (tmp_path / "r.partial").exists()


def test_a_generalist_on_two_processes_matches_one(tmp_path):
    """torchrun with a mixture of datasets: each process trains on its slice of every mixed global batch (every
    augmentation drawn everywhere, the loss summed per image), so two processes give the one-process run up to
    float rounding, and only process 0 writes."""
    from conftest import write_official_npz

    from medmix.generalist import train_generalist

    write_official_npz(tmp_path / "pneumoniamnist.npz", 2, sizes=(48, 20, 20))
    write_packed_npz(tmp_path / "tiny.npz")
    common = {"epochs": 2, "steps_per_epoch": 3, "batch_size": 16, "lr": 3e-3, "seed": 1, "precision": "fp32"}
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", "-m", "medmix", "train", "--dataset",
           f"pneumoniamnist,{tmp_path / 'tiny.npz'}", "--data-dir", str(tmp_path), "--out", str(out), "--json",
           *[x for k, v in common.items() for x in (f"--{k.replace('_', '-')}", str(v))]]
    p = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=900, check=False)
    assert p.returncode == 0, p.stderr[-3000:]
    assert json.loads(p.stdout)["run_dir"] == str(out)  # process 0's report only
    ref = train_generalist(datasets=("pneumoniamnist", str(tmp_path / "tiny.npz")), data_dir=str(tmp_path),
                           out=str(tmp_path / "single"), quiet=True, **common)
    assert not (tmp_path / "ddp.partial").exists()
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2]
    _, _, ts = load_checkpoint(out / "last.pth")
    assert ts["world_size"] == 2
    for mine, theirs in zip(log, ref.history):
        for k in ("train_loss", "train_modality_loss", "val_loss"):
            assert mine[k] == pytest.approx(theirs[k], rel=1e-4), k
    a, b = load_checkpoint(out / "best_model.pth")[0], load_checkpoint(ref.run_dir / "best_model.pth")[0]
    worst = max(float((a[k].float() - b[k].float()).abs().max() / (b[k].float().abs().max() + 1e-6))
                for k in b if b[k].is_floating_point() and "mlp_tokens.fc2.bias" not in k)
    assert worst < 1e-3, worst
