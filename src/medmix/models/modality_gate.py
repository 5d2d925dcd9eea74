"""ModalityNet: the small imaging-modality classifier behind medmix's foreign-modality warning.

Not a model users train through ``medmix train`` (it is not in the model registry): medmix ships one trained copy
(``assets/modality_gate.safetensors``, built by ``benchmarks/modality_gate.py``) and :mod:`medmix.modality` fits,
per run, a Gaussian on its features of the run's training images. Its job is to map images of one modality close
together and images of different modalities far apart, so its input is deliberately coarse: every image is
converted to 3 channels and 28 x 28 pixels before it sees it (see :func:`medmix.modality.gate_inputs`).

Shape (timm style): a 3x3 stem, then ``Stage`` s of ``Block`` s (conv-BN-ReLU, the first of a stage strided),
global average pooling to ``num_features`` and a linear head over the modality classes. With the default widths
(16, 32, 64, 128) it has about 0.29 M parameters and 13 M multiply-adds per 28 px image.
"""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["ModalityNet"]


class Block(nn.Module):
    def __init__(self, in_chs: int, out_chs: int, stride: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_chs, out_chs, 3, stride, 1, bias=False)
        self.bn = nn.BatchNorm2d(out_chs)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class Stage(nn.Sequential):
    def __init__(self, in_chs: int, out_chs: int, depth: int = 2, stride: int = 2) -> None:
        super().__init__(*[Block(in_chs if i == 0 else out_chs, out_chs, stride if i == 0 else 1)
                           for i in range(depth)])


class ModalityNet(nn.Module):
    def __init__(self, num_classes: int, in_chans: int = 3, widths: tuple[int, ...] = (16, 32, 64, 128),
                 depth: int = 2) -> None:
        super().__init__()
        self.num_classes, self.in_chans, self.widths = num_classes, in_chans, tuple(widths)
        self.stem = Block(in_chans, widths[0])
        self.stages = nn.Sequential(*[Stage(widths[i - 1] if i else widths[0], w, depth, 1 if i == 0 else 2)
                                      for i, w in enumerate(widths)])
        self.num_features = widths[-1]
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(self.num_features, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.01)
                nn.init.zeros_(m.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(self.stem(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.pool(x).flatten(1)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))
