"""HybridCNN + Global Token Mixer: every size the issue names (28/64/224 px, 1/3 channels), gradients reaching
the first convolution, input checks, and the model registry's errors."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from medmix.errors import ConfigError, UnknownNameError
from medmix.models import create_model, list_models, model_info
from medmix.models.hybrid_mixer import HybridMixer

NAMES = ["hybrid_mixer_small", "hybrid_mixer_base"]


def first_conv(model: nn.Module) -> nn.Conv2d:
    return next(m for m in model.modules() if isinstance(m, nn.Conv2d))


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("img_size", [28, 64, 224])
@pytest.mark.parametrize("in_chans", [1, 3])
def test_forward_backward(name, img_size, in_chans):
    torch.manual_seed(0)
    model = create_model(name, num_classes=5, in_chans=in_chans, img_size=img_size)
    assert isinstance(model, HybridMixer)
    model.train()
    x = torch.randn(2, in_chans, img_size, img_size)
    out = model(x)
    assert out.shape == (2, 5) and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    out.logsumexp(1).sum().backward()
    conv = first_conv(model)
    assert conv.in_channels == in_chans
    assert conv.weight.grad is not None and torch.isfinite(conv.weight.grad).all()
    assert conv.weight.grad.abs().sum() > 0  # the loss reaches the very first layer
    assert model.head.weight.grad is not None and model.head.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("img_size", [28, 64, 224])
def test_token_grid_and_feature_api(img_size):
    model = create_model("hybrid_mixer_small", num_classes=3, in_chans=1, img_size=img_size).eval()
    assert 5 <= model.grid_size <= 9  # a token grid of about 7 x 7 at every size
    x = torch.randn(1, 1, img_size, img_size)
    with torch.no_grad():
        feats = model.forward_features(x)
        assert feats.shape == (1, model.num_tokens, model.num_features)
        pooled = model.forward_head(feats, pre_logits=True)
        assert pooled.shape == (1, model.num_features)
        assert torch.allclose(model.forward_head(feats), model(x), atol=1e-6)


def test_channels_last_and_eval_are_consistent():
    torch.manual_seed(0)
    model = create_model("hybrid_mixer_small", num_classes=2, in_chans=1, img_size=28).eval()
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        a = model(x)
        b = model.to(memory_format=torch.channels_last)(x.contiguous(memory_format=torch.channels_last))
        c = torch.cat([model(x[i:i + 1]) for i in range(4)])  # eval: no batch-statistics leakage
    assert torch.allclose(a, b, atol=1e-5) and torch.allclose(a, c, atol=1e-5)


def test_base_is_larger_than_small():
    def n(name: str) -> int:
        return sum(p.numel() for p in create_model(name, num_classes=2, in_chans=1, img_size=28).parameters())

    assert n("hybrid_mixer_base") > n("hybrid_mixer_small") > 0


@pytest.mark.parametrize("shape", [(1, 1, 64, 64), (1, 1, 28, 32), (1, 3, 28, 28), (1, 28, 28)])
def test_wrong_input_raises_config_error(shape):
    model = create_model("hybrid_mixer_small", num_classes=2, in_chans=1, img_size=28).eval()
    with pytest.raises(ConfigError):
        model(torch.randn(*shape))


def test_too_small_image_size_is_refused():
    with pytest.raises(ConfigError):
        create_model("hybrid_mixer_small", num_classes=2, in_chans=1, img_size=4)


def test_registry():
    names = list_models()
    assert set(NAMES) <= set(names)
    info = model_info("hybrid_mixer_small")
    assert info.family == "hybrid_mixer" and "Token Mixer" in info.paper
    with pytest.raises(UnknownNameError) as e:
        create_model("hybrid_mixer_tiny", num_classes=2)
    msg = str(e.value)
    assert "hybrid_mixer_tiny" in msg and all(n in msg for n in names)
    assert isinstance(e.value, KeyError)
    with pytest.raises(ConfigError):
        create_model("hybrid_mixer_small", num_classes=0)


def test_unknown_model_option_is_a_config_error():
    with pytest.raises(ConfigError, match="no_such_option"):
        create_model("hybrid_mixer_small", num_classes=2, no_such_option=1)
