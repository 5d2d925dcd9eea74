"""Training losses for the four MedMNIST task kinds, including the Ordinal Loss of Liu, *Medical Image
Classification Based on Transformer Model and Ordinal Loss*.

Every module is called like a torch loss, ``loss(logits, target)``: ``logits`` is ``(N, C)`` float;
``target`` is ``(N,)`` (or ``(N, 1)``, as MedMNIST labels come) integer class indices for single-label
tasks and ``(N, L)`` 0/1 for the multi-label task. Targets are range-checked (one host sync per call)
and a bad one raises :class:`~medmix.errors.ConfigError` instead of a CUDA assert or silent garbage.

>>> loss = build_loss("ordinal", "ordinal-regression", num_classes=5, alpha=0.2)
>>> value = loss(logits, target)
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import ConfigError
from .task_kinds import MULTI_LABEL, ORDINAL, check_task

LOSS_NAMES: tuple[str, ...] = ("ce", "nll", "bce", "ordinal", "corn")

Variant = Literal["peaked", "printed"]
PairReduction = Literal["sum", "mean"]

__all__ = ["LOSS_NAMES", "BCEWithLogits", "CrossEntropy", "LogSoftmaxNLL", "OrdinalLoss", "build_loss",
           "default_loss_name", "rank_loss", "rank_loss_terms"]


# --------------------------------------------------------------------------- target checks
def _single_label_target(logits: Tensor, target: Tensor, num_classes: int) -> Tensor:
    if logits.ndim != 2 or logits.shape[1] != num_classes:
        raise ConfigError(f"logits must have shape (N, {num_classes}); got {tuple(logits.shape)}")
    if target.ndim == 2 and target.shape[1] == 1:
        target = target[:, 0]
    if target.ndim != 1 or target.shape[0] != logits.shape[0]:
        raise ConfigError(f"target must have shape (N,) = ({logits.shape[0]},) of class indices; "
                          f"got {tuple(target.shape)}")
    if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
        raise ConfigError(f"target must hold integer class indices (torch.long); got dtype {target.dtype}")
    if target.numel():
        lo, hi = int(target.min()), int(target.max())
        if lo < 0 or hi >= num_classes:
            raise ConfigError(f"target labels must lie in [0, {num_classes - 1}] for {num_classes} classes; "
                              f"got min {lo}, max {hi}")
    return target.long()


def _multi_label_target(logits: Tensor, target: Tensor, num_labels: int) -> Tensor:
    if logits.ndim != 2 or logits.shape[1] != num_labels:
        raise ConfigError(f"logits must have shape (N, {num_labels}); got {tuple(logits.shape)}")
    if tuple(target.shape) != tuple(logits.shape):
        raise ConfigError(f"multi-label target must have the logits' shape {tuple(logits.shape)} (0/1 per label); "
                          f"got {tuple(target.shape)}")
    t = target.to(logits.dtype)
    if t.numel() and bool(((t < 0) | (t > 1)).any()):
        raise ConfigError("multi-label target values must lie in [0, 1]")
    return t


# --------------------------------------------------------------------------- plain losses
class CrossEntropy(nn.CrossEntropyLoss):
    """``nn.CrossEntropyLoss`` (label smoothing supported) with target validation."""

    def __init__(self, num_classes: int, label_smoothing: float = 0.0) -> None:
        super().__init__(label_smoothing=label_smoothing)
        self.num_classes = num_classes

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return super().forward(input, _single_label_target(input, target, self.num_classes))


class LogSoftmaxNLL(nn.Module):
    """``LogSoftmax`` + ``NLLLoss``, the Ordinal Loss paper's formulation; numerically the same as
    :class:`CrossEntropy`."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.log_softmax = nn.LogSoftmax(dim=1)
        self.nll = nn.NLLLoss()

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        return self.nll(self.log_softmax(logits), _single_label_target(logits, target, self.num_classes))


