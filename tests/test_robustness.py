"""Corruption robustness (medmix.robustness, after MedMNIST-C): every corruption keeps shape and dtype, is
reproducible, changes the image and grows with severity; the definitions that torchvision and Pillow also implement
agree with them at 224 px; the BE / rBE arithmetic; the per-dataset lists; and ``medmix evaluate --corruptions``
end to end on a run trained on the embedded BreastMNIST."""
from __future__ import annotations

import json

import numpy as np
import pytest

from medmix import robustness as R
from medmix.cli import main
from medmix.data import load_dataset
from medmix.data.medmnist import ASSETS

RGB_SETS = {"pathmnist", "bloodmnist", "dermamnist", "retinamnist"}
ALL_TABLES = {**R.MEDMNIST_C, "generic_gray": R.GENERIC_GRAY, "generic_rgb": R.GENERIC_RGB}


def pattern(side: int, channels: int, n: int = 2, seed: int = 0) -> np.ndarray:
    """uint8 test images with edges (a checkerboard), a gradient and fine noise, so blurs and noise both show."""
    rng = np.random.default_rng(seed)
    t = np.linspace(0, 1, side)
    cell = max(1, side // 7)
    check = ((np.arange(side)[:, None] // cell + np.arange(side)[None, :] // cell) % 2) * 50
    x = np.clip(60 + 120 * t[None, :] * t[:, None] + check + rng.normal(0, 6, (n, side, side)), 0, 255)
    x = x.astype(np.uint8)
    return np.stack([x, np.roll(x, 3, axis=2), 255 - x], -1) if channels == 3 else x


def distinct(tables) -> list[tuple[str, R.Corruption]]:
    """(set, corruption) pairs, each distinct definition once (the three OrganMNIST sets share theirs)."""
    seen, out = set(), []
    for flag, table in tables.items():
        for c in table.values():
            key = (c.name, c.kind, c.params, flag in RGB_SETS or flag == "generic_rgb")
            if key not in seen:
                seen.add(key)
                out.append((flag, c))
    return out


CASES = distinct(ALL_TABLES)
IDS = [f"{flag}-{c.name}" for flag, c in CASES]


def change(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


# ----------------------------------------------------------------------------------------------- the corruptions
@pytest.mark.parametrize("flag,c", CASES, ids=IDS)
def test_shape_dtype_and_determinism_at_28px(flag, c):
    x = pattern(28, 3 if flag in RGB_SETS or flag == "generic_rgb" else 1, n=3)
    before = x.copy()
    a = R.corrupt(x, c, 3, seed=7)
    assert a.shape == x.shape and a.dtype == np.uint8
    assert np.array_equal(a, R.corrupt(x, c, 3, seed=7))  # the same seed, the same images
    assert np.array_equal(x, before)  # the input is left as it was


@pytest.mark.parametrize("flag,c", CASES, ids=IDS)
def test_severity_1_changes_the_image_and_severity_5_more_at_224px(flag, c):
    """At 224 px (MedMNIST-C's resolution, scale 1) every definition applies as designed."""
    x = pattern(224, 3 if flag in RGB_SETS or flag == "generic_rgb" else 1, n=1)
    d1, d5 = change(R.corrupt(x, c, 1), x), change(R.corrupt(x, c, 5), x)
    assert 0 < d1 < d5, (d1, d5)


def test_random_corruptions_depend_on_the_seed_and_keep_grayscale_layout():
    x = pattern(28, 1, n=4)
    c = R.MEDMNIST_C["pneumoniamnist"]["gaussian_noise"]
    a, b = R.corrupt(x, c, 2, seed=0), R.corrupt(x, c, 2, seed=1)
    assert a.shape == (4, 28, 28) and not np.array_equal(a, b)
    # grayscale goes through RGB and back like MedMNIST-C: independent noise per channel is partly averaged out
    rgb = R.corrupt(np.repeat(x[..., None], 3, -1), c, 2, seed=0)
    assert np.std(a.astype(float) - x) < 0.8 * np.std(rgb[..., 0].astype(float) - x)


def test_breastmnist_corruptions_on_real_images_at_28px():
    """The embedded BreastMNIST (28 px): every corruption changes the images from severity 1 on, more at 5."""
    x = load_dataset("breastmnist", data_dir=ASSETS).splits["test"].images[:16, 0].numpy()
    for c in R.MEDMNIST_C["breastmnist"].values():
        d1, d5 = change(R.corrupt(x, c, 1), x), change(R.corrupt(x, c, 5), x)
        assert 0 < d1 < d5, (c.name, d1, d5)


def test_sub_pixel_blurs_at_28px_are_the_documented_ones():
    """Scaled to 28 px, PneumoniaMNIST's Gaussian blur (sigma 0.1-0.25 px) and RetinaMNIST's mildest defocus (a
    disk of radius 0.5 px) leave the images as they are; everything else of the three sets changes them."""
    unchanged = set()
    for flag in ("pneumoniamnist", "breastmnist", "retinamnist"):
        x = pattern(28, 3 if flag in RGB_SETS else 1, n=4)
        for c in R.MEDMNIST_C[flag].values():
            if change(R.corrupt(x, c, 1), x) == 0:
                unchanged.add((flag, c.name))
            assert change(R.corrupt(x, c, 5), x) > 0 or c.name == "gaussian_blur", (flag, c.name)
    assert unchanged == {("pneumoniamnist", "gaussian_blur"), ("retinamnist", "defocus_blur")}


def test_definitions_agree_with_torchvision_and_pillow_at_224px():
    """MedMNIST-C implements these with torchvision and Pillow; at scale 1 ours give the same pixels (+-1 for
    rounding inside torchvision's blur)."""
    import torchvision.transforms.functional as TF
    from PIL import Image, ImageEnhance

    x = pattern(224, 3, n=2)
    pil = [Image.fromarray(a) for a in x]
    for k in (3, 7, 11):
        theirs = np.stack([np.asarray(TF.gaussian_blur(p, kernel_size=k)) for p in pil])
        assert np.abs(theirs.astype(int) - R.gaussian_blur(x, k, None, 1.0)).max() <= 1
    for g in (0.4, 1.6):
        theirs = np.stack([np.asarray(TF.adjust_gamma(p, g, gain=1)) for p in pil])
        assert np.array_equal(theirs, R.gamma_correction(x, g, None, 1.0))
    theirs = np.stack([np.asarray(ImageEnhance.Contrast(p).enhance(0.6)) for p in pil])
    assert np.array_equal(theirs, R.contrast(x, 0.6, None, 1.0))


def test_noise_strengths_are_the_defined_ones():
    g = np.full((2, 112, 112, 3), 128, np.uint8)
    rng = np.random.default_rng(0)
    assert np.std(R.gaussian_noise(g, 0.1, rng, 1.0) / 255.0) == pytest.approx(0.1, rel=0.03)
    assert np.std(R.speckle_noise(g, 0.2, rng, 1.0) / 255.0) == pytest.approx(0.2 * 128 / 255, rel=0.03)
    hit = R.impulse_noise(g, 0.1, rng, 1.0)
    assert np.mean(hit == 255) == pytest.approx(0.05, abs=0.005) and np.mean(hit == 0) == pytest.approx(0.05, abs=0.005)


def test_bad_inputs_are_refused():
    c = R.MEDMNIST_C["breastmnist"]["pixelate"]
    with pytest.raises(R.ConfigError, match="uint8"):
        R.corrupt(np.zeros((2, 28, 28), np.float32), c, 1)
    with pytest.raises(R.ConfigError, match="1..5"):
        R.corrupt(np.zeros((2, 28, 28), np.uint8), c, 6)
    with pytest.raises(R.ConfigError, match="1..5"):
        R.check_severities([0, 3])
    assert R.check_severities([5, 1, 5]) == (1, 5)


# ----------------------------------------------------------------------------------------------- registry
def test_corruptions_for_the_three_sets_are_medmnist_c_lists():
    assert list(R.corruptions_for("pneumoniamnist")) == [
        "pixelate", "jpeg_compression", "gaussian_noise", "speckle_noise", "impulse_noise", "shot_noise",
        "gaussian_blur", "brightness_up", "brightness_down", "contrast_up", "contrast_down", "gamma_corr_up",
        "gamma_corr_down"]
    assert list(R.corruptions_for("breastmnist")) == [
        "pixelate", "jpeg_compression", "speckle_noise", "motion_blur", "brightness_up", "brightness_down",
        "contrast_down"]
    assert list(R.corruptions_for("retinamnist", 3)) == [
        "pixelate", "jpeg_compression", "gaussian_noise", "speckle_noise", "defocus_blur", "motion_blur",
        "brightness_down", "contrast_down"]
    assert R.corruptions_for("breastmnist")["brightness_up"].params == (1.4, 1.5, 1.6, 1.8, 2.0)
    assert R.corruptions_for("pneumoniamnist")["shot_noise"].parameter(5) == 80


def test_every_covered_set_has_five_parameters_and_a_baseline_per_corruption():
    assert len(R.MEDMNIST_C) == 12
    for flag, table in R.MEDMNIST_C.items():
        assert set(table) == set(R.ALEXNET_BASELINE[flag]["corrupted"]), flag
        for c in table.values():
            assert len(c.params) == 5 and c.kind in R.KINDS, (flag, c.name)


def test_unknown_data_get_the_generic_list_by_channels():
    assert list(R.corruptions_for(None, 1)) == list(R.GENERIC_GRAY)
    assert list(R.corruptions_for("mednist", 3)) == list(R.GENERIC_RGB)
    assert "gaussian_blur" in R.GENERIC_GRAY and "defocus_blur" in R.GENERIC_RGB
    assert R.corruption_set_name("cls_folders", 3) == "generic_rgb"


@pytest.mark.parametrize("flag,clean,corrupted", [("pneumoniamnist", 0.101, 0.265), ("breastmnist", 0.145, 0.299),
                                                   ("retinamnist", 0.558, 0.649)])
def test_alexnet_baseline_means(flag, clean, corrupted):
    b = R.ALEXNET_BASELINE[flag]
    assert b["clean"] == pytest.approx(clean, abs=5e-4)
    assert np.mean(list(b["corrupted"].values())) == pytest.approx(corrupted, abs=5e-4)


# ----------------------------------------------------------------------------------------------- the metric
def test_balanced_error_by_hand():
    # binary: positive score > 0.5; class 0 recall 2/3, class 1 recall 1/2 -> error 1 - (2/3 + 1/2) / 2
    y = np.array([0, 0, 0, 1, 1])
    p1 = np.array([0.1, 0.2, 0.9, 0.8, 0.3])
    assert R.balanced_error(y, np.stack([1 - p1, p1], 1), "binary-class") == pytest.approx(1 - (2 / 3 + 1 / 2) / 2)
    # the threshold moves the decision: at 0.85 only the 0.9 is positive
    assert R.balanced_error(y, np.stack([1 - p1, p1], 1), "binary-class", 0.85) == pytest.approx(1 - (2 / 3 + 0) / 2)
    # multi-class: argmax; recalls 1, 0, 1/2
    y3 = np.array([0, 1, 2, 2])
    s3 = np.array([[0.8, 0.1, 0.1], [0.6, 0.3, 0.1], [0.1, 0.1, 0.8], [0.2, 0.5, 0.3]])
    assert R.balanced_error(y3, s3, "multi-class") == pytest.approx(1 - (1 + 0 + 0.5) / 3)
    # multi-label: the mean of the labels' balanced errors
    yl = np.array([[1, 0], [0, 1], [1, 1], [0, 0]])
    sl = np.array([[0.9, 0.1], [0.2, 0.4], [0.3, 0.8], [0.1, 0.7]])
    e0 = 1 - (1 / 2 + 1) / 2  # label 0: positives 1/2 found, negatives 2/2
    e1 = 1 - (1 / 2 + 1 / 2) / 2  # label 1: positives 1/2, negatives 1/2
    assert R.balanced_error(yl, sl, "multi-label, binary-class") == pytest.approx((e0 + e1) / 2)


def test_be_and_rbe_arithmetic_on_a_made_up_table():
    errors = {"a": {1: 0.2, 2: 0.25, 3: 0.3, 4: 0.35, 5: 0.4}, "b": {s: 0.15 for s in range(1, 6)}}
    base = {"clean": 0.05, "corrupted": {"a": 0.5, "b": 0.1}}
    r = R.robustness_scores(0.1, errors, base)
    # a: mean 0.3 -> BE 0.3 / 0.5 = 0.6, rBE (0.3 - 0.1) / (0.5 - 0.05) = 0.4444; b: BE 1.5, rBE 0.05 / 0.05 = 1
    assert r["per_corruption"]["a"]["be"] == pytest.approx(0.6)
    assert r["per_corruption"]["a"]["rbe"] == pytest.approx(0.2 / 0.45)
    assert r["per_corruption"]["b"]["be"] == pytest.approx(1.5)
    assert r["per_corruption"]["b"]["rbe"] == pytest.approx(1.0)
    assert r["mean_corrupted_error"] == pytest.approx((0.3 + 0.15) / 2)
    assert r["be"] == pytest.approx((0.6 + 1.5) / 2) and r["rbe"] == pytest.approx((0.2 / 0.45 + 1) / 2)
    assert r["rbe_unstable"] == [] and r["notes"] == []


def test_be_needs_the_baseline_all_severities_and_all_corruptions():
    base = {"clean": 0.1, "corrupted": {"a": 0.105, "b": 0.3}}
    full = {"a": {s: 0.2 for s in range(1, 6)}, "b": {s: 0.4 for s in range(1, 6)}}
    r = R.robustness_scores(0.1, full, base)
    assert r["rbe_unstable"] == ["a"] and r["per_corruption"]["a"]["rbe"] == pytest.approx(0.1 / 0.005)
    assert any("divides" in n for n in r["notes"])
    r = R.robustness_scores(0.1, {"a": {1: 0.2, 5: 0.3}}, base)
    assert r["be"] is None and r["per_corruption"]["a"]["be"] is None and "five severities" in r["notes"][0]
    assert r["mean_corrupted_error"] == pytest.approx(0.25)
    r = R.robustness_scores(0.1, {"b": full["b"]}, base)
    assert r["be"] is None and r["per_corruption"]["b"]["be"] == pytest.approx(0.4 / 0.3)
    assert "1 were evaluated" in r["notes"][0]
    r = R.robustness_scores(0.1, full, None)
    assert r["be"] is None and r["rbe"] is None and "no AlexNet baseline" in r["notes"][0]


# ----------------------------------------------------------------------------------------------- end to end
def test_cli_corruptions_end_to_end(trained_run, tmp_path, capsys):
    import medmix

    out = tmp_path / "rob"
    assert main(["evaluate", str(trained_run.run_dir), "--corruptions", "--severities", "1", "5", "--out", str(out),
                 "--precision", "fp32"]) == 0
    text = capsys.readouterr().out
    assert "sev 1" in text and "sev 5" in text and "mean corrupted balanced error" in text
    assert "motion_blur" in text and "need all five severities" in text
    r = json.loads((out / "robustness.json").read_text())
    assert (out / "robustness.png").read_bytes()[:4] == b"\x89PNG"
    assert r["dataset"] == "breastmnist" and r["severities"] == [1, 5] and r["image_size"] == 28
    assert list(r["corruptions"]) == list(R.MEDMNIST_C["breastmnist"])
    assert r["be"] is None and r["baseline"]["clean_balanced_error"] == pytest.approx(0.1454, abs=1e-4)
    # clean numbers come through the run's own path: the same ACC / AUC as `medmix evaluate`
    m = medmix.evaluate(trained_run.run_dir, precision="fp32")
    assert r["clean"]["acc"] == pytest.approx(m["acc"]) and r["clean"]["auc"] == pytest.approx(m["auc"])
    for name, v in r["corruptions"].items():
        assert set(v["severities"]) == {"1", "5"}
        assert v["severities"]["5"]["mean_abs_change"] > v["severities"]["1"]["mean_abs_change"] > 0, name
        assert 0 <= v["severities"]["1"]["balanced_error"] <= 1
        assert v["mean_balanced_error"] == pytest.approx(
            (v["severities"]["1"]["balanced_error"] + v["severities"]["5"]["balanced_error"]) / 2)


def test_all_severities_give_be_and_rbe(trained_run):
    """With all five severities but only two corruptions, per-corruption BE/rBE exist and the overall ones do not."""
    r = R.evaluate_corruptions(trained_run.run_dir, names=["brightness_down", "contrast_down"], precision="fp32")
    base = R.ALEXNET_BASELINE["breastmnist"]
    for name in ("brightness_down", "contrast_down"):
        v = r["corruptions"][name]
        assert v["be"] == pytest.approx(v["mean_balanced_error"] / base["corrupted"][name])
        assert v["rbe"] == pytest.approx((v["mean_balanced_error"] - r["clean"]["balanced_error"])
                                         / (base["corrupted"][name] - base["clean"]))
    assert r["be"] is None and "2 were evaluated" in " ".join(r["notes"])
    assert "BE" in R.format_robustness(r)


def test_generic_list_for_data_without_medmnist_c(packed_run):
    r = R.evaluate_corruptions(packed_run.run_dir, severities=[2], names=["gaussian_noise", "pixelate"],
                               precision="fp32")
    assert r["corruption_set"] == "generic_gray" and list(r["corruptions"]) == ["gaussian_noise", "pixelate"]
    assert r["baseline"] is None and r["be"] is None and "no AlexNet baseline" in r["notes"][0]


@pytest.mark.parametrize("args,message", [
    (["--corruptions", "--severities", "0", "5"], "severities are integers 1..5"),
    (["--corruptions", "--severities", "6"], "severities are integers 1..5"),
    (["--corruptions", "--corruption-names", "bubble"], "unknown corruption 'bubble' for breastmnist"),
    (["--severities", "2"], "--severities only applies with --corruptions"),
    (["--corruptions", "--report", "rep"], "--report does not apply with --corruptions"),
])
def test_cli_bad_values_exit_2(trained_run, capsys, args, message):
    assert main(["evaluate", str(trained_run.run_dir), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("medmix: error:") and message in err and "Traceback" not in err
