"""One shared backbone, one classification head per dataset and a modality head (the generalist's model).

Any registered model is the backbone: it is built with ``num_classes = number of datasets`` so that its own
classifier becomes the **modality head** (which dataset does this image come from?), and one linear **task head**
per dataset reads the same pre-logit features (``forward_head(..., pre_logits=True)``).

``forward`` returns one tensor, the columns of every head side by side: ``[modality | head 0 | head 1 | ...]``;
``layout`` gives each head's column range. A single output keeps the model usable by everything that expects
``model(x) -> logits`` (Grad-CAM targets a column, ONNX export traces one output).
"""
from __future__ import annotations

from collections.abc import Sequence
from itertools import accumulate

import torch
import torch.nn as nn

from ._registry import create_model

__all__ = ["MultiHeadClassifier", "head_layout"]


def head_layout(head_sizes: Sequence[int]) -> list[tuple[int, int]]:
    """Column ranges ``[(start, stop), ...]``: first the modality head (one column per head), then each head."""
    ends = list(accumulate((int(k) for k in head_sizes), initial=len(head_sizes)))
    return [(0, ends[0]), *zip(ends[:-1], ends[1:])]


class MultiHeadClassifier(nn.Module):
    def __init__(self, backbone: str, head_sizes: Sequence[int], *, in_chans: int = 3, img_size: int = 28,
                 drop_rate: float = 0.0, drop_path_rate: float | None = None, **backbone_kwargs) -> None:
        super().__init__()
        if not head_sizes or any(int(k) < 1 for k in head_sizes):
            raise ValueError(f"need at least one head, each with at least one output; got {list(head_sizes)}")
        self.head_sizes = [int(k) for k in head_sizes]
        self.backbone = create_model(backbone, num_classes=len(self.head_sizes), in_chans=in_chans,
                                     img_size=img_size, drop_rate=drop_rate, drop_path_rate=drop_path_rate,
                                     **backbone_kwargs)
        was = self.backbone.training
        with torch.no_grad():  # the width of the pre-logit features, whatever the backbone (eval: no BN update)
            x = self.backbone.eval().forward_features(torch.zeros(1, in_chans, img_size, img_size))
            self.num_features = int(self.forward_head(x, pre_logits=True).shape[1])
        self.backbone.train(was)
        self.heads = nn.ModuleList(nn.Linear(self.num_features, k) for k in self.head_sizes)
        for h in self.heads:
            nn.init.trunc_normal_(h.weight, std=0.02)
            nn.init.zeros_(h.bias)
        self.layout = head_layout(self.head_sizes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone.forward_features(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        z = self.backbone.forward_head(x, pre_logits=True).reshape(x.shape[0], -1)
        if pre_logits:
            return z
        # the modality head is the backbone's classifier; applied to the same features as the task heads
        modality = self.backbone.get_classifier()(z) if hasattr(self.backbone, "get_classifier") else \
            self.backbone.forward_head(x)
        return torch.cat([modality, *(h(z) for h in self.heads)], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def split(self, logits: torch.Tensor) -> list[torch.Tensor]:
        """``[modality logits, head 0 logits, ...]`` from the concatenated output."""
        return [logits[:, a:b] for a, b in self.layout]
