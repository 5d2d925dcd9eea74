"""Serve a checkpoint over HTTP: a JSON API, a web page with Grad-CAM, torch or ONNX Runtime backends.

>>> from medmix.serve import create_app
>>> app = create_app("runs/quickstart")                   # a FastAPI app; `medmix serve` runs it with uvicorn

Importing this package is cheap and torch-free; :mod:`medmix.serve.onnx_backend` never imports torch, and neither
does :func:`create_app` with ``backend="onnx"`` on an exported ``.onnx`` file.
"""
from __future__ import annotations

__all__ = ["create_app"]


def __getattr__(name: str):
    if name == "create_app":
        from ..errors import require_extra

        require_extra("serve", "medmix.serve")
        from .app import create_app

        return create_app
    raise AttributeError(f"module 'medmix.serve' has no attribute {name!r}")
