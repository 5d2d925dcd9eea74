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


class MissingExtraError(MedmixError, ImportError):
    """A feature whose optional dependencies (a pip "extra") are not installed."""


# the optional dependencies behind each extra of pyproject.toml, by import name
EXTRAS: dict[str, tuple[str, ...]] = {"serve": ("fastapi", "uvicorn", "python_multipart"),
                                      "onnx": ("onnx", "onnxruntime"), "tune": ("optuna",)}


def require_extra(extra: str, feature: str) -> None:
    """Raise :class:`MissingExtraError` naming the install command when a module of ``extra`` cannot be imported."""
    import importlib

    missing = []
    for module in EXTRAS[extra]:
        # python-multipart releases before 0.0.13 install it as `multipart`
        for name in (module, "multipart") if module == "python_multipart" else (module,):
            try:
                importlib.import_module(name)
                break
            except ImportError:
                pass
        else:
            missing.append(module.replace("_", "-"))
    if missing:
        raise MissingExtraError(f"{feature} needs {', '.join(missing)} (the {extra!r} extra): pip install "
                                f"\"medmix[{extra}]\" (in a source checkout: pip install -e \".[{extra}]\")")


def check_top_k(top_k: int | None) -> None:
    """``top_k`` is None (every class) or a positive integer."""
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ConfigError(f"--top-k must be at least 1 (or left out for every class), got {top_k!r}")
