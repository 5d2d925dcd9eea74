"""ResNet-18 / ResNet-50 baselines as in the MedMNIST v2 benchmark.

He et al., *Deep Residual Learning for Image Recognition*, CVPR 2016; used as baselines by Yang et al.,
*MedMNIST v2 — A large-scale lightweight benchmark for 2D and 3D biomedical image classification*, Sci. Data 2023.

The networks are torchvision's :func:`~torchvision.models.resnet18` / :func:`~torchvision.models.resnet50`
(``weights=None``), not a re-implementation; only the stem and head are adapted:

* ``resnet18_28`` / ``resnet50_28`` — the benchmark's 28 px variant: a CIFAR-style stem, ``conv1`` is a 3×3
  stride-1 convolution (``in_chans → 64``) and the max pool is removed, so layer4 sees ``H / 8`` (28 px → 4×4).
* ``resnet18_224`` / ``resnet50_224`` — the standard ImageNet stem (7×7 stride-2 conv + 3×3 stride-2 max pool,
  total stride 32) for inputs upsampled to 224 px (224 → 7×7 in layer4). ``conv1`` is rebuilt only when
  ``in_chans != 3``. Thanks to adaptive average pooling they also run at 28 px (1×1 map) and 64 px (2×2).

:class:`ResNetClassifier` adopts the torchvision submodules as its own direct children, so parameter names are
exactly torchvision's (``conv1``, ``bn1``, ``layer1`` … ``layer4``, ``fc``): a torchvision ResNet state dict loads
without renaming (apart from ``conv1`` for ``in_chans != 3`` or the CIFAR stem, and ``fc`` for another class
count), and ``model.layer4`` / :attr:`ResNetClassifier.gradcam_layer` is the Grad-CAM target.

``drop_rate`` is dropout before ``fc``. torchvision's blocks have no stochastic depth, so ``drop_path_rate > 0``
swaps the last BatchNorm of every residual branch (``bn2`` of a BasicBlock, ``bn3`` of a Bottleneck) for a
BatchNorm subclass that drops the whole branch per sample after normalising — exactly stochastic depth, with the
same parameter names; rates grow linearly from 0 to ``drop_path_rate`` over the blocks (as in timm).

Parameter counts with ``num_classes=2`` (1-channel / 3-channel input; the stem and head are the only differences):

=============  ===========  ===========
model          in_chans=1   in_chans=3
=============  ===========  ===========
resnet18_28    11,168,706   11,169,858
resnet50_28    23,503,298   23,504,450
resnet18_224   11,171,266   11,177,538
resnet50_224   23,505,858   23,512,130
=============  ===========  ===========

Each further class adds 513 (ResNet-18) or 2,049 (ResNet-50) parameters.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
import torchvision
from torch import nn
from torchvision.models.resnet import Bottleneck
from torchvision.ops import stochastic_depth

from ._registry import Classifier, register_model

__all__ = ["BatchNormDropPath", "ResNetClassifier", "resnet18_28", "resnet18_224", "resnet50_28", "resnet50_224"]

Stem = Literal["cifar", "imagenet"]

_ARCHS = ("resnet18", "resnet50")  # torchvision.models builders

_PAPER = ("He et al., Deep Residual Learning for Image Recognition (CVPR 2016); "
          "MedMNIST v2 baseline (Yang et al., Sci. Data 2023)")


class BatchNormDropPath(nn.BatchNorm2d):
    """BatchNorm2d followed by per-sample stochastic depth; same parameters and buffers as ``nn.BatchNorm2d``."""

    def __init__(self, num_features: int, drop_prob: float = 0.0, **kwargs) -> None:
        super().__init__(num_features, **kwargs)
        self.drop_prob = float(drop_prob)

    @classmethod
    def from_bn(cls, bn: nn.BatchNorm2d, drop_prob: float) -> BatchNormDropPath:
        new = cls(bn.num_features, drop_prob, eps=bn.eps, momentum=bn.momentum, affine=bn.affine,
                  track_running_stats=bn.track_running_stats)
        new.load_state_dict(bn.state_dict())
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return stochastic_depth(super().forward(x), self.drop_prob, "row", self.training)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, drop_prob={self.drop_prob}"


class ResNetClassifier(Classifier):
    """A torchvision ResNet with an adaptable stem and head.

    ``forward_features(x)`` → layer4 map ``(B, C, h, w)`` (C = 512 for ResNet-18, 2048 for ResNet-50);
    ``forward_head(x, pre_logits=False)`` → global average pool → dropout → ``fc``; ``forward(x)`` → logits.
    """

    head_attr = "fc"

    def __init__(self, arch: str = "resnet18", *, num_classes: int = 2, in_chans: int = 1, stem: Stem = "cifar",
                 drop_rate: float = 0.0, drop_path_rate: float = 0.0, img_size: int = 28) -> None:
        super().__init__()
        if arch not in _ARCHS:
            raise ValueError(f"arch must be one of {sorted(_ARCHS)}, got {arch!r}")
        if stem not in ("cifar", "imagenet"):
            raise ValueError(f"stem must be 'cifar' or 'imagenet', got {stem!r}")
        body = getattr(torchvision.models, arch)(weights=None, num_classes=max(num_classes, 1))
        if stem == "cifar":
            body.conv1 = nn.Conv2d(in_chans, 64, kernel_size=3, stride=1, padding=1, bias=False)
            body.maxpool = nn.Identity()
        elif in_chans != 3:
            body.conv1 = nn.Conv2d(in_chans, 64, kernel_size=7, stride=2, padding=3, bias=False)
        nn.init.kaiming_normal_(body.conv1.weight, mode="fan_out", nonlinearity="relu")
        self.num_features = body.fc.in_features
        if num_classes == 0:
            body.fc = nn.Identity()
        if drop_path_rate > 0:
            _add_drop_path(body, drop_path_rate)

        # Adopt torchvision's children so names (and state-dict keys) are torchvision's.
        for name, module in body.named_children():
            self.add_module(name, module)
        self.head_drop = nn.Dropout(drop_rate)

        self.arch, self.stem = arch, stem
        self.num_classes, self.in_chans, self.img_size = num_classes, in_chans, img_size
        self.drop_rate = drop_rate
        self.reduction = 8 if stem == "cifar" else 32

    # type hints for the adopted children
    conv1: nn.Conv2d
    bn1: nn.BatchNorm2d
    relu: nn.ReLU
    maxpool: nn.Module
    layer1: nn.Sequential
    layer2: nn.Sequential
    layer3: nn.Sequential
    layer4: nn.Sequential
    avgpool: nn.AdaptiveAvgPool2d
    fc: nn.Module

    @property
    def gradcam_layer(self) -> nn.Module:
        """The last conv stage (``layer4``), whose output is the last 2-D feature map."""
        return self.layer4

    def feature_grid(self, x: torch.Tensor | tuple[int, int]) -> tuple[int, int]:
        """Spatial size ``(h, w)`` of the layer4 map for an input tensor ``(..., H, W)`` or size ``(H, W)``."""
        h, w = (x.shape[-2], x.shape[-1]) if isinstance(x, torch.Tensor) else (int(x[0]), int(x[1]))
        convs = [(3, 1, 1)] if self.stem == "cifar" else [(7, 2, 3), (3, 2, 1)]
        convs += [(3, 2, 1)] * 3  # stride-2 3x3 in layer2..4
        for k, s, p in convs:
            h, w = (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1
        return h, w

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.head_drop(torch.flatten(self.avgpool(x), 1))
        return x if pre_logits else self.fc(x)


def _add_drop_path(body: torchvision.models.ResNet, drop_path_rate: float) -> None:
    blocks = [b for layer in (body.layer1, body.layer2, body.layer3, body.layer4) for b in layer]
    for i, block in enumerate(blocks):
        bn = "bn3" if isinstance(block, Bottleneck) else "bn2"  # the last BatchNorm of the residual branch
        setattr(block, bn, BatchNormDropPath.from_bn(getattr(block, bn), drop_path_rate * i / max(len(blocks) - 1, 1)))


_STEMS = {"cifar": "CIFAR stem (3×3 s1 conv, no max pool) for 28 px",
          "imagenet": "ImageNet stem (7×7 s2 conv + max pool) for 224 px"}


def _register(arch: str, stem: Stem, size: int, params: str) -> Callable[..., ResNetClassifier]:
    def build(*, num_classes: int = 2, in_chans: int = 1, img_size: int = size, drop_rate: float = 0.0,
              drop_path_rate: float = 0.0) -> ResNetClassifier:
        return ResNetClassifier(arch, num_classes=num_classes, in_chans=in_chans, stem=stem, drop_rate=drop_rate,
                                drop_path_rate=drop_path_rate, img_size=img_size)

    build.__name__ = build.__qualname__ = f"{arch}_{size}"
    build.__doc__ = f"ResNet-{arch[6:]}, {_STEMS[stem]}; {params} params (2 classes, 1 ch)."
    return register_model(family="resnet", paper=_PAPER, default_img_size=size, min_img_size=28,
                          tags=("baseline", "medmnist"))(build)


resnet18_28 = _register("resnet18", "cifar", 28, "11,168,706")
resnet50_28 = _register("resnet50", "cifar", 28, "23,503,298")
resnet18_224 = _register("resnet18", "imagenet", 224, "11,171,266")
resnet50_224 = _register("resnet50", "imagenet", 224, "23,505,858")
