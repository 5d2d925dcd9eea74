"""Checkpoints that carry everything needed to use them, loaded without executing anything.

A checkpoint is one ``torch.save`` file holding only tensors and plain data::

    {"medmix_format": 1, "meta": "<JSON text>", "state_dict": {name: tensor}, ["train_state": {...}]}

and is read with ``torch.load(weights_only=True)``, which refuses any pickled object that would run code. The JSON
metadata names the model and its config, the task, class names, image size, channels, normalisation, calibration
temperature, dataset, metrics, seed and medmix version. Files are written to a temporary name and renamed, so a kill
at any moment leaves the previous good file in place.
"""
from __future__ import annotations

import json
import os
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from . import __version__
from .errors import CheckpointError

FORMAT = 1
REQUIRED_META = ("model", "model_kwargs", "task", "img_size", "data_size", "mean", "std")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(Path(path), text.encode())


def save_checkpoint(path: str | os.PathLike, model: nn.Module, meta: dict, train_state: dict | None = None) -> None:
    missing = [k for k in REQUIRED_META if k not in meta]
    if missing:
        raise ValueError(f"checkpoint metadata lacks {missing}")
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    payload: dict[str, Any] = {"medmix_format": FORMAT, "meta": json.dumps({**meta, "medmix_version": __version__}),
                               "state_dict": state}
    if train_state is not None:
        payload["train_state"] = train_state
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save(payload, tmp)
    os.replace(tmp, path)


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


def load_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict, dict | None]:
    """Return ``(state_dict, meta, train_state)``; raise :class:`CheckpointError` for anything else."""
    p = resolve_checkpoint(path)
    try:
        payload = torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's message is a paragraph of advice (with terminal escape codes); keep only what was refused
        text = re.sub(r"\x1b\[[0-9;]*m", "", str(e))
        detail = text.split("WeightsUnpickler error:", 1)[-1].strip()
        first = (detail.splitlines() or ["unsupported object"])[0].split(". ")[0]
        raise CheckpointError(f"{p}: refused: the file holds Python objects that would run code when loaded, "
                              f"not just weights ({first[:160]})") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError, AttributeError) as e:
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
    missing = [k for k in REQUIRED_META if k not in meta]
    if missing:
        raise CheckpointError(f"{p}: checkpoint metadata lacks {', '.join(missing)}")
    return state, meta, payload.get("train_state")


def build_model(meta: dict, state: dict[str, torch.Tensor] | None = None) -> nn.Module:
    from .models import create_model

    try:
        model = create_model(meta["model"], **meta["model_kwargs"])
    except TypeError as e:
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
