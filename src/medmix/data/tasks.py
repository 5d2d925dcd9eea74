"""What a dataset asks: task kind, class names, channels. Everything downstream reads this, never a copied table."""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigError
from ..task_kinds import BINARY, MULTI_CLASS, MULTI_LABEL, ORDINAL, TASKS, check_task  # noqa: F401  (re-exported)


@dataclass(frozen=True)
class TaskInfo:
    """The task of a dataset. ``task`` uses medmnist's strings so the official evaluator semantics apply."""

    task: str
    class_names: tuple[str, ...]
    n_channels: int

    def __post_init__(self) -> None:
        check_task(self.task)
        if len(self.class_names) < 2 and self.task != MULTI_LABEL:
            raise ConfigError(f"a {self.task} task needs at least 2 classes, got {len(self.class_names)}")
        if self.n_channels not in (1, 3):
            raise ConfigError(f"images must have 1 or 3 channels, got {self.n_channels}")

    @property
    def num_classes(self) -> int:
        """Model outputs: one per class (binary tasks keep two columns, as the official evaluator expects)."""
        return len(self.class_names)

    def to_dict(self) -> dict:
        return {"task": self.task, "class_names": list(self.class_names), "n_channels": self.n_channels}

    @classmethod
    def from_dict(cls, d: dict) -> "TaskInfo":
        return cls(d["task"], tuple(d["class_names"]), int(d["n_channels"]))
