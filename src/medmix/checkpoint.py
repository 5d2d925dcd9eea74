"""Checkpoints that carry everything needed to use them, loaded without executing anything.

A checkpoint is one ``torch.save`` file holding only tensors and plain data::

    {"medmix_format": 1, "meta": "<JSON text>", "state_dict": {name: tensor}, ["train_state": {...}],
     ["extras": {name: tensor}]}

and is read with ``torch.load(weights_only=True)``, which refuses any pickled object that would run code. The JSON
metadata names the model and its config, the task, class names, image size, channels, normalisation, calibration
temperature, dataset, metrics, seed and medmix version; ``extras`` holds fitted tensors that are not weights (the
out-of-distribution statistics of :mod:`medmix.ood`). Files are written to a temporary name and renamed, so a kill
at any moment leaves the previous good file in place.
"""
from __future__ import annotations

import io
import json
import os
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ._version import __version__
from .atomic import atomic_file
from .errors import CheckpointError

FORMAT = 1
REQUIRED_META = ("model", "model_kwargs", "task", "img_size", "data_size", "mean", "std")


def save_checkpoint(path: str | os.PathLike, model: nn.Module | dict[str, torch.Tensor], meta: dict,
                    train_state: dict | None = None, extras: dict[str, torch.Tensor] | None = None) -> None:
    """Write ``model``'s weights (or a state dict itself, re-saved bit-identical) with ``meta`` (JSON), an optional
    ``train_state`` and optional ``extras`` (named tensors that belong to the model without being weights)."""
    missing = [k for k in REQUIRED_META if k not in meta]
    if missing:
        raise ValueError(f"checkpoint metadata lacks {missing}")
    weights = model if isinstance(model, dict) else model.state_dict()
    state = {k: v.detach().cpu().contiguous() for k, v in weights.items()}
    payload: dict[str, Any] = {"medmix_format": FORMAT, "meta": json.dumps({**meta, "medmix_version": __version__}),
                               "state_dict": state}
    if train_state is not None:
        payload["train_state"] = train_state
    if extras:
        bad = [k for k, v in extras.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
        if bad:
            raise ValueError(f"checkpoint extras must map names to tensors; not: {bad}")
        payload["extras"] = {k: v.detach().cpu().contiguous() for k, v in extras.items()}
    with atomic_file(path) as f:
        torch.save(payload, f)


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint file, or a run directory (its ``best_model.pth``)."""
    p = Path(path)
    if p.is_dir():
        if (p / "best_model.pth").is_file():
            return p / "best_model.pth"
        raise CheckpointError(f"{p}: no best_model.pth in this directory (is it a finished medmix run?)")
    if not p.exists():
        raise CheckpointError(f"{p}: no such checkpoint")
    return p


def load_checkpoint(path: str | os.PathLike, *, extras: bool = False):
    """Return ``(state_dict, meta, train_state)``, or ``(state_dict, meta, train_state, extras)`` with
    ``extras=True`` (``{}`` for checkpoints written without any); raise :class:`CheckpointError` for anything
    else."""
    p = resolve_checkpoint(path)
    try:
        with open(p, "rb") as f:
            data = f.read()
    except OSError as e:  # unreadable (permissions), vanished, ...: say so, not "truncated"
        raise CheckpointError(f"{p}: cannot read the checkpoint ({e.strerror or type(e).__name__})") from None
    # torch's reader does not verify the zip CRC-32s, so a bit flip inside the weights would load silently as
    # different weights: check every member's checksum (about 1 GB/s) first (not a zip file: torch.load decides)
    if data[:4] == b"PK\x03\x04":
        try:
            with zipfile.ZipFile(io.BytesIO(data)) as z:
                bad = z.testzip()
        except Exception as e:  # BadZipFile, zlib errors, EOFError, ... from a damaged directory
            raise CheckpointError(f"{p}: not a readable checkpoint (truncated or damaged: {type(e).__name__})") \
                from None
        if bad is not None:
            raise CheckpointError(f"{p}: damaged checkpoint (checksum mismatch in {bad.split('/', 1)[-1]}); use "
                                  f"another copy")
    try:
        payload = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's message is a paragraph of advice (with terminal escape codes); keep only what was refused
        text = re.sub(r"\x1b\[[0-9;]*m", "", str(e))
        detail = text.split("WeightsUnpickler error:", 1)[-1].strip()
        first = (detail.splitlines() or ["unsupported object"])[0].split(". ")[0]
        if not data.startswith(b"\x80") and ("WeightsUnpickler error:" not in text
                                              or detail.startswith("Unsupported operand")):
            # not a pickle stream at all (an image, random bytes): nothing was refused, nothing could run
            raise CheckpointError(f"{p}: not a readable checkpoint (truncated or not a torch file)") from None
        raise CheckpointError(f"{p}: refused: the file holds Python objects that would run code when loaded, "
                              f"not just weights ({first[:160]})") from None
    except MemoryError:
        raise CheckpointError(f"{p}: not a readable checkpoint (it declares more data than fits in memory)") \
            from None
    except Exception as e:  # RuntimeError, EOFError, BadZipFile, ValueError, KeyError, ... from damaged files
        raise CheckpointError(f"{p}: not a readable checkpoint (truncated or not a torch file: "
                              f"{type(e).__name__})") from None
    if not isinstance(payload, dict) or "medmix_format" not in payload:
        raise CheckpointError(f"{p}: not a medmix checkpoint (no medmix_format field)")
    if payload["medmix_format"] != FORMAT:
        raise CheckpointError(f"{p}: checkpoint format {payload['medmix_format']} is not supported by medmix "
                              f"{__version__} (format {FORMAT}); retrain or use a matching medmix version")
    try:
        meta = json.loads(payload["meta"])
        state = payload["state_dict"]
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{p}: corrupt checkpoint metadata ({e})") from None
    if not isinstance(meta, dict) or not isinstance(state, dict):
        raise CheckpointError(f"{p}: corrupt checkpoint (metadata or weights of the wrong type)")
    missing = [k for k in REQUIRED_META if k not in meta]
    if missing:
        raise CheckpointError(f"{p}: checkpoint metadata lacks {', '.join(missing)}")
    if not extras:
        return state, meta, payload.get("train_state")
    found = payload.get("extras") or {}
    if not isinstance(found, dict) or not all(isinstance(v, torch.Tensor) for v in found.values()):
        raise CheckpointError(f"{p}: corrupt checkpoint extras (expected named tensors)")
    return state, meta, payload.get("train_state"), dict(found)


GENERALIST = "generalist"  # meta["kind"] of a multi-dataset checkpoint (medmix.generalist)
ENSEMBLE = "ensemble"  # meta["model"] of an ensemble / test-time-augmented checkpoint (medmix.ensemble)


def is_generalist(meta: dict) -> bool:
    return meta.get("kind") == GENERALIST


def load_training_data(meta: dict, run_dir: Path, data_dir: str | os.PathLike | None = None,
                       split_name: str = "split.json"):
    """The dataset a checkpoint was trained on, with the same split (``split_name`` beside it when present)."""
    src = meta.get("data_source", {})
    stored = Path(src.get("path", ""))
    name = meta["dataset"]
    if src.get("kind") == "folder" or (src.get("kind") == "packed" and (data_dir is None or name != "mednist")):
        name = str(stored)  # data without a registry name are found where they were read
    elif data_dir is None and src.get("kind") == "medmnist" and stored.is_file():
        data_dir = stored.parent
    split_file = run_dir / split_name
    from .data import load_dataset

    return load_dataset(name, data_dir=data_dir, size=int(src.get("size", meta["data_size"])),
                        seed=int(src.get("split_seed", meta.get("seed", 0))),
                        split_file=split_file if split_file.exists() else None)


def build_model(meta: dict, state: dict[str, torch.Tensor] | None = None) -> nn.Module:
    """The checkpoint's model (a generalist's :class:`~medmix.models.multihead.MultiHeadClassifier` included), with
    ``state`` loaded when given, in eval mode."""
    from .models import create_model

    try:
        if is_generalist(meta):
            from .models.multihead import MultiHeadClassifier

            sizes = [len(d["task"]["class_names"]) for d in meta["generalist"]["datasets"]]
            model = MultiHeadClassifier(meta["model"], sizes, **meta["model_kwargs"])
        elif meta["model"] == ENSEMBLE:
            from .models.ensemble import Averaged

            kw = meta["model_kwargs"]
            model = Averaged([create_model(m["model"], **m["model_kwargs"]) for m in kw["members"]], kw["views"],
                             [(m["scale"], m["shift"]) for m in kw["members"]],
                             [m["temperature"] for m in kw["members"]], kw["multi_label"])
        else:
            model = create_model(meta["model"], **meta["model_kwargs"])
    except (TypeError, ValueError, KeyError) as e:
        raise CheckpointError(f"checkpoint model config does not fit model {meta['model']!r}: {e}") from None
    if state is not None:
        try:
            model.load_state_dict(state)
        except RuntimeError as e:
            raise CheckpointError(f"checkpoint weights do not fit model {meta['model']!r} "
                                  f"({str(e).splitlines()[0]})") from None
    return model.eval()


def load_model(path: str | os.PathLike) -> tuple[nn.Module, dict]:
    state, meta, _ = load_checkpoint(path)
    return build_model(meta, state), meta