class BCEWithLogits(nn.BCEWithLogitsLoss):
    """``nn.BCEWithLogitsLoss`` for the multi-label task (sigmoid per label), with target validation."""

    def __init__(self, num_labels: int) -> None:
        super().__init__()
        self.num_labels = num_labels

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return super().forward(input, _multi_label_target(input, target, self.num_labels))


# --------------------------------------------------------------------------- ordinal loss
def rank_loss_terms(probs: Tensor, target: Tensor, margin: float = 0.1, variant: Variant = "peaked") -> Tensor:
    """Per-pair hinge terms, shape ``(N, C(C-1)/2)``, pairs ``(i, j)`` with ``i < j`` in ``torch.triu_indices`` order
    ((0,1), (0,2), ..., (C-2,C-1)). ``probs`` are class probabilities (softmax), ``target`` (N,) long.
    See :class:`OrdinalLoss` for the definition."""
    if variant not in ("peaked", "printed"):
        raise ConfigError(f"ordinal variant must be 'peaked' or 'printed'; got {variant!r}")
    n, c = probs.shape
    i, j = torch.triu_indices(c, c, offset=1, device=probs.device)
    diff = probs[:, i] - probs[:, j]  # (N, P): p_i - p_j
    y2 = 2 * target.long().view(n, 1)  # compare 2y with i + j: exact integer arithmetic
    mid2 = (i + j).view(1, -1)
    if variant == "printed":
        # t = +1 if y > (i+j)/2 else -1 (tie -> -1); term = max(0, -t (p_i - p_j) + margin) on every pair
        t = torch.where(y2 > mid2, 1.0, -1.0).to(probs.dtype)
        return F.relu(-t * diff + margin)
    # peaked: s = sign(y - (i+j)/2); s = +1 wants p_j >= p_i (+ margin), s = -1 wants p_i >= p_j (+ margin),
    # s = 0 (tie: i and j equidistant from y) contributes nothing. The margin applies only to pairs that contain y.
    s = torch.sign(y2 - mid2).to(probs.dtype)
    has_label = (y2 == 2 * i.view(1, -1)) | (y2 == 2 * j.view(1, -1))
    m = has_label.to(probs.dtype) * margin
    return s.abs() * F.relu(s * diff + m)


def rank_loss(probs: Tensor, target: Tensor, margin: float = 0.1, variant: Variant = "peaked",
              pair_reduction: PairReduction = "sum") -> Tensor:
    """RankLoss of :class:`OrdinalLoss` on probabilities: per-sample sum (or mean over all C(C-1)/2 pairs), batch
    mean."""
    if pair_reduction not in ("sum", "mean"):
        raise ConfigError(f"pair_reduction must be 'sum' or 'mean'; got {pair_reduction!r}")
    terms = rank_loss_terms(probs, target, margin, variant)
    per_sample = terms.sum(dim=1) if pair_reduction == "sum" else terms.mean(dim=1)
    return per_sample.mean()


