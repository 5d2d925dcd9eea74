"""Checkpoints: a round trip gives the same model, the metadata carries everything needed to use it, and
loading never executes code (``torch.load(weights_only=True)``)."""
from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch

import medmix
from medmix.checkpoint import FORMAT, load_checkpoint, load_model, resolve_checkpoint, save_checkpoint
from medmix.errors import CheckpointError
from medmix.models import create_model


def small_meta(**extra) -> dict:
    return {"model": "hybrid_mixer_small", "model_kwargs": {"num_classes": 3, "in_chans": 1, "img_size": 28},
            "task": {"task": "multi-class", "class_names": ["a", "b", "c"], "n_channels": 1}, "img_size": 28,
            "data_size": 28, "mean": [0.5], "std": [0.25], **extra}


def test_round_trip_gives_the_same_outputs(tmp_path):
    torch.manual_seed(0)
    model = create_model("hybrid_mixer_small", num_classes=3, in_chans=1, img_size=28)
    with torch.no_grad():  # move BatchNorm statistics away from their defaults so they must be saved too
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    model.eval()
    path = tmp_path / "m.pth"
    save_checkpoint(path, model, small_meta(dataset="tiny", seed=3))
    assert [p.name for p in tmp_path.iterdir()] == ["m.pth"]  # no temporary file left behind
    loaded, meta = load_model(path)
    x = torch.randn(5, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    assert not loaded.training
    assert meta["dataset"] == "tiny" and meta["seed"] == 3 and meta["medmix_version"] == medmix.__version__


def test_trained_checkpoint_carries_everything(trained_run):
    state, meta, train_state = load_checkpoint(trained_run.run_dir / "best_model.pth")
    assert train_state is None  # the best model is for use, last.pth for resuming
    assert meta["model"] == "hybrid_mixer_small"
    assert meta["model_kwargs"]["num_classes"] == 2 and meta["model_kwargs"]["in_chans"] == 1
    assert meta["task"] == {"task": "binary-class", "class_names": ["malignant", "normal, benign"], "n_channels": 1}
    assert meta["img_size"] == 28 and meta["data_size"] == 28
    assert len(meta["mean"]) == 1 and len(meta["std"]) == 1 and 0 < meta["mean"][0] < 1 and meta["std"][0] > 0
    assert meta["dataset"] == "breastmnist" and meta["seed"] == 0
    assert meta["medmix_version"] == medmix.__version__
    assert meta["test_metrics"]["acc"] == pytest.approx(trained_run.test["acc"])
    assert meta["val_metrics"]["n"] == 78 and meta["epoch"] == trained_run.best_epoch
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    # a run directory stands for its best_model.pth
    assert resolve_checkpoint(trained_run.run_dir) == trained_run.run_dir / "best_model.pth"


class _Payload:
    """Unpickling this object runs code: it creates the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').close()",)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("form", ["zip", "legacy", "raw_pickle"])
def test_malicious_pickle_is_refused_and_not_executed(tmp_path, form):
    # the payload is live: plain unpickling would run it
    probe = tmp_path / "probe"
    pickle.loads(pickle.dumps(_Payload(probe)))
    assert probe.exists()

    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    payload = {"medmix_format": FORMAT, "meta": json.dumps(small_meta()), "state_dict": {},
               "extra": _Payload(marker)}
    if form == "raw_pickle":
        path.write_bytes(pickle.dumps(payload))
    else:
        torch.save(payload, path, _use_new_zipfile_serialization=form == "zip")
    with pytest.raises(CheckpointError, match="refused") as e:
        load_checkpoint(path)
    assert not marker.exists()
    msg = str(e.value)
    assert "\n" not in msg and "\x1b" not in msg and len(msg) < 400  # one plain line for the CLI
    if form != "raw_pickle":
        assert "exec" in msg  # names what was refused
    with pytest.raises(CheckpointError):
        load_model(path)
    assert not marker.exists()


def test_truncated_checkpoint(trained_run, tmp_path):
    data = (trained_run.run_dir / "best_model.pth").read_bytes()
    for cut in (len(data) // 2, 100, 0):
        path = tmp_path / f"cut{cut}.pth"
        path.write_bytes(data[:cut])
        with pytest.raises(CheckpointError, match=str(path.name)):
            load_checkpoint(path)


def test_other_format_version(tmp_path):
    model = create_model("hybrid_mixer_small", num_classes=3, in_chans=1, img_size=28)
    path = tmp_path / "v2.pth"
    save_checkpoint(path, model, small_meta())
    payload = torch.load(path, weights_only=True)
    payload["medmix_format"] = FORMAT + 1
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match="format"):
        load_checkpoint(path)


@pytest.mark.parametrize("payload", [
    torch.zeros(3),  # a torch file, but not a medmix checkpoint
    {"state_dict": {}},  # no format field
    {"medmix_format": FORMAT, "meta": "{not json", "state_dict": {}},
    {"medmix_format": FORMAT, "meta": json.dumps({"model": "hybrid_mixer_small"}), "state_dict": {}},
])
def test_not_a_medmix_checkpoint(tmp_path, payload):
    path = tmp_path / "x.pth"
    torch.save(payload, path)
    with pytest.raises(CheckpointError):
        load_checkpoint(path)


def test_weights_that_do_not_fit(tmp_path):
    model = create_model("hybrid_mixer_small", num_classes=3, in_chans=1, img_size=28)
    path = tmp_path / "m.pth"
    save_checkpoint(path, model, {**small_meta(), "model_kwargs": {"num_classes": 5, "in_chans": 1,
                                                                   "img_size": 28}})
    with pytest.raises(CheckpointError, match="do not fit"):
        load_model(path)


def test_missing_and_garbage_files(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_checkpoint(tmp_path / "nope.pth")
    with pytest.raises(CheckpointError, match="best_model.pth"):
        load_checkpoint(tmp_path)  # a directory that is not a run
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"\x00\x01 this is not a checkpoint" * 10)
    with pytest.raises(CheckpointError):
        load_checkpoint(garbage)
