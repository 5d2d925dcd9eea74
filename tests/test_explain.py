"""Grad-CAM: the heatmap of a model trained on a one-quadrant task lies in that quadrant; panels, class selection,
the CLI, token-shaped target layers and every model family."""
from __future__ import annotations

import json

import numpy as np
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from _quadrant import CLASSES, QUADRANTS, make_images, quadrant_mass, trained, write_run
from PIL import Image

from medmix.cam_methods import DEFAULT_METHOD
from medmix.cli import build_parser, main
from medmix.data import BatchTransform
from medmix.errors import ConfigError
from medmix.explain import METHODS, cam_array, explain, resolve_class, target_layer, tokens_to_map
from medmix.models import create_model
from medmix.predict import Predictor


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_run(tmp_path_factory.mktemp("quadrant"))


@pytest.fixture(scope="module")
def image_files(tmp_path_factory):
    """Two class-1 and one class-0 held-out images as PNG files."""
    images, labels = make_images(8, seed=11)
    d = tmp_path_factory.mktemp("images")
    picks = list(np.flatnonzero(labels == 1)[:2]) + list(np.flatnonzero(labels == 0)[:1])
    paths = []
    for i in picks:
        p = d / f"case{i}_{CLASSES[labels[i]]}.png"
        Image.fromarray(images[i]).save(p)
        paths.append(p)
    return paths


DEFAULT_SUFFIX = DEFAULT_METHOD.replace("+", "p")  # panels are <stem>_<method>.png, "+" spelt "p"


# ----------------------------------------------------------------------------------------------- localisation
@pytest.fixture(scope="module")
def quadrant_batch():
    """Held-out class-1 images, normalised like training, and the trained model."""
    state, mean, std = trained()
    model = create_model("hybrid_mixer_small", num_classes=2, in_chans=1, img_size=28)
    model.load_state_dict(state)
    model.eval()
    images, labels = make_images(96, seed=5)
    x = BatchTransform(28, mean, std)(torch.from_numpy(images[labels == 1])[:, None])
    with torch.no_grad():
        acc = float((model(BatchTransform(28, mean, std)(torch.from_numpy(images)[:, None])).argmax(1).numpy()
                     == labels).mean())
    return model, x, acc


def test_model_learned_the_quadrant_task(quadrant_batch):
    assert quadrant_batch[2] >= 0.95


@pytest.mark.parametrize("method", ["gradcam++", "layercam"])
def test_heatmap_mass_lies_in_the_informative_quadrant(quadrant_batch, method):
    model, x, _ = quadrant_batch
    cams = cam_array(model, x, 1, method=method)
    assert cams.shape == (len(x), 28, 28) and cams.dtype == np.float32
    assert cams.min() >= 0 and cams.max() <= 1
    mass = quadrant_mass(cams)
    assert mass["top-right"] > 0.5, mass
    assert mass["top-right"] == max(mass.values()), mass
    # per image too: for most images the informative quadrant holds the largest share
    per_image = np.stack([cams[:, r, c].sum((1, 2)) for r, c in QUADRANTS.values()], 1)
    assert np.mean(per_image.argmax(1) == list(QUADRANTS).index("top-right")) >= 0.8


def test_target_class_none_explains_the_argmax(quadrant_batch):
    model, x, _ = quadrant_batch
    np.testing.assert_allclose(cam_array(model, x[:4], None), cam_array(model, x[:4], [1, 1, 1, 1]), atol=1e-6)


def test_cam_array_leaves_the_model_as_it_was(quadrant_batch):
    model, x, _ = quadrant_batch
    model.train()
    try:
        cam_array(model, x[:2], 1)
        assert model.training
    finally:
        model.eval()
    with torch.inference_mode():  # works even when the caller disabled autograd
        assert cam_array(model, x[:2], 1).shape == (2, 28, 28)


