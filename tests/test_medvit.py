"""MedViT (medmix.models.medvit): shapes, gradients, learning, parameter counts and the official block layout."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from medmix.models import create_model
from medmix.models.medvit import E_MHSA, ECB, LTB, MedViT

# Parameter counts with a 9-class head and 3 input channels. They equal the official implementation's counts
# (github.com/Omid-Nejati/MedViT, MedViT.py), see the module docstring; 1 input channel is 64 * 2 * 9 = 1,152 fewer.
OFFICIAL_PARAMS = {"medvit_small": 31_145_665, "medvit_base": 44_415_197, "medvit_large": 57_684_729}
DOCUMENTED_RANGE = {"medvit_small": (30e6, 32e6), "medvit_base": (43e6, 46e6), "medvit_large": (56e6, 59e6)}
DEPTHS = {"medvit_small": (3, 4, 10, 3), "medvit_base": (3, 4, 20, 3), "medvit_large": (3, 4, 30, 3)}
NUM_CLASSES = 3


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _build_small(in_chans: int) -> MedViT:
    torch.manual_seed(0)
    return create_model("medvit_small", num_classes=NUM_CLASSES, in_chans=in_chans, img_size=28, drop_path_rate=0.1)


@pytest.fixture(scope="module")
def small_1ch() -> MedViT:
    return _build_small(1)


@pytest.fixture(scope="module")
def small_3ch() -> MedViT:
    return _build_small(3)


@pytest.fixture(params=[1, 3], ids=["1ch", "3ch"])
def small(request: pytest.FixtureRequest) -> MedViT:
    return request.getfixturevalue(f"small_{request.param}ch")


def _expected_ltb_indices(depths: tuple[int, ...]) -> dict[int, int]:
    """Block index -> stage of every LTB under the official layout."""
    d0, d1, d2, d3 = depths
    out = {d0 + d1 - 1: 1}
    start = d0 + d1
    out.update({start + 5 * g + 4: 2 for g in range(d2 // 5)})
    out[d0 + d1 + d2 + d3 - 1] = 3
    return out


@pytest.mark.parametrize("size", [28, 64])
def test_small_forward_backward(small: MedViT, size: int) -> None:
    torch.manual_seed(1)
    small.train()
    small.zero_grad(set_to_none=True)
    x = torch.randn(2, small.in_chans, size, size)
    out = small(x)
    assert out.shape == (2, NUM_CLASSES)
    assert torch.isfinite(out).all()
    F.cross_entropy(out, torch.tensor([0, 2])).backward()
    grad = small.stem[0].conv.weight.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
    assert small.proj_head[0].weight.grad is not None


def test_small_forward_backward_224(small_1ch: MedViT) -> None:
    """One 224 px pass (1 channel, batch 1); 3 channels are covered at 28 and 64 px."""
    small = small_1ch
    torch.manual_seed(2)
    small.train()
    small.zero_grad(set_to_none=True)
    feats = small.forward_features(torch.randn(1, 1, 224, 224))
    assert feats.shape == (1, 1024, 7, 7)
    out = small.forward_head(feats)
    assert out.shape == (1, NUM_CLASSES) and torch.isfinite(out).all()
    F.cross_entropy(out, torch.tensor([1])).backward()
    grad = small.stem[0].conv.weight.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
    small.zero_grad(set_to_none=True)


@pytest.mark.parametrize(("size", "final"), [(28, 1), (30, 1), (64, 2)])
def test_feature_map_and_head(small: MedViT, size: int, final: int) -> None:
    small.eval()
    with torch.no_grad():
        x = torch.randn(2, small.in_chans, size, size)
        feats = small.forward_features(x)
        assert feats.shape == (2, small.num_features, final, final) and small.num_features == 1024
        assert small.forward_head(feats, pre_logits=True).shape == (2, 1024)
        torch.testing.assert_close(small.forward_head(feats), small(x))


def test_grad_checkpointing_matches(small_3ch: MedViT) -> None:
    small = small_3ch
    small.eval()
    x = torch.randn(2, small.in_chans, 28, 28)
    ref = small(x)
    small.set_grad_checkpointing(True)
    try:
        out = small(x)
        out.sum().backward()
    finally:
        small.set_grad_checkpointing(False)
        small.zero_grad(set_to_none=True)
    torch.testing.assert_close(out, ref)


def test_adam_steps_lower_the_loss(small_1ch: MedViT) -> None:
    torch.manual_seed(3)
    model = copy.deepcopy(small_1ch).train()  # a fresh copy: the shared fixture keeps its weights
    y = torch.arange(6) % NUM_CLASSES
    # one fixed, learnable batch: each class has its own mean intensity
    x = 0.5 * torch.randn(6, 1, 28, 28) + y.view(6, 1, 1, 1).float() - 1.0
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)  # 1e-3 makes a 31 M-parameter model oscillate
    losses = []
    for _ in range(4):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.5 * losses[0], losses


@pytest.mark.parametrize("name", ["medvit_base", "medvit_large"])
def test_big_models_build_count_and_run_at_28(name: str) -> None:
    torch.manual_seed(4)
    model = create_model(name, num_classes=9, in_chans=3, img_size=224)
    n = _n_params(model)
    lo, hi = DOCUMENTED_RANGE[name]
    assert n == OFFICIAL_PARAMS[name] and lo < n < hi
    model.eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 28, 28))
    assert out.shape == (2, 9) and torch.isfinite(out).all()


def test_small_param_count(small: MedViT) -> None:
    with torch.device("meta"):
        model = create_model("medvit_small", num_classes=9, in_chans=3, img_size=224)
    n = _n_params(model)
    lo, hi = DOCUMENTED_RANGE["medvit_small"]
    assert n == OFFICIAL_PARAMS["medvit_small"] and lo < n < hi
    # the fixtures differ only in the stem's input channels and the head size
    head_diff = (9 - NUM_CLASSES) * (1024 + 1)
    assert _n_params(small) == n - head_diff - (3 - small.in_chans) * 64 * 9


@pytest.mark.parametrize("name", list(DEPTHS))
def test_official_layout(name: str) -> None:
    with torch.device("meta"):  # structure only: no weights needed
        model = create_model(name, num_classes=9, in_chans=3, img_size=224, drop_path_rate=0.2)
    depths = DEPTHS[name]
    blocks = list(model.features)
    assert len(blocks) == sum(depths) and model.depths == depths
    assert [model.block_stage.count(s) for s in range(4)] == list(depths)
    assert all(isinstance(b, (ECB, LTB)) for b in blocks)

    ltbs = {i: model.block_stage[i] for i, b in enumerate(blocks) if isinstance(b, LTB)}
    assert ltbs == _expected_ltb_indices(depths)
    if name == "medvit_small":
        assert sorted(ltbs) == [6, 11, 16, 19]
    # sr ratios 8/4/2/1 by stage; stage 0 has no LTB, so 8 is unused (as in the official code)
    assert {ltbs[i]: blocks[i].sr_ratio for i in ltbs} == {1: 4, 2: 2, 3: 1}
    assert {blocks[i].e_mhsa.sr_ratio for i, s in ltbs.items() if s == 2} == {2}
    assert all(isinstance(blocks[i].e_mhsa.norm, nn.BatchNorm1d) for i, s in ltbs.items() if s < 3)
    assert not hasattr(blocks[max(ltbs)].e_mhsa, "norm")

    # widths: LTBs close with 256 / 512 / 1024 channels, 75 % of them (rounded to 32) from E_MHSA
    widths = {1: (256, 192), 2: (512, 384), 3: (1024, 768)}
    for i, s in ltbs.items():
        assert (blocks[i].out_channels, blocks[i].mhsa_out_channels) == widths[s]
    stage_widths = {0: {96}, 1: {192, 256}, 2: {384, 512}, 3: {768, 1024}}
    assert all(b.out_channels in stage_widths[s] for b, s in zip(blocks, model.block_stage))

    # stride 2 exactly at the first block of stages 1-3
    first = [sum(depths[:s]) for s in range(4)]
    pooled = [i for i, b in enumerate(blocks) if isinstance(b.patch_embed.avgpool, nn.AvgPool2d)]
    assert pooled == first[1:]

    # stochastic depth rises linearly from 0 (first block) to drop_path_rate (last block, split 0.75 / 0.25)
    assert isinstance(blocks[0].attention_path_dropout, nn.Identity)
    assert blocks[-1].mhsa_path_dropout.drop_prob == pytest.approx(0.2 * 0.75)
    assert blocks[-1].mhca_path_dropout.drop_prob == pytest.approx(0.2 * 0.25)
    assert blocks[1].attention_path_dropout.drop_prob == pytest.approx(0.2 / (sum(depths) - 1))


def test_official_state_dict_names(small: MedViT) -> None:
    sd = small.state_dict()
    assert len(sd) == 832  # number of entries in the official MedViT_small state dict
    assert sd["stem.0.conv.weight"].shape == (64, small.in_chans, 3, 3)
    assert sd["stem.3.norm.running_var"].shape == (64,)
    assert sd["features.0.patch_embed.conv.weight"].shape == (96, 64, 1, 1)
    assert sd["features.3.patch_embed.norm.weight"].shape == (192,)
    assert sd["features.0.mhca.group_conv3x3.weight"].shape == (96, 32, 3, 3)
    assert sd["features.0.conv.conv.0.weight"].shape == (288, 96, 1, 1)
    assert sd["features.0.conv.conv.3.weight"].shape == (288, 1, 3, 3)
    assert sd["features.0.conv.conv.6.fc.0.weight"].shape == (3, 288)  # SE reduction = block width
    assert sd["features.0.conv.conv.8.running_mean"].shape == (96,)
    assert sd["features.6.e_mhsa.q.weight"].shape == (192, 192)
    assert sd["features.6.e_mhsa.norm.running_mean"].shape == (192,)
    assert sd["features.6.projection.conv.weight"].shape == (64, 192, 1, 1)
    assert sd["features.6.norm2.weight"].shape == (256,)
    assert sd["features.19.conv.conv.0.weight"].shape == (2048, 1024, 1, 1)
    assert sd["norm.running_mean"].shape == (1024,)
    assert sd["proj_head.0.weight"].shape == (NUM_CLASSES, 1024)


def _reference_e_mhsa(m: E_MHSA, x: torch.Tensor) -> torch.Tensor:
    """The official E_MHSA forward (explicit softmax attention, AvgPool1d of sr**2 over the token sequence)."""
    B, N, C = x.shape
    h = m.num_heads
    q = m.q(x).reshape(B, N, h, C // h).permute(0, 2, 1, 3)
    kv = x
    if m.sr_ratio > 1:
        kv = m.norm(nn.AvgPool1d(m.N_ratio, m.N_ratio)(x.transpose(1, 2))).transpose(1, 2)
    k = m.k(kv).reshape(B, -1, h, C // h).permute(0, 2, 3, 1)
    v = m.v(kv).reshape(B, -1, h, C // h).permute(0, 2, 1, 3)
    attn = ((q @ k) * m.scale).softmax(dim=-1)
    return m.proj((attn @ v).transpose(1, 2).reshape(B, N, C))


@pytest.mark.parametrize("sr", [1, 2, 4])
def test_e_mhsa_matches_official_and_clamps(sr: int) -> None:
    torch.manual_seed(5)
    m = E_MHSA(64, head_dim=32, sr_ratio=sr).eval()
    if sr > 1:
        m.norm.running_mean.normal_()
        m.norm.running_var.uniform_(0.5, 2.0)
    with torch.no_grad():
        x = torch.randn(2, 64, 64)
        torch.testing.assert_close(m(x), _reference_e_mhsa(m, x))
        tiny = torch.randn(2, 2, 64)  # fewer tokens than sr**2: the kernel is clamped instead of failing
        assert m(tiny).shape == (2, 2, 64)


def test_bad_configs_raise() -> None:
    with pytest.raises(ValueError):
        MedViT(depths=(3, 4, 7, 3))
    with pytest.raises(ValueError):
        create_model("medvit_small", img_size=16)  # below the registered minimum of 28 px


def test_create_model_keeps_the_official_stochastic_depth_unless_given() -> None:
    """create_model (and `medmix train` without --drop-path-rate) no longer overrides the builders' defaults."""
    from medmix.engine import TrainConfig

    default = create_model("medvit_small", num_classes=2, in_chans=1, img_size=28)
    assert list(default.features)[-1].mhsa_path_dropout.drop_prob == pytest.approx(0.1 * 0.75)
    off = create_model("medvit_small", num_classes=2, in_chans=1, img_size=28, drop_path_rate=0.0)
    assert isinstance(list(off.features)[-1].mhsa_path_dropout, nn.Identity)
    assert TrainConfig().drop_path_rate is None
