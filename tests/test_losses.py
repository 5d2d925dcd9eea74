"""Losses: factory, target validation and the Ordinal Loss with hand-computed values.

Pair order for C classes is (0,1), (0,2), ..., (C-2,C-1) (torch.triu_indices).
peaked : s = sign(y - (i+j)/2); term = |s| * max(0, s (p_i - p_j) + m_ij), m_ij = margin iff y in {i, j} else 0
printed: t = +1 if y > (i+j)/2 else -1; term = max(0, -t (p_i - p_j) + margin)
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from medmix.errors import ConfigError
from medmix.losses import (
    LOSS_NAMES,
    OrdinalLoss,
    build_loss,
    default_loss_name,
    rank_loss,
    rank_loss_terms,
)

ORD = "ordinal-regression"
ML = "multi-label, binary-class"


def P(*rows: list[float]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


def Y(*labels: int) -> torch.Tensor:
    return torch.tensor(labels, dtype=torch.long)


# --------------------------------------------------------------------------- hand-computed ordinal examples
def test_three_class_peaked_by_hand() -> None:
    # C=3, y=1, p=(.5, .35, .15), margin .1. Pairs and midpoints: (0,1) .5, (0,2) 1, (1,2) 1.5
    # (0,1): y > .5 -> s=+1, contains y -> m=.1: max(0, p0 - p1 + .1) = .5 - .35 + .1 = .25
    # (0,2): y == 1 -> tie -> 0
    # (1,2): y < 1.5 -> s=-1, contains y -> m=.1: max(0, p2 - p1 + .1) = max(0, .15 - .35 + .1) = 0
    terms = rank_loss_terms(P([0.5, 0.35, 0.15]), Y(1), margin=0.1, variant="peaked")
    torch.testing.assert_close(terms, P([0.25, 0.0, 0.0]))
    assert rank_loss(P([0.5, 0.35, 0.15]), Y(1)).item() == pytest.approx(0.25)
    # mean over the C(C-1)/2 = 3 pairs: .25 / 3
    assert rank_loss(P([0.5, 0.35, 0.15]), Y(1), pair_reduction="mean").item() == pytest.approx(0.25 / 3)


def test_three_class_printed_by_hand() -> None:
    # Same input, printed rule t = +1 if y > (i+j)/2 else -1, term = max(0, -t (p_i - p_j) + .1)
    # (0,1): t=+1: max(0, -(.5 - .35) + .1) = max(0, -.05) = 0
    # (0,2): tie, y > 1 is false -> t=-1: max(0, (.5 - .15) + .1) = .45
    # (1,2): y > 1.5 false -> t=-1: max(0, (.35 - .15) + .1) = .30       sum = .75
    terms = rank_loss_terms(P([0.5, 0.35, 0.15]), Y(1), margin=0.1, variant="printed")
    torch.testing.assert_close(terms, P([0.0, 0.45, 0.30]))
    assert rank_loss(P([0.5, 0.35, 0.15]), Y(1), variant="printed").item() == pytest.approx(0.75)


def test_tie_pair() -> None:
    # C=3, y=1: pair (0,2) has midpoint 1 == y. p1 = .6 dominates, so the two label pairs are satisfied:
    # (0,1): max(0, p0 - .6 + .1) = 0 and (1,2): max(0, p2 - .6 + .1) = 0 for p0, p2 in {.1, .3}.
    # peaked: the tie pair contributes 0 whichever of p0, p2 is larger -> total 0 for both.
    for p in ([0.3, 0.6, 0.1], [0.1, 0.6, 0.3]):
        assert rank_loss_terms(P(p), Y(1))[0, 1].item() == 0.0
        assert rank_loss(P(p), Y(1)).item() == 0.0
    # printed: tie -> t = -1 -> max(0, p0 - p2 + .1):  p=(.3,.6,.1): .3 - .1 + .1 = .3 ; p=(.1,.6,.3): max(0, -.1) = 0
    assert rank_loss_terms(P([0.3, 0.6, 0.1]), Y(1), variant="printed")[0, 1].item() == pytest.approx(0.3)
    assert rank_loss_terms(P([0.1, 0.6, 0.3]), Y(1), variant="printed")[0, 1].item() == 0.0
    # C=5, y=2: tie pairs are (1,3) and (0,4) (positions 5 and 3 in triu order) -> always 0 in "peaked"
    terms = rank_loss_terms(P([0.4, 0.0, 0.2, 0.0, 0.4]), Y(2))
    pairs = list(zip(*torch.triu_indices(5, 5, 1).tolist()))
    assert terms[0, pairs.index((1, 3))].item() == 0.0
    assert terms[0, pairs.index((0, 4))].item() == 0.0


def test_sharply_unimodal_at_label_is_zero() -> None:
    # one-hot at y: label pairs p_k - p_y + .1 = -.9 -> 0; other pairs both 0 -> max(0, 0 + 0) = 0
    for y in range(5):
        onehot = torch.zeros(1, 5, dtype=torch.float64)
        onehot[0, y] = 1.0
        assert rank_loss(onehot, Y(y)).item() == 0.0
    # a soft unimodal distribution, non-increasing in |k - y|, mode .45 above its neighbours: also 0
    # y=2, p=(.05,.15,.6,.15,.05): (0,1) s=+1 max(0,.05-.15)=0; (3,4) s=-1 max(0,.05-.15)=0;
    # (0,3) s=+1 max(0,.05-.15)=0; (1,4) s=-1 max(0,.05-.15)=0; label pairs max(0,p_k-.6+.1)=0; ties 0
    assert rank_loss(P([0.05, 0.15, 0.6, 0.15, 0.05]), Y(2)).item() == 0.0
    # from logits: softmax(0,0,30,0,0) has equal off-label masses -> rank loss exactly 0, full loss = (1-a) CE
    logits = torch.tensor([[0.0, 0.0, 30.0, 0.0, 0.0]])
    loss = OrdinalLoss(5, alpha=0.2, margin=0.1)
    assert loss.rank(logits, Y(2)).item() == 0.0
    assert loss(logits, Y(2)).item() == pytest.approx(0.8 * F.cross_entropy(logits, Y(2)).item())


def test_peaked_far_from_label_is_large() -> None:
    # y=0 (all midpoints >= .5 > y, so s=-1: term = max(0, p_j - p_i + m_ij)), p = one-hot at 4:
    #   (0,4) label pair: 1 - 0 + .1 = 1.1 ; (1,4), (2,4), (3,4): 1 - 0 + 0 = 1 each -> 3
    #   (0,1), (0,2), (0,3) label pairs: 0 - 0 + .1 = .1 each -> .3 ; (1,2), (1,3), (2,3): 0
    #   sum = 1.1 + 3 + .3 = 4.4 (mean over 10 pairs: .44) -- versus 0 for the one-hot at the label
    far = P([0.0, 0.0, 0.0, 0.0, 1.0])
    assert rank_loss(far, Y(0)).item() == pytest.approx(4.4)
    assert rank_loss(far, Y(0), pair_reduction="mean").item() == pytest.approx(0.44)
    # bimodal (mass at the label and far away) is penalised too: p=(.6,0,0,0,.4), y=0
    #   (0,4): max(0, .4 - .6 + .1) = 0 ; (1,4),(2,4),(3,4): max(0, .4 - 0) = .4 each -> 1.2 ;
    #   (0,1..3): max(0, 0 - .6 + .1) = 0 ; (1,2),(1,3),(2,3): 0   -> total 1.2
    assert rank_loss(P([0.6, 0.0, 0.0, 0.0, 0.4]), Y(0)).item() == pytest.approx(1.2)


def test_printed_variant_pushes_away() -> None:
    # y=4: every midpoint < 4, t=+1 everywhere: term = max(0, p_j - p_i + .1)
    # peaked at label p=e4: pairs (i,4): 1 - 0 + .1 = 1.1 x 4 = 4.4 ; 6 other pairs 0 - 0 + .1 = .6 -> 5.0
    # anti-peaked p=e0:    pairs (0,j): 0 - 1 + .1 < 0 -> 0 ; 6 other pairs .1 each -> .6
    at_label, away = P([0.0, 0.0, 0.0, 0.0, 1.0]), P([1.0, 0.0, 0.0, 0.0, 0.0])
    printed_at = rank_loss(at_label, Y(4), variant="printed").item()
    printed_away = rank_loss(away, Y(4), variant="printed").item()
    assert printed_at == pytest.approx(5.0)
    assert printed_away == pytest.approx(0.6)
    assert printed_away < printed_at  # the printed formula prefers mass away from the true grade
    # the peaked variant does the opposite: 0 at the label, 4.4 for e0 (mirror of the y=0 example above)
    assert rank_loss(at_label, Y(4)).item() == 0.0
    assert rank_loss(away, Y(4)).item() == pytest.approx(4.4)


def test_combined_loss_by_hand() -> None:
    # logits = log p  ->  softmax = p, CE = -log p_y. C=3, y=1, p=(.5,.35,.15): rank_peaked = .25 (above)
    p = torch.tensor([[0.5, 0.35, 0.15]], dtype=torch.float64)
    loss = OrdinalLoss(3, alpha=0.2, margin=0.1)
    expected = 0.2 * 0.25 + 0.8 * (-math.log(0.35))
    assert loss(p.log(), Y(1)).item() == pytest.approx(expected, rel=1e-12)
    printed = OrdinalLoss(3, alpha=0.2, margin=0.1, variant="printed")
    assert printed(p.log(), Y(1)).item() == pytest.approx(0.2 * 0.75 + 0.8 * (-math.log(0.35)), rel=1e-12)


def test_batch_is_vectorised_mean() -> None:
    # batch mean of the per-sample sums: (.25 + 4.4) / 2
    probs = P([0.5, 0.35, 0.15, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0, 1.0])
    # row 0 for C=5, y=1: (0,1) s=+1: .5-.35+.1=.25 ; (1,2) s=-1: .15-.35+.1<0 ; (1,3),(1,4): 0-.35+.1<0 ;
    # (0,2) tie ; (0,3) mid 1.5 s=-1: max(0, p3 - p0) = 0 ; (0,4) mid 2 s=-1: 0 ; (2,3),(2,4),(3,4) s=-1: p_j - p_i <= 0
    assert rank_loss(probs[:1], Y(1)).item() == pytest.approx(0.25)
    assert rank_loss(probs, Y(1, 0)).item() == pytest.approx((0.25 + 4.4) / 2)


def test_alpha_zero_is_ce_exactly() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 5, generator=g)
    y = torch.randint(0, 5, (64,), generator=g)
    for variant in ("peaked", "printed"):
        out = OrdinalLoss(5, alpha=0.0, variant=variant)(logits, y)
        assert torch.equal(out, F.cross_entropy(logits, y))


def test_gradient_flows_and_points_to_label() -> None:
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(16, 5, generator=g, requires_grad=True)
    y = torch.randint(0, 5, (16,), generator=g)
    OrdinalLoss(5, alpha=0.5)(logits, y).backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0
    # rank term alone, distribution peaked far from y=0: descending the gradient must raise the label's logit
    far = torch.tensor([[0.0, 0.0, 0.0, 0.0, 5.0]], requires_grad=True)
    OrdinalLoss(5, alpha=1.0).rank(far, Y(0)).backward()
    assert far.grad is not None and far.grad[0, 0] < 0 and far.grad[0, 4] > 0
    # and a few SGD steps on the full loss move the argmax to the label
    x = far.detach().clone().requires_grad_(True)
    opt = torch.optim.SGD([x], lr=1.0)
    loss = OrdinalLoss(5, alpha=0.5)
    for _ in range(50):
        opt.zero_grad()
        loss(x, Y(0)).backward()
        opt.step()
    assert int(x.argmax()) == 0


# --------------------------------------------------------------------------- factory and validation
def test_nll_matches_ce() -> None:
    g = torch.Generator().manual_seed(2)
    for n, c in ((1, 2), (32, 5), (128, 9)):
        logits = torch.randn(n, c, generator=g) * 3
        y = torch.randint(0, c, (n,), generator=g)
        ce = build_loss("ce", "multi-class", c)(logits, y)
        nll = build_loss("nll", "multi-class", c)(logits, y)
        assert abs(ce.item() - nll.item()) < 1e-6


def test_build_loss_kinds() -> None:
    assert isinstance(build_loss("ce", "multi-class", 9), nn.CrossEntropyLoss)
    assert isinstance(build_loss("bce", ML, 14), nn.BCEWithLogitsLoss)
    ordinal = build_loss("ordinal", ORD, 5, alpha=0.3, margin=0.05, ordinal_variant="printed")
    assert isinstance(ordinal, OrdinalLoss)
    assert (ordinal.alpha, ordinal.margin, ordinal.variant) == (0.3, 0.05, "printed")
    assert default_loss_name(ML) == "bce"
    assert default_loss_name(ORD) == default_loss_name("multi-class") == default_loss_name("binary-class") == "ce"
    smooth = build_loss("ce", "multi-class", 4, label_smoothing=0.1)
    logits, y = torch.randn(8, 4), torch.randint(0, 4, (8,))
    torch.testing.assert_close(smooth(logits, y), F.cross_entropy(logits, y, label_smoothing=0.1))


def test_bce_multi_label_targets() -> None:
    logits = torch.randn(6, 14)
    target = torch.randint(0, 2, (6, 14), dtype=torch.uint8)  # medmnist stores uint8
    out = build_loss("bce", ML, 14)(logits, target)
    torch.testing.assert_close(out, F.binary_cross_entropy_with_logits(logits, target.float()))
    with pytest.raises(ConfigError, match="shape"):
        build_loss("bce", ML, 14)(logits, target[:, :13])
    with pytest.raises(ConfigError, match=r"\[0, 1\]"):
        build_loss("bce", ML, 14)(logits, target.float() * 2)


def test_target_with_trailing_axis_accepted() -> None:
    logits, y = torch.randn(4, 3), torch.tensor([[0], [2], [1], [1]])
    torch.testing.assert_close(build_loss("ce", "multi-class", 3)(logits, y), F.cross_entropy(logits, y[:, 0]))


@pytest.mark.parametrize("name,task", [("ce", "multi-class"), ("nll", "multi-class"), ("ordinal", ORD)])
def test_label_out_of_range(name: str, task: str) -> None:
    loss = build_loss(name, task, 5)
    with pytest.raises(ConfigError, match=r"\[0, 4\].*max 5"):
        loss(torch.randn(3, 5), Y(0, 5, 1))
    with pytest.raises(ConfigError, match="min -1"):
        loss(torch.randn(3, 5), Y(0, -1, 1))
    with pytest.raises(ConfigError, match="integer"):
        loss(torch.randn(3, 5), torch.tensor([0.0, 1.0, 2.0]))
    with pytest.raises(ConfigError, match=r"\(N, 5\)"):
        loss(torch.randn(3, 4), Y(0, 1, 2))


def test_bad_configurations() -> None:
    with pytest.raises(ConfigError) as e:
        build_loss("focal", "multi-class", 3)
    for known in LOSS_NAMES:
        assert known in str(e.value)
    for name in ("ce", "nll", "ordinal"):
        with pytest.raises(ConfigError, match="multi-label"):
            build_loss(name, ML, 14)
    with pytest.raises(ConfigError, match="multi-label"):
        build_loss("bce", "multi-class", 3)
    with pytest.raises(ConfigError, match="ordinal-regression"):
        build_loss("ordinal", "multi-class", 3)
    with pytest.raises(ConfigError, match="unknown task"):
        build_loss("ce", "regression", 3)
    with pytest.raises(ConfigError, match="alpha"):
        OrdinalLoss(5, alpha=1.5)
    with pytest.raises(ConfigError, match="variant"):
        OrdinalLoss(5, variant="reversed")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="pair_reduction"):
        OrdinalLoss(5, pair_reduction="max")  # type: ignore[arg-type]
