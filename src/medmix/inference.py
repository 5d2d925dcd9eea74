"""Inference without training code: precision, batching, probabilities, batched forward passes and feature
extraction. The predictor, the evaluator, calibration, the OOD detector and the server build on these; nothing here
imports the training loop (a test enforces the layers).
"""
from __future__ import annotations

import os
import platform
from pathlib import Path

import torch
from torch import nn

from .config import PRECISIONS
from .errors import ConfigError
from .task_kinds import MULTI_LABEL


def bf16_supported() -> bool:
    """True when the CPU has native bf16 matrix instructions (AVX512-BF16 or AMX); without them bf16 is emulated
    and far slower than fp32 (measured: ~100x on an AVX2-only EPYC)."""
    return cpu_kind() in ("AMX", "AVX-512 BF16")


def resolve_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise ConfigError(f"unknown precision {precision!r}; use auto, bf16 or fp32")
    if precision == "auto":
        return "bf16" if bf16_supported() else "fp32"
    return precision


# ----------------------------------------------------------------------------------------------- batches
def iterate_batches(n: int, batch_size: int, generator: torch.Generator | None = None, drop_last: bool = False):
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    stop = n - (n % batch_size) if drop_last and n > batch_size else n
    for i in range(0, stop, batch_size):
        yield order[i:i + batch_size]


def autocast(precision: str):
    """bf16 autocast on the CPU when ``precision`` is \"bf16\", else a no-op context."""
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")


def probabilities(logits: torch.Tensor, task: str, temperature: float | list[float] | torch.Tensor = 1.0
                  ) -> torch.Tensor:
    """Logits -> the scores the official evaluator expects (sigmoid for multi-label, softmax otherwise).

    ``temperature`` divides the logits: one number, or one per column (per-label temperatures of multi-label
    tasks)."""
    if not isinstance(temperature, (int, float)):
        temperature = torch.as_tensor(temperature, dtype=torch.float32)
    z = logits.float() / temperature
    return torch.sigmoid(z) if task == MULTI_LABEL else torch.softmax(z, dim=1)


@torch.inference_mode()
def extract(model: nn.Module, images: torch.Tensor, transform, batch_size: int = 256, *, precision: str = "fp32",
            features: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """uint8 images -> ``(logits (N, K), penultimate features (N, D) or None)`` in float32, one forward pass per batch
    (eval mode); the forward runs in ``precision``."""
    model.eval()
    device = next(model.parameters(), torch.empty(0)).device
    logits, feats = [], []
    for idx in iterate_batches(len(images), batch_size):
        with autocast(precision):
            f = model.forward_features(transform(images[idx]).to(device))
            logits.append(model.forward_head(f).float().cpu())
            if features:
                feats.append(model.forward_head(f, pre_logits=True).float().reshape(len(idx), -1).cpu())
    if not logits:
        return torch.empty(0), (torch.empty(0) if features else None)
    return torch.cat(logits), (torch.cat(feats) if features else None)


def predict_logits(model: nn.Module, images: torch.Tensor, transform, batch_size: int = 512,
                   precision: str = "fp32") -> torch.Tensor:
    """uint8 images -> logits ``(N, K)`` in float32: :func:`extract` without the features (``forward`` of every
    medmix model is ``forward_head(forward_features(x))``, so the numbers are the same)."""
    return extract(model, images, transform, batch_size, precision=precision, features=False)[0]


# ----------------------------------------------------------------------------------------------- the machine
def _cpuinfo_field(name: str, cpuinfo: str | None = None) -> str | None:
    """The first ``name : value`` line's value in ``cpuinfo`` (default: ``/proc/cpuinfo``), or None."""
    try:
        text = Path("/proc/cpuinfo").read_text() if cpuinfo is None else cpuinfo
    except OSError:
        text = ""
    return next((ln.split(":", 1)[1] for ln in text.splitlines() if ln.startswith(name)), None)


def cpu_kind(cpuinfo: str | None = None) -> str:
    """What the CPU offers for training, from ``/proc/cpuinfo``: "AMX" (amx_bf16), "AVX-512 BF16" (avx512_bf16),
    "AVX-512" (avx512f, bf16 emulated), "AVX2" (bf16 emulated) or "other"; timings are only comparable within a kind."""
    flags = set((_cpuinfo_field("flags", cpuinfo) or "").split())
    for flag, kind in (("amx_bf16", "AMX"), ("avx512_bf16", "AVX-512 BF16"), ("avx512f", "AVX-512"), ("avx2", "AVX2")):
        if flag in flags:
            return kind
    return "other"


def machine_description() -> str:
    """CPU model and kind (its bf16 support), threads, torch and OS: the line stored beside every timing."""
    cpu = (_cpuinfo_field("model name") or "unknown CPU").strip()
    return (f"{cpu} ({cpu_kind()}), {torch.get_num_threads()} threads, torch {torch.__version__}, "
            f"{platform.system()}")


def set_threads() -> None:
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:  # torchrun: the processes on this machine share its cores
        n //= max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        pass
    torch.set_num_threads(max(1, n))