class OrdinalLoss(nn.Module):
    r"""``alpha * RankLoss + (1 - alpha) * CE`` (Liu's Ordinal Loss, with a corrected direction).

    ``p = softmax(logits)``; for every class pair ``i < j`` a hinge (margin ranking) term compares ``p_i`` and
    ``p_j``, the direction being chosen by where the true grade ``y`` lies relative to ``(i + j) / 2``.

    **variant="printed"** - the formula exactly as printed in the paper::

        t_ij = +1 if y > (i+j)/2 else -1          (tie y == (i+j)/2  ->  t = -1)
        term_ij = max(0, -t_ij (p_i - p_j) + margin)          margin on every pair

      For ``y > (i+j)/2`` this asks ``p_i > p_j + margin``: the class *farther* from ``y`` should be more probable,
      so it pushes probability **away** from the true grade (for the top grade it asks p_0 > p_1 > ... > p_{C-1}).
      Kept only for comparison with the paper.

    **variant="peaked"** (default) - the direction that makes a distribution peaked at the label the minimiser::

        s_ij = sign(y - (i+j)/2)                   (+1: j is closer to y, -1: i is closer, 0: tie)
        m_ij = margin if y in {i, j} else 0
        term_ij = |s_ij| * max(0, s_ij (p_i - p_j) + m_ij)

      i.e. the class closer to ``y`` must be at least as probable as the farther one, and the label itself must beat
      every other class by ``margin``. In the printed notation this is ``t = -s``. **Tie** (``y == (i+j)/2``, only
      when ``i + j`` is even and ``i < y < j``): ``i`` and ``j`` are equidistant from ``y``, no ordering is implied,
      the pair contributes 0.

      *Why the margin only on pairs containing the label:* with a constant margin on every pair, two classes both far
      from ``y`` (e.g. ``p_3 = p_4 = 0`` for ``y = 0``) can never satisfy ``p_3 > p_4 + margin``, so a one-hot
      distribution at the label would cost ``margin`` per such pair and the minimiser of the rank term would be a
      broad staircase (for C = 5, margin 0.1: p = (.4, .3, .2, .1, 0)), fighting CE. With the margin restricted to
      the label's pairs (``p_y >= p_k + margin``) and a plain non-strict ordering elsewhere, the rank loss is **zero
      exactly for the distributions that are non-increasing in |k - y| with a mode at y at least ``margin`` above
      every other class** - in particular for a sharply unimodal (one-hot) distribution at the label - and
      positive for multi-modal or displaced ones. Every pair and the (i+j)/2 direction rule of the seed are kept.
      ``margin`` must lie in [0, 1] for zero to be attainable.

    **Normalisation**: per sample the pair terms are *summed* (the seed says "sums", and its alpha grid was tuned on
    that scale; for C = 5 there are 10 pairs) or, with ``pair_reduction="mean"``, divided by the constant
    C(C-1)/2 (tie pairs included in the count); then averaged over the batch. CE is ``nn.CrossEntropyLoss``
    (batch mean, optional ``label_smoothing``). ``alpha = 0`` gives CE exactly.
    """

    def __init__(self, num_classes: int, alpha: float = 0.2, margin: float = 0.1, variant: Variant = "peaked",
                 pair_reduction: PairReduction = "sum", label_smoothing: float = 0.0) -> None:
        super().__init__()
        if int(num_classes) != num_classes or num_classes < 2:
            raise ConfigError(f"OrdinalLoss needs num_classes >= 2; got {num_classes!r}")
        if not 0.0 <= float(alpha) <= 1.0:
            raise ConfigError(f"alpha must lie in [0, 1]; got {alpha!r}")
        if not 0.0 <= float(margin) <= 1.0:
            raise ConfigError(f"margin must lie in [0, 1] (it is a gap between probabilities); got {margin!r}")
        if variant not in ("peaked", "printed"):
            raise ConfigError(f"ordinal variant must be 'peaked' or 'printed'; got {variant!r}")
        if pair_reduction not in ("sum", "mean"):
            raise ConfigError(f"pair_reduction must be 'sum' or 'mean'; got {pair_reduction!r}")
        self.num_classes = int(num_classes)
        self.alpha = float(alpha)
        self.margin = float(margin)
        self.variant: Variant = variant
        self.pair_reduction: PairReduction = pair_reduction
        self.ce = nn.CrossEntropyLoss(label_smoothing=label_smoothing)

    def extra_repr(self) -> str:
        return (f"num_classes={self.num_classes}, alpha={self.alpha}, margin={self.margin}, "
                f"variant={self.variant!r}, pair_reduction={self.pair_reduction!r}")

    def rank(self, logits: Tensor, target: Tensor) -> Tensor:
        """The RankLoss term alone (validated)."""
        target = _single_label_target(logits, target, self.num_classes)
        return rank_loss(logits.softmax(dim=1), target, self.margin, self.variant, self.pair_reduction)

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        target = _single_label_target(logits, target, self.num_classes)
        ce = self.ce(logits, target)
        r = rank_loss(logits.softmax(dim=1), target, self.margin, self.variant, self.pair_reduction)
        return self.alpha * r + (1.0 - self.alpha) * ce


