"""Typed errors. Library code raises these; only the CLI turns them into one line on stderr (exit 2)."""
from __future__ import annotations


class MedmixError(Exception):
    """Base class: the message must tell the user what to do."""


class UnknownNameError(MedmixError, KeyError):
    """A model or dataset name that no registry knows."""

    def __init__(self, kind: str, name: str, known: list[str]):
        self.kind, self.name, self.known = kind, name, list(known)
        super().__init__(f"unknown {kind} {name!r}; known {kind}s: {', '.join(sorted(known))}")

    def __str__(self) -> str:  # KeyError would repr() the message
        return self.args[0]


class DataError(MedmixError):
    """A dataset file that is missing, corrupt or of the wrong layout."""


class ImageError(MedmixError):
    """An input image that cannot be decoded or converted."""


class CheckpointError(MedmixError):
    """A checkpoint that is missing, corrupt, unsafe or incompatible."""


class ConfigError(MedmixError, ValueError):
    """Arguments that do not fit together."""
