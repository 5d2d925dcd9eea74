"""One registry for every model: ``register_model`` decorates a builder, ``create_model`` calls it.

A builder takes the uniform keyword arguments ``num_classes``, ``in_chans``, ``img_size``, ``drop_rate`` and
``drop_path_rate`` (plus its own extras) and returns an ``nn.Module`` whose ``forward`` returns logits and which
has ``forward_features(x)`` and ``forward_head(x, pre_logits=False)``; :class:`Classifier` and
:func:`init_weights` are what medmix's own families share.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn as nn

from ..errors import ConfigError, UnknownNameError


@dataclass(frozen=True)
class ModelInfo:
    name: str
    builder: Callable[..., nn.Module]
    family: str
    paper: str = ""
    description: str = ""
    default_img_size: int = 28
    min_img_size: int = 28
    tags: tuple[str, ...] = field(default_factory=tuple)


_MODELS: dict[str, ModelInfo] = {}


def register_model(
    *, family: str, paper: str = "", description: str = "", default_img_size: int = 28, min_img_size: int = 28,
    tags: tuple[str, ...] = (),
) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator: register ``fn`` under its function name."""

    def deco(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        name = fn.__name__
        if name in _MODELS:
            raise ValueError(f"model {name!r} registered twice")
        _MODELS[name] = ModelInfo(name, fn, family, paper, description or (fn.__doc__ or "").strip().split("\n")[0],
                                  default_img_size, min_img_size, tuple(tags))
        return fn

    return deco


def list_models() -> list[str]:
    return sorted(_MODELS)


def model_info(name: str) -> ModelInfo:
    try:
        return _MODELS[name]
    except KeyError:
        raise UnknownNameError("model", name, list(_MODELS)) from None


def create_model(name: str, *, num_classes: int = 2, in_chans: int = 1, img_size: int = 28, drop_rate: float = 0.0,
                 drop_path_rate: float | None = None, **kwargs) -> nn.Module:
    """Build a registered model. Unknown names raise :class:`UnknownNameError` listing the known ones.

    ``drop_path_rate=None`` keeps the builder's own default (e.g. 0.1 for MedViT-S as in the official code)."""
    info = model_info(name)
    ordinal_head = kwargs.pop("ordinal_head", None)  # "corn": the CORN head (models/rank_head.py) on any model
    if ordinal_head not in (None, "corn"):
        raise ConfigError(f"unknown ordinal head {ordinal_head!r}; the one there is: corn")
    if num_classes < 1:
        raise ConfigError(f"num_classes must be >= 1, got {num_classes}")
    if in_chans < 1:
        raise ConfigError(f"in_chans must be >= 1, got {in_chans}")
    if img_size < info.min_img_size:
        raise ConfigError(f"model {name!r} needs img_size >= {info.min_img_size}, got {img_size}")
    params = inspect.signature(info.builder).parameters
    unknown = [k for k in kwargs if k not in params and not any(p.kind == p.VAR_KEYWORD for p in params.values())]
    if unknown:
        raise ConfigError(f"model {name!r} does not take {', '.join(unknown)}")
    try:
        if drop_path_rate is not None:
            kwargs["drop_path_rate"] = drop_path_rate
        model = info.builder(num_classes=num_classes, in_chans=in_chans, img_size=img_size, drop_rate=drop_rate,
                             **kwargs)
    except TypeError as e:  # an option the model's constructor does not take
        raise ConfigError(f"model {name!r}: {e}") from None
    if ordinal_head == "corn":
        from .rank_head import attach_corn_head

        attach_corn_head(model, num_classes)
    model.medmix_name = name  # type: ignore[attr-defined]
    return model


class Classifier(nn.Module):
    """``forward(x) = forward_head(forward_features(x))``; the linear classifier is the child named ``head_attr``."""

    head_attr = "head"
    num_features: int

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Tokens ``(B, N, D)`` → mean over tokens → ``head_drop`` → logits (or the pooled ``(B, D)`` if
        ``pre_logits``); a CNN that pools a map overrides this."""
        x = self.head_drop(x.mean(dim=1))
        return x if pre_logits else self.get_classifier()(x)

    def get_classifier(self) -> nn.Module:
        return getattr(self, self.head_attr)

    def reset_classifier(self, num_classes: int) -> None:
        self.num_classes = num_classes
        setattr(self, self.head_attr, nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity())


def init_weights(m: nn.Module, trunc_normal: Callable[..., torch.Tensor] = nn.init.trunc_normal_) -> None:
    """For ``model.apply``: Kaiming-normal (fan-out) convs, truncated-normal (std 0.02) linears, unit norms, zero
    biases. ``trunc_normal`` is the sampler: torch's and timm's draw different numbers from the same seed."""
    if isinstance(m, nn.Conv2d):
        nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    elif isinstance(m, nn.Linear):
        trunc_normal(m.weight, std=0.02)
    elif isinstance(m, (nn.BatchNorm2d, nn.LayerNorm)):
        nn.init.ones_(m.weight)
    if isinstance(m, (nn.Conv2d, nn.Linear, nn.BatchNorm2d, nn.LayerNorm)) and m.bias is not None:
        nn.init.zeros_(m.bias)
