"""Tests for the torchvision-based ResNet baselines (``resnet18_28``, ``resnet50_28``, ``resnet18_224``,
``resnet50_224``).

Reference parameter counts with 2 classes (1-channel / 3-channel input): resnet18_28 11,168,706 / 11,169,858,
resnet50_28 23,503,298 / 23,504,450, resnet18_224 11,171,266 / 11,177,538, resnet50_224 23,505,858 / 23,512,130.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from medmix.errors import ConfigError
from medmix.models import create_model, list_models, model_info
from medmix.models.resnet import BatchNormDropPath, ResNetClassifier

NAMES = ["resnet18_28", "resnet50_28", "resnet18_224", "resnet50_224"]
PARAMS = {  # (num_classes=2): in_chans=1, in_chans=3
    "resnet18_28": (11_168_706, 11_169_858),
    "resnet50_28": (23_503_298, 23_504_450),
    "resnet18_224": (11_171_266, 11_177_538),
    "resnet50_224": (23_505_858, 23_512_130),
}


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
    assert set(NAMES) <= set(list_models())
    for name in NAMES:
        info = model_info(name)
        assert info.family == "resnet"
        assert info.min_img_size == 28
        assert info.default_img_size == (28 if name.endswith("_28") else 224)


# (name, img_size, in_chans, batch): every model at 28/64 px and 1/3 channels, fewer combos for ResNet-50
# (batch 1 for resnet50_28 at 64 px and resnet50_224 at 224 px), the ImageNet-stem models at 224. The CIFAR-stem
# models are not run at 224: they are meant for 28 px and would cost 64x the compute there.
CASES = [
    ("resnet18_28", 28, 1, 2), ("resnet18_28", 28, 3, 2), ("resnet18_28", 64, 1, 2), ("resnet18_28", 64, 3, 2),
    ("resnet18_224", 28, 1, 2), ("resnet18_224", 64, 3, 2), ("resnet18_224", 224, 1, 2),
    ("resnet18_224", 224, 3, 2),
    ("resnet50_28", 28, 1, 2), ("resnet50_28", 64, 3, 1),
    ("resnet50_224", 28, 3, 2), ("resnet50_224", 64, 1, 2), ("resnet50_224", 224, 1, 1),
]


@pytest.mark.parametrize(("name", "img_size", "in_chans", "batch"), CASES)
def test_forward_backward(name: str, img_size: int, in_chans: int, batch: int) -> None:
    model = create_model(name, num_classes=3, in_chans=in_chans, img_size=img_size, drop_rate=0.2)
    assert isinstance(model, ResNetClassifier)
    model.train()
    x = torch.randn(batch, in_chans, img_size, img_size)
    logits = model(x)
    assert logits.shape == (batch, 3)
    assert torch.isfinite(logits).all()
    F.cross_entropy(logits, torch.arange(batch) % 3).backward()
    grad = model.conv1.weight.grad
    assert model.conv1.weight.shape[1] == in_chans
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0


@pytest.mark.parametrize(("name", "img_size", "grid"), [
    ("resnet18_28", 28, (4, 4)), ("resnet18_28", 64, (8, 8)),
    ("resnet18_224", 28, (1, 1)), ("resnet18_224", 64, (2, 2)), ("resnet18_224", 224, (7, 7)),
])
def test_feature_map_and_head(name: str, img_size: int, grid: tuple[int, int]) -> None:
    model = create_model(name, num_classes=2, in_chans=1, img_size=img_size).eval()
    x = torch.randn(1, 1, img_size, img_size)
    with torch.no_grad():
        fmap = model.forward_features(x)
        assert fmap.shape == (1, 512, *grid)
        assert model.feature_grid(x) == grid
        assert model.forward_head(fmap, pre_logits=True).shape == (1, 512)
        torch.testing.assert_close(model.forward_head(fmap), model(x))


def test_resnet50_feature_width() -> None:
    model = create_model("resnet50_28", num_classes=2, in_chans=1).eval()
    with torch.no_grad():
        assert model.forward_features(torch.randn(1, 1, 28, 28)).shape == (1, 2048, 4, 4)
    assert model.num_features == 2048


def test_stems() -> None:
    cifar = create_model("resnet18_28", num_classes=2, in_chans=1)
    assert cifar.conv1.kernel_size == (3, 3) and cifar.conv1.stride == (1, 1) and cifar.conv1.in_channels == 1
    assert isinstance(cifar.maxpool, nn.Identity)
    imnet = create_model("resnet18_224", num_classes=2, in_chans=1)
    assert imnet.conv1.kernel_size == (7, 7) and imnet.conv1.stride == (2, 2) and imnet.conv1.in_channels == 1
    assert isinstance(imnet.maxpool, nn.MaxPool2d)


def test_gradcam_layer() -> None:
    model = create_model("resnet18_28", num_classes=2, in_chans=1).eval()
    assert model.gradcam_layer is model.layer4
    seen: dict[str, torch.Tensor] = {}
    handle = model.gradcam_layer.register_forward_hook(lambda m, i, o: seen.__setitem__("map", o))
    with torch.no_grad():
        model(torch.randn(1, 1, 28, 28))
    handle.remove()
    assert seen["map"].shape == (1, 512, 4, 4)


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_torchvision_names_and_state_dict(arch: str) -> None:
    """Same parameter names as torchvision, so a torchvision state dict loads unchanged (3 ch, ImageNet stem)."""
    model = create_model(f"{arch}_224", num_classes=2, in_chans=3)
    reference = getattr(torchvision.models, arch)(weights=None, num_classes=2)
    assert list(model.state_dict()) == list(reference.state_dict())
    model.load_state_dict(reference.state_dict())
    cifar = create_model(f"{arch}_28", num_classes=2, in_chans=1)
    assert list(cifar.state_dict()) == list(reference.state_dict())


@pytest.mark.parametrize("name", NAMES)
def test_param_counts(name: str) -> None:
    one, three = PARAMS[name]
    assert n_params(create_model(name, num_classes=2, in_chans=1)) == one
    assert n_params(create_model(name, num_classes=2, in_chans=3)) == three
    low, high = (11.0e6, 11.3e6) if name.startswith("resnet18") else (23.4e6, 23.6e6)
    assert low < one < high


@pytest.mark.parametrize("name", ["resnet18_28", "resnet50_28"])
def test_few_adam_steps_lower_the_loss(name: str) -> None:
    model = create_model(name, num_classes=2, in_chans=1, img_size=28)
    model.train()
    x = torch.randn(4, 1, 28, 28)
    y = torch.tensor([0, 1, 0, 1])
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(3):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]


def test_drop_path_keeps_names() -> None:
    plain = create_model("resnet18_28", num_classes=2, in_chans=1)
    model = create_model("resnet18_28", num_classes=2, in_chans=1, drop_path_rate=0.2)
    assert list(model.state_dict()) == list(plain.state_dict())
    rates = [b.bn2.drop_prob for layer in (model.layer1, model.layer2, model.layer3, model.layer4) for b in layer]
    assert all(isinstance(b.bn2, BatchNormDropPath) for b in model.layer4)
    assert rates[0] == 0.0 and rates[-1] == pytest.approx(0.2)
    assert rates == sorted(rates)
    model.eval()
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(model(x), model(x))
    model50 = create_model("resnet50_28", num_classes=2, in_chans=1, drop_path_rate=0.1)
    assert isinstance(model50.layer4[-1].bn3, BatchNormDropPath)


def test_channels_last_and_bf16_autocast() -> None:
    model = create_model("resnet18_28", num_classes=2, in_chans=1).eval()
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        ref = model(x)
        cl = model.to(memory_format=torch.channels_last)(x.contiguous(memory_format=torch.channels_last))
        torch.testing.assert_close(cl, ref, rtol=1e-3, atol=1e-3)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert torch.isfinite(model(x)).all()


def test_head_dropout_and_reset_classifier() -> None:
    model = create_model("resnet18_28", num_classes=2, in_chans=1, drop_rate=0.3)
    assert model.head_drop.p == 0.3
    model.reset_classifier(7)
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 7)
    features = ResNetClassifier("resnet18", num_classes=0, in_chans=1)
    assert features(torch.randn(2, 1, 28, 28)).shape == (2, 512)


def test_bad_arguments() -> None:
    with pytest.raises(ConfigError):
        create_model("resnet18_28", img_size=16)
    with pytest.raises(ConfigError):
        create_model("resnet18_28", widths=(1, 2))
    with pytest.raises(ValueError):
        ResNetClassifier("resnet34")