# --------------------------------------------------------------------------- factory
def default_loss_name(task: str) -> str:
    """``"bce"`` for the multi-label task, ``"ce"`` for every single-label task (ordinal included: the Ordinal
    Loss is opt-in, ``--loss ordinal``)."""
    check_task(task)
    return "bce" if task == MULTI_LABEL else "ce"


def build_loss(name: str, task: str, num_classes: int, *, alpha: float = 0.2, margin: float = 0.1,
               label_smoothing: float = 0.0, ordinal_variant: Variant = "peaked",
               pair_reduction: PairReduction = "sum") -> nn.Module:
    """Build loss ``name`` (``"ce"``, ``"nll"``, ``"bce"``, ``"ordinal"``) for ``task``; ``num_classes`` is the
    number of logits (labels for multi-label). Incompatible combinations raise :class:`ConfigError`."""
    check_task(task)
    if name not in LOSS_NAMES:
        raise ConfigError(f"unknown loss {name!r}; known losses: {', '.join(LOSS_NAMES)}")
    if isinstance(num_classes, bool) or int(num_classes) != num_classes or num_classes < 1:
        raise ConfigError(f"num_classes must be a positive integer; got {num_classes!r}")
    num_classes = int(num_classes)
    if not 0.0 <= float(label_smoothing) < 1.0:
        raise ConfigError(f"label_smoothing must lie in [0, 1); got {label_smoothing!r}")
    if task == MULTI_LABEL:
        if name != "bce":
            raise ConfigError(f"loss {name!r} does not fit the multi-label task; use 'bce' (sigmoid per label)")
        if label_smoothing:
            raise ConfigError("label_smoothing is not supported with 'bce'")
        return BCEWithLogits(num_classes)
    if num_classes < 2:
        raise ConfigError(f"a single-label task needs num_classes >= 2; got {num_classes}")
    if name == "bce":
        raise ConfigError(f"loss 'bce' needs the multi-label task; for {task!r} use 'ce'")
    if name == "ce":
        return CrossEntropy(num_classes, label_smoothing=label_smoothing)
    if name == "nll":
        if label_smoothing:
            raise ConfigError("label_smoothing is not supported with 'nll'; use 'ce'")
        return LogSoftmaxNLL(num_classes)
    if task != ORDINAL:
        raise ConfigError(f"loss {name!r} needs task {ORDINAL!r} (ordered grades); got {task!r}")
    if name == "corn":
        if label_smoothing:
            raise ConfigError("label_smoothing is not supported with 'corn'")
        return CornLoss(num_classes)
    return OrdinalLoss(num_classes, alpha=alpha, margin=margin, variant=ordinal_variant,
                       pair_reduction=pair_reduction, label_smoothing=label_smoothing)


class CornLoss(nn.Module):
    """The CORN loss (coral-pytorch's ``corn_loss``) of a model with a CORN head: its outputs are class
    log-probabilities, from which the conditional logits are recovered exactly (``models.rank_head``)."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.num_classes = num_classes

    def forward(self, log_probs: Tensor, target: Tensor) -> Tensor:
        from coral_pytorch.losses import corn_loss

        from .models.rank_head import rank_logits

        y = _single_label_target(log_probs, target, self.num_classes)
        return corn_loss(rank_logits(log_probs), y, self.num_classes)


def distillation_loss(student: Tensor, teacher: Tensor, multi_label: bool, temperature: float = 2.0) -> Tensor:
    """Hinton et al.'s soft-label term: ``T^2 * KL(softmax(teacher / T) || softmax(student / T))`` per image, mean
    over the batch (multi-label: the binary cross-entropy to the teacher's sigmoid at ``T``, mean over labels,
    times ``T^2``). ``T^2`` keeps the gradient scale of the hard-label loss as ``T`` changes."""
    t = float(temperature)
    s, q = student.float() / t, teacher.float() / t
    if multi_label:
        return t * t * F.binary_cross_entropy_with_logits(s, torch.sigmoid(q))
    return t * t * F.kl_div(F.log_softmax(s, dim=1), F.log_softmax(q, dim=1), log_target=True, reduction="batchmean")
