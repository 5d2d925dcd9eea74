"""Tests for the CNN + Transformer model (``cnn_transformer``): shapes, gradients, training, registry, geometry.

Reference parameter counts (6 classes, 1 channel): 293,350 at 28 px, 300,390 at 64 px (default), 392,550 at
224 px; only the learned positional embedding (N x 128) depends on the image size, 3 channels add 576.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from medmix.errors import ConfigError
from medmix.models import create_model, list_models, model_info
from medmix.models.cnn_transformer import CNNTransformer, ConvBlock, TransformerBlock, sincos_pos_embed_2d


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Run this module single-threaded: these tiny batches gain little from 2 threads, and with other jobs on the
    machine OpenMP oversubscription made 2-thread runs ~10x slower. The previous setting is restored."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def test_registered() -> None:
    assert "cnn_transformer" in list_models()
    info = model_info("cnn_transformer")
    assert info.family == "cnn_transformer"
    assert info.default_img_size == 64 and info.min_img_size == 28
    assert info.paper


@pytest.mark.parametrize("in_chans", [1, 3])
@pytest.mark.parametrize("img_size", [28, 64, 224])
def test_forward_backward(img_size: int, in_chans: int) -> None:
    model = create_model("cnn_transformer", num_classes=6, in_chans=in_chans, img_size=img_size, drop_rate=0.3)
    assert isinstance(model, CNNTransformer)
    model.train()
    x = torch.randn(2, in_chans, img_size, img_size)
    logits = model(x)
    assert logits.shape == (2, 6)
    assert torch.isfinite(logits).all()
    F.cross_entropy(logits, torch.tensor([0, 5])).backward()
    first_conv = model.stages[0].conv.weight
    assert first_conv.shape[1] == in_chans
    assert first_conv.grad is not None and torch.isfinite(first_conv.grad).all()
    assert first_conv.grad.abs().sum() > 0
    assert model.pos_embed is not None and model.pos_embed.grad.abs().sum() > 0


@pytest.mark.parametrize(("img_size", "grid"), [(28, (3, 3)), (64, (8, 8)), (224, (28, 28))])
def test_tokens_and_grid(img_size: int, grid: tuple[int, int]) -> None:
    model = create_model("cnn_transformer", num_classes=6, in_chans=1, img_size=img_size).eval()
    assert model.grid_size == grid
    assert model.num_tokens == grid[0] * grid[1]
    assert model.pos_embed.shape == (1, grid[0] * grid[1], 128)
    x = torch.randn(2, 1, img_size, img_size)
    with torch.no_grad():
        tokens = model.forward_features(x)
        assert tokens.shape == (2, grid[0] * grid[1], 128)
        assert model.feature_grid(x) == grid
        fmap = model.tokens_to_map(tokens)
        assert fmap.shape == (2, 128, *grid)
        # token n = row-major position (n // w, n % w) of the map
        assert torch.equal(fmap[:, :, 1, 2], tokens[:, 1 * grid[1] + 2])
        pooled = model.forward_head(tokens, pre_logits=True)
        assert pooled.shape == (2, 128)
        torch.testing.assert_close(model.forward_head(tokens), model(x))


def test_gradcam_layer_is_last_conv_map() -> None:
    model = create_model("cnn_transformer", num_classes=6, in_chans=1, img_size=64).eval()
    assert model.gradcam_layer is model.stages[-1]
    assert isinstance(model.gradcam_layer, ConvBlock)
    seen: dict[str, torch.Tensor] = {}
    handle = model.gradcam_layer.register_forward_hook(lambda m, i, o: seen.__setitem__("map", o))
    x = torch.randn(1, 1, 64, 64)
    tokens = model.forward_features(x)
    handle.remove()
    assert seen["map"].shape == (1, 128, *model.feature_grid(x))
    assert tokens.shape[1] == seen["map"].shape[-2] * seen["map"].shape[-1]


def test_non_square_input_and_grid_helper() -> None:
    model = create_model("cnn_transformer", num_classes=2, in_chans=1, img_size=64).eval()
    x = torch.randn(1, 1, 48, 80)
    grid = model.feature_grid(x)
    assert grid == (6, 10) == model.feature_grid((48, 80))
    with torch.no_grad():
        tokens = model.forward_features(x)
    assert model.tokens_to_map(tokens, grid).shape == (1, 128, 6, 10)
    with pytest.raises(ValueError):
        model.tokens_to_map(tokens)  # 60 tokens: not the default grid and not square


def test_pos_embed_interpolates_to_other_sizes() -> None:
    model = create_model("cnn_transformer", num_classes=4, in_chans=1, img_size=64).eval()
    with torch.no_grad():
        for size in (28, 64, 224):
            out = model(torch.randn(2, 1, size, size))
            assert out.shape == (2, 4) and torch.isfinite(out).all()


def test_sincos_and_depth_options() -> None:
    model = create_model("cnn_transformer", num_classes=3, in_chans=3, img_size=28, pos_embed="sincos", depth=2,
                         drop_path_rate=0.1)
    assert model.pos_embed is None
    assert len(model.blocks) == 2 and all(isinstance(b, TransformerBlock) for b in model.blocks)
    out = model(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 3) and torch.isfinite(out).all()
    pe = sincos_pos_embed_2d(3, 4, 128)
    assert pe.shape == (1, 12, 128) and pe.abs().max() <= 1.0
    assert create_model("cnn_transformer", pos_embed="none").pos_embed is None


def test_transformer_has_four_heads_by_default() -> None:
    model = create_model("cnn_transformer", num_classes=6)
    attn = model.blocks[0].attn
    assert attn.num_heads == 4 and attn.head_dim == 32
    assert model.blocks[0].mlp.fc1.out_features == 512
    assert [b.conv.out_channels for b in model.stages] == [32, 64, 128]


def test_param_counts() -> None:
    """Documented counts: 300,390 at the defaults (64 px, 6 classes, 1 channel)."""
    assert n_params(create_model("cnn_transformer", num_classes=6, in_chans=1, img_size=64)) == 300_390
    assert n_params(create_model("cnn_transformer", num_classes=6, in_chans=1, img_size=28)) == 293_350
    assert n_params(create_model("cnn_transformer", num_classes=6, in_chans=1, img_size=224)) == 392_550
    assert n_params(create_model("cnn_transformer", num_classes=6, in_chans=3, img_size=64)) == 300_966
    for size in (28, 64, 224):
        assert 0.25e6 < n_params(create_model("cnn_transformer", num_classes=2, img_size=size)) < 0.45e6


def test_few_adam_steps_lower_the_loss() -> None:
    model = create_model("cnn_transformer", num_classes=6, in_chans=1, img_size=28, drop_rate=0.0,
                         conv_drop_rate=0.0)
    model.train()
    x = torch.randn(8, 1, 28, 28)
    y = torch.arange(8) % 6
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(8):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0] * 0.8


def test_channels_last_and_bf16_autocast() -> None:
    model = create_model("cnn_transformer", num_classes=6, in_chans=1, img_size=64).eval()
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        ref = model(x)
        cl = model.to(memory_format=torch.channels_last)(x.contiguous(memory_format=torch.channels_last))
        torch.testing.assert_close(cl, ref, rtol=1e-4, atol=1e-4)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf = model(x)
    assert torch.isfinite(bf).all()
    assert (bf.float() - ref).abs().max() < 0.25


def test_drop_rate_and_eval_determinism() -> None:
    model = create_model("cnn_transformer", num_classes=6, drop_rate=0.5)
    assert model.head_drop.p == 0.5
    model.eval()
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), model(x))


def test_state_dict_roundtrip() -> None:
    a = create_model("cnn_transformer", num_classes=6).eval()
    b = create_model("cnn_transformer", num_classes=6).eval()
    b.load_state_dict(a.state_dict())
    x = torch.randn(1, 1, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(a(x), b(x))


def test_bad_arguments() -> None:
    with pytest.raises(ConfigError):
        create_model("cnn_transformer", not_an_option=1)
    with pytest.raises(ConfigError):
        create_model("cnn_transformer", img_size=16)
    with pytest.raises(ValueError):
        CNNTransformer(pos_embed="rope")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        CNNTransformer(embed_dim=130, num_heads=4)
