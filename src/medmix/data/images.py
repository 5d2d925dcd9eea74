"""Decode one user image into a uint8 tensor ``(C, H, W)`` the way training data look.

The decoding itself lives in the torch-free :mod:`medmix.imaging` (shared with the ONNX Runtime server); this module
adds torch tensors as inputs and outputs.
"""
from __future__ import annotations

import torch

from ..imaging import IMAGE_SUFFIXES, MAX_PIXELS, ImageTooLarge, load_image_np

__all__ = ["IMAGE_SUFFIXES", "MAX_PIXELS", "ImageTooLarge", "load_image"]


def load_image(src: object, n_channels: int, size: int | None = None, name: str | None = None) -> torch.Tensor:
    """Decode ``src`` (a path, bytes, a PIL image, a NumPy array or a tensor) into a uint8 tensor
    ``(C, size, size)`` (or its own size when ``size`` is None)."""
    if isinstance(src, torch.Tensor):
        src = src.detach().cpu().numpy()
    return torch.from_numpy(load_image_np(src, n_channels, size, name))
