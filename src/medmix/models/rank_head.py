"""The CORN head (Shi, Cao and Raschka, "Deep Neural Networks for Rank-Consistent Ordinal Regression Based On
Conditional Probabilities"): ``K - 1`` binary logits ``z_k`` for ``P(y > k | y > k - 1)``, so the cumulative
probabilities ``P(y > k) = prod_{j <= k} sigmoid(z_j)`` can only fall with ``k`` (rank-consistent by construction).

:class:`CornHead` returns the ``K`` class *log-probabilities* ``log P(y = k)``: every consumer that expects logits
(softmax, temperature scaling, the ONNX export, the explainers) gets the CORN model's class distribution unchanged,
and :func:`rank_logits` recovers the conditional logits exactly for the loss (``medmix.losses.CornLoss``).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class CornHead(nn.Module):
    """``Linear(in_features, num_classes - 1)`` conditional logits -> ``(B, num_classes)`` class log-probabilities."""

    def __init__(self, in_features: int, num_classes: int) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError("a CORN head needs at least 2 grades")
        self.in_features, self.num_classes = in_features, num_classes
        self.linear = nn.Linear(in_features, num_classes - 1)
        nn.init.trunc_normal_(self.linear.weight, std=0.02)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.linear(x).float()
        # log P(y > k) for k = -1 .. K-2 (P(y > -1) = 1), then P(y = k) = P(y > k-1) * (1 - sigmoid(z_k))
        log_above = torch.cat([z.new_zeros(z.shape[0], 1), torch.cumsum(F.logsigmoid(z), dim=1)], dim=1)
        return torch.cat([log_above[:, :-1] + F.logsigmoid(-z), log_above[:, -1:]], dim=1)


def rank_logits(log_probs: torch.Tensor) -> torch.Tensor:
    """The conditional logits ``z_k = log P(y > k) - log P(y = k)`` (k = 0 .. K-2) of class log-probabilities."""
    lp = log_probs.float()
    above = torch.logcumsumexp(lp.flip(1), dim=1).flip(1)  # log P(y >= k)
    return above[:, 1:] - lp[:, :-1]


def attach_corn_head(model: nn.Module, num_classes: int) -> nn.Module:
    """Replace ``model``'s linear classifier (its ``head_attr`` child) by a :class:`CornHead`."""
    setattr(model, model.head_attr, CornHead(model.num_features, num_classes))
    return model