# ----------------------------------------------------------------------------------------------- explain()
def test_explain_writes_a_panel_per_image(ckpt, image_files, tmp_path):
    out = tmp_path / "panels"
    results = explain(ckpt, image_files, out, top_k=2)
    predicted = Predictor(ckpt).predict(image_files)
    assert [r["file"] for r in results] == [str(p) for p in image_files]
    for r, p, path in zip(results, predicted, image_files):
        assert r["png"] == str(out / f"{path.stem}_{DEFAULT_SUFFIX}.png")
        with open(r["png"], "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
        with Image.open(r["png"]) as im:
            im.verify()
        with Image.open(r["png"]) as im:
            assert im.width >= 900 and im.height >= 300  # input shown >= 224 px wide next to overlay and chart
        assert r["label"] == p["label"] and r["confidence"] == pytest.approx(p["confidence"], abs=1e-6)
        assert r["explained_class"] == p["label"]  # default: the predicted class
        assert r["cam"].shape == (28, 28) and 0 <= r["cam"].min() and r["cam"].max() <= 1
        assert list(r["probabilities"]) == list(p["probabilities"])[:2]
    assert [r["label"] for r in results] == ["blob", "blob", "absent"]
    # no temporary files left
    assert sorted(f.name for f in out.iterdir()) == sorted(f"{p.stem}_{DEFAULT_SUFFIX}.png" for p in image_files)


def test_explain_other_methods_and_array_inputs(ckpt, tmp_path):
    images, _ = make_images(2, seed=3)
    r = explain(ckpt, [images[0], images[0]], tmp_path, method="gradcam++", top_k=5)
    assert [x["png"] for x in r] == [str(tmp_path / "image0_gradcampp.png"), str(tmp_path / "image1_gradcampp.png")]
    assert len(r[0]["probabilities"]) == 2  # top-k capped by the number of classes
    np.testing.assert_allclose(r[0]["cam"], r[1]["cam"], atol=1e-6)


def test_out_dir_with_a_tilde_is_under_home(ckpt, image_files, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path / "..")
    r = explain(ckpt, image_files[:1], "~/panels")[0]
    assert Path(r["png"]).parent == tmp_path / "panels" and Path(r["png"]).is_file()
    assert not (tmp_path / ".." / "~").exists()


def test_class_by_name_and_index(ckpt, image_files, tmp_path):
    by_name = explain(ckpt, image_files[:1], tmp_path / "a", target_class="absent")[0]
    by_index = explain(ckpt, image_files[:1], tmp_path / "b", target_class=0)[0]
    by_str_index = explain(ckpt, image_files[:1], tmp_path / "c", target_class="0")[0]
    folded = explain(ckpt, image_files[:1], tmp_path / "d", target_class="ABSENT")[0]
    blob = explain(ckpt, image_files[:1], tmp_path / "e", target_class="blob")[0]
    for r in (by_name, by_index, by_str_index, folded):
        assert r["explained_class"] == "absent" and r["explained_index"] == 0
        assert r["label"] == "blob"  # the prediction itself does not change
        np.testing.assert_allclose(r["cam"], by_name["cam"], atol=1e-6)
    assert "absent" in by_name["probabilities"]  # the explained class is always shown
    assert not np.allclose(blob["cam"], by_name["cam"])


def test_resolve_class_errors_list_the_classes():
    assert resolve_class(-1, CLASSES) == 1 and resolve_class(None, CLASSES) is None
    with pytest.raises(ConfigError, match=r"unknown class 'tumour'.*0='absent', 1='blob'"):
        resolve_class("tumour", CLASSES)
    with pytest.raises(ConfigError, match="out of range.*'blob'"):
        resolve_class(2, CLASSES)
    with pytest.raises(ConfigError, match="unknown explanation method"):
        explain("unused.pth", [], ".", method="sharpest")


# ----------------------------------------------------------------------------------------------- CLI
def test_cli_explain(ckpt, image_files, tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["explain", str(ckpt), str(image_files[0]), "--out", str(out), "--class", "absent", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows[0]["explained_class"] == "absent" and "cam" not in rows[0]
    assert (out / f"{image_files[0].stem}_{DEFAULT_SUFFIX}.png").is_file()

    assert main(["explain", str(ckpt), str(image_files[0]), "--out", str(out), "--class", "1",
                 "--method", "layercam", "--top-k", "1"]) == 0
    text = capsys.readouterr().out
    assert "'blob'" in text and "_layercam.png" in text

    assert main(["explain", str(ckpt), str(image_files[0]), "--out", str(out), "--class", "tumour"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("medmix: error: unknown class 'tumour'") and "'absent'" in err and "'blob'" in err
    assert len(err.strip().splitlines()) == 1


def _explain_method_option():
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    return next(a for a in sub.choices["explain"]._actions if a.dest == "method")


def test_one_default_method_for_cli_library_and_server():
    """The CLI and medmix.explain share one default (the server's: tests/test_serve.py)."""
    import inspect

    from medmix.cam_methods import DEFAULT_METHOD
    from medmix.explain import explain

    opt = _explain_method_option()
    assert tuple(opt.choices) == tuple(METHODS)
    assert opt.default == DEFAULT_METHOD == inspect.signature(explain).parameters["method"].default
    assert f"default: {DEFAULT_METHOD}" in opt.help  # the help text says the real default


# ----------------------------------------------------------------------------------------------- other layers
class TokenNet(nn.Module):
    """A toy model whose Grad-CAM layer outputs tokens ``(B, N, D)`` (with a class token) instead of a map."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 4, stride=4)
        self.cls = nn.Parameter(torch.zeros(1, 1, 8))
        self.mix = nn.Linear(8, 8)
        self.head = nn.Linear(8, 2)

    @property
    def gradcam_layer(self) -> nn.Module:
        return self.mix

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.conv(x).flatten(2).transpose(1, 2)
        t = self.mix(torch.cat([self.cls.expand(len(t), -1, -1), t], 1))
        return self.head(t[:, 1:].relu().mean(1))


def test_token_layers_are_reshaped_to_their_grid():
    torch.manual_seed(0)
    net = TokenNet().eval()
    x = torch.randn(3, 1, 28, 28)
    cams = cam_array(net, x, 1)  # 1 + 49 tokens -> 7 x 7 grid
    assert cams.shape == (3, 28, 28) and np.isfinite(cams).all()
    seen = []

    def reshape(t):
        seen.append(tuple(t.shape))
        return tokens_to_map(t)

    net.gradcam_reshape_transform = reshape  # a model's own transform wins
    cam_array(net, x, 1)
    assert seen and seen[0] == (3, 50, 8)
    assert tokens_to_map(torch.zeros(2, 16, 5)).shape == (2, 5, 4, 4)
    with pytest.raises(ConfigError, match="square grid"):
        tokens_to_map(torch.zeros(2, 7, 5))


@pytest.mark.parametrize("name", ["cnn_transformer", "resnet18_28"])
def test_every_family_gives_a_map(name):
    torch.manual_seed(0)
    model = create_model(name, num_classes=3, in_chans=1, img_size=28).eval()
    assert target_layer(model) is model.gradcam_layer
    cams = cam_array(model, torch.randn(2, 1, 28, 28), 2)
    assert cams.shape == (2, 28, 28) and cams.max() == pytest.approx(1.0, abs=1e-5)


def test_models_without_gradcam_layer_use_the_last_block_with_a_2d_map():
    """MedViT has no gradcam_layer: the last block of ``features`` whose map is at least 2x2 is used (its last
    stage is 1x1 at 28 px)."""
    class Stub(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.features = nn.Sequential(nn.Conv2d(1, 4, 3, 2, 1), nn.Conv2d(4, 4, 3, 2, 1), nn.Conv2d(4, 4, 7))
            self.head = nn.Linear(4, 2)

        def forward(self, x):
            return self.head(self.features(x).mean((2, 3)))

    m = Stub()
    assert target_layer(m) is m.features[-1]
    assert target_layer(m, torch.zeros(1, 1, 28, 28)) is m.features[1]  # 7x7, then 1x1
    assert target_layer(m, torch.zeros(1, 1, 112, 112)) is m.features[2]  # 56, 28, then 22x22
    assert cam_array(m, torch.randn(2, 1, 28, 28), 0).shape == (2, 28, 28)
    with pytest.raises(ConfigError, match="no gradcam_layer"):
        target_layer(nn.Linear(2, 2))


def test_quadrant_helper_is_sound():
    cams = np.zeros((1, 28, 28), np.float32)
    cams[0, 2, 20] = 1.0
    assert quadrant_mass(cams)["top-right"] == 1.0 and set(quadrant_mass(cams)) == set(QUADRANTS)


# ----------------------------------------------------------------------------------------------- the overlay and panel
def _half_map(side: int = 28) -> np.ndarray:
    """0 on the left half, 1 on the right third, a ramp between: a map with exact 0s and 1s at its own size."""
    m = np.zeros((side, side), np.float32)
    m[:, side // 2:] = np.linspace(0.0, 1.0, side - side // 2, dtype=np.float32)
    m[:, -(side // 3):] = 1.0
    return m


def test_overlay_is_transparent_without_evidence_and_the_top_colour_at_the_maximum():
    from matplotlib import colormaps

    from medmix.imaging import CAM_ALPHA_MAX, CAM_LUT, cam_colors, cam_overlay

    rgb = np.random.default_rng(0).random((28, 28, 3), dtype=np.float32)
    cam = _half_map()
    out = cam_overlay(rgb, cam)
    none, full = cam == 0.0, cam == 1.0
    assert none.sum() == 28 * 15 and full.sum() == 28 * 9
    assert np.array_equal(out[none], rgb[none])  # bit for bit: zero evidence draws nothing
    want = (1 - CAM_ALPHA_MAX) * rgb[full] + CAM_ALPHA_MAX * CAM_LUT[-1]
    np.testing.assert_allclose(out[full], want, atol=1e-6)
    assert np.abs(out[full] - rgb[full]).max() > 0.1
    mid = cam_overlay(np.zeros((1, 1, 3), np.float32), np.full((1, 1), 0.5, np.float32), alpha_max=0.8)
    np.testing.assert_allclose(mid[0, 0], 0.4 * cam_colors(0.5), atol=1e-6)  # opacity = a_max * value
    # the table is matplotlib's "turbo" (to its 8-bit rounding), binned the way its colour bar bins it
    x = np.linspace(0.0, 1.0, 2001)
    assert np.abs(cam_colors(x) - colormaps["turbo"](x)[:, :3]).max() <= 0.5 / 255 + 1e-6
    with pytest.raises(ConfigError, match="alpha_max"):
        cam_overlay(rgb, cam, alpha_max=1.5)


def _panel_for(cam: np.ndarray, method: str = "gradcam++"):
    from medmix.explain import _panel

    img = torch.from_numpy(np.random.default_rng(1).integers(0, 256, (1, 28, 28), dtype=np.uint8))
    return img, _panel(img, cam, [("blob", 0.7), ("absent", 0.3)], "blob", "case.png: blob (70.0%)", method)


def test_panel_has_a_labelled_colour_bar_the_method_and_outlines(tmp_path):
    from matplotlib.contour import ContourSet

    from medmix.imaging import CAM_LUT, enlarged_rgb
    from medmix.metrics import save_figure

    img, fig = _panel_for(_half_map())
    assert len(fig.axes) == 4  # input, overlay, colour bar, probabilities (it was 3 without the colour bar)
    labels = [a.get_ylabel() for a in fig.axes]
    (label,) = [t for t in labels if "evidence" in t]
    assert "Grad-CAM++ evidence for 'blob'" in label and "scaled per image" in label
    cax = fig.axes[labels.index(label)]
    assert [t.get_text() for t in cax.get_yticklabels()][0].startswith("0") and cax.get_ylim() == (0.0, 1.0)
    overlay_ax = fig.axes[1]
    assert overlay_ax.get_title() == "Grad-CAM++ for 'blob'"
    (contours,) = [c for c in overlay_ax.get_children() if isinstance(c, ContourSet)]
    np.testing.assert_allclose(contours.levels, [0.5, 0.8])
    shown = np.asarray(overlay_ax.images[0].get_array())
    big = enlarged_rgb(img.numpy(), 224)
    assert shown.shape == big.shape
    assert np.array_equal(shown[:, :100], big[:, :100])  # the left half has no evidence: the input untouched
    assert np.abs(shown[:, -60:] - big[:, -60:]).max() > 0.1
    from matplotlib.collections import QuadMesh

    (solids,) = [c for c in cax.collections if isinstance(c, QuadMesh)]  # the bar: the overlay's colours over grey
    cmap = solids.cmap
    np.testing.assert_allclose(cmap(1.0)[:3], 0.4 * 0.5 + 0.6 * CAM_LUT[-1], atol=1e-6)
    np.testing.assert_allclose(cmap(0.0)[:3], [0.5, 0.5, 0.5], atol=1e-6)  # no evidence: just what lies beneath
    png = save_figure(fig, tmp_path / "panel.png")
    with Image.open(png) as im:
        assert im.width >= 1200 and im.height >= 450


def test_panel_names_class_agnostic_methods_and_an_empty_map():
    _, fig = _panel_for(_half_map(), "eigencam")
    assert fig.axes[1].get_title() == "EigenCAM (class-agnostic)"
    assert any("EigenCAM activation (class-agnostic)" in a.get_ylabel() for a in fig.axes)
    img, fig = _panel_for(np.zeros((28, 28), np.float32), "gradcam")
    from matplotlib.contour import ContourSet

    from medmix.imaging import enlarged_rgb

    assert fig.axes[1].get_title().startswith("Grad-CAM for 'blob'\n(no positive evidence")
    assert not [c for c in fig.axes[1].get_children() if isinstance(c, ContourSet)]
    assert np.array_equal(np.asarray(fig.axes[1].images[0].get_array()), enlarged_rgb(img.numpy(), 224))


def test_every_method_has_a_display_name():
    from medmix.explain import _METHOD_NAMES, _method_title

    assert set(_METHOD_NAMES) == set(METHODS)
    assert _method_title("gradcam") == "Grad-CAM" and _method_title("eigencam") == "EigenCAM (class-agnostic)"


def test_a_class_agnostic_method_is_not_titled_as_explaining_a_class(trained_run, tmp_path, monkeypatch):
    import numpy as np

    import medmix.explain as ex

    seen = []
    real = ex._panel
    monkeypatch.setattr(ex, "_panel", lambda *a, **k: seen.append(a[4]) or real(*a, **k))
    img = np.full((28, 28), 90, np.uint8)
    img[8:20, 8:20] = 200
    ex.explain(trained_run.run_dir, [img], tmp_path / "e", method="eigencam")
    ex.explain(trained_run.run_dir, [img], tmp_path / "g", method="gradcam")
    assert "class-agnostic map" in seen[0] and "explaining" not in seen[0]
    assert "explaining" in seen[1]
