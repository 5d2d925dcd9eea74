"""The four task kinds, as medmnist's ``INFO[flag]["task"]`` strings (so the official evaluator's semantics apply).
The one definition; torch-free, so the ONNX Runtime server can use it too."""
from __future__ import annotations

from .errors import ConfigError

MULTI_CLASS = "multi-class"
BINARY = "binary-class"
MULTI_LABEL = "multi-label, binary-class"
ORDINAL = "ordinal-regression"
TASKS = (MULTI_CLASS, BINARY, MULTI_LABEL, ORDINAL)


def check_task(task: str) -> None:
    """Raise :class:`~medmix.errors.ConfigError` unless ``task`` is one of :data:`TASKS`."""
    if task not in TASKS:
        raise ConfigError(f"unknown task {task!r}; expected one of: {', '.join(repr(t) for t in TASKS)}")
