"""TrivialAugment-style photometric policies: the old policies draw and return exactly what they did before the
photometric ops existed, each op does what its magnitude says and stays in [0, 255], the op choice covers every op,
data-parallel shards get the rows of the whole batch, evaluation is untouched, and `medmix train` takes them."""
from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from medmix.cli import main
from medmix.config import AUGMENTS
from medmix.data import AUGMENT_POLICIES, AugmentConfig, BatchTransform, get_policy
from medmix.data.transforms import PHOTOMETRIC_OPS
from medmix.errors import ConfigError
from medmix.tune import AUGMENT_CHOICES

# The policies as they were before the photometric fields, and below a frozen copy of the transform of that time:
# the reference an old policy must still match bit for bit.
OLD_POLICIES = {
    "none": {},
    "radiology": dict(rotate=10, scale=(0.9, 1.1), translate=0.05),
    "ultrasound": dict(hflip=True, rotate=15, scale=(0.9, 1.1), translate=0.05),
    "rotation_free": dict(hflip=True, vflip=True, rotate=180, scale=(0.9, 1.1), translate=0.05),
    "medvit_paper": dict(hflip=True, rotate=15, scale=(0.8, 1.2), translate=0.1),
    "rotate_flip_zoom": dict(hflip=True, rotate=15, scale=(0.9, 1.1), translate=0.0),
}
STRONG = {"radiology_strong": "radiology", "ultrasound_strong": "ultrasound", "fundus_strong": "rotation_free",
          "ct_mri_strong": "rotate_flip_zoom"}


def old_transform(x: torch.Tensor, size: int, mean: list[float], std: list[float], p: dict, train: bool,
                  g: torch.Generator | None, rows: slice | None) -> torch.Tensor:
    hflip, vflip = p.get("hflip", False), p.get("vflip", False)
    rotate, scale, translate = p.get("rotate", 0.0), p.get("scale", (1.0, 1.0)), p.get("translate", 0.0)
    theta = None
    if train and (hflip or vflip or rotate or translate or scale != (1.0, 1.0)):
        n = x.shape[0]

        def uniform(lo: float, hi: float) -> torch.Tensor:
            return torch.rand(n, generator=g) * (hi - lo) + lo

        angle = uniform(-rotate, rotate) * (math.pi / 180.0)
        zoom = torch.exp(uniform(math.log(scale[0]), math.log(scale[1])))
        sx = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0) if hflip else torch.ones(n)
        sy = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0) if vflip else torch.ones(n)
        tx, ty = uniform(-translate, translate) * 2, uniform(-translate, translate) * 2
        cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
        theta = torch.stack([torch.stack([cos * sx, -sin * sy, tx], 1), torch.stack([sin * sx, cos * sy, ty], 1)], 1)
    if rows is not None:
        x = x[rows]
        theta = theta[rows] if theta is not None else None
    xf = x.float()
    if theta is not None:
        grid = F.affine_grid(theta, [x.shape[0], x.shape[1], size, size], align_corners=False)
        xf = F.grid_sample(xf, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    elif x.shape[-1] != size or x.shape[-2] != size:
        xf = F.interpolate(xf, size=(size, size), mode="bilinear", align_corners=False, antialias=size < x.shape[-1])
    m, s = torch.tensor(mean).view(1, -1, 1, 1), torch.tensor(std).view(1, -1, 1, 1)
    return ((xf - m * 255.0) / (s * 255.0)).contiguous(memory_format=torch.channels_last)


def images(n: int, c: int = 1, side: int = 28, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, c, side, side), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def raw(policy: AugmentConfig, size: int = 16) -> BatchTransform:
    """Output in the 0..1 float domain (x / 255), so the 0..255 values are the output times 255."""
    return BatchTransform(size, [0.0], [1.0], policy, channels_last=False)


# ----------------------------------------------------------------------------------------------- old policies
@pytest.mark.parametrize("name", list(OLD_POLICIES))
@pytest.mark.parametrize("c,side,size,rows", [(1, 28, 28, None), (3, 28, 32, slice(3, 8)), (1, 40, 28, None)])
def test_old_policies_are_bit_identical_to_before(name, c, side, size, rows):
    assert get_policy(name) == AugmentConfig(**OLD_POLICIES[name])
    x, mean, std = images(12, c, side, seed=side + c), [0.4] * c, [0.2] * c
    tf = BatchTransform(size, mean, std, get_policy(name))
    g_new, g_old = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    for _ in range(2):  # two batches: the second starts where the first left the generator
        new = tf(x, train=True, generator=g_new, rows=rows)
        old = old_transform(x, size, mean, std, OLD_POLICIES[name], True, g_old, rows)
        assert torch.equal(new, old)
        assert torch.equal(g_new.get_state(), g_old.get_state())
    assert torch.equal(tf(x), old_transform(x, size, mean, std, OLD_POLICIES[name], False, None, None))


@pytest.mark.parametrize("strong,base", list(STRONG.items()))
def test_a_strong_policy_is_its_base_affine_plus_one_op_per_image(strong, base):
    c = 3 if strong == "fundus_strong" else 1
    x, pol = images(96, c, 20, seed=1), get_policy(strong)
    assert pol.photometric and not get_policy(base).photometric
    # off, it is its base policy: same output, same draws
    g0, g1 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    plain = raw(get_policy(base))(x, train=True, generator=g0)
    assert torch.equal(raw(replace(pol, photometric=False))(x, train=True, generator=g1), plain)
    assert torch.equal(g0.get_state(), g1.get_state())
    # on, the affine is drawn first and is the base's; then the op per image: identity rows are the base rows
    g2 = torch.Generator().manual_seed(3)
    out = raw(pol)(x, train=True, generator=g2)
    draw = raw(pol).random_photometric(len(x), c, g0)  # g0 stands where the base policy left it
    assert torch.equal(g0.get_state(), g2.get_state())
    ident = draw.op == draw.ops.index("identity")
    assert 0 < int(ident.sum()) < len(x)
    assert torch.equal(out[ident], plain[ident])
    changed = (out - plain).abs().amax((1, 2, 3)) > 0
    assert bool(changed[~ident].all())
    assert out.min() >= 0.0 and out.max() <= 1.0
    # the pixel statistics change: per-image means and spreads move away from the base ones
    assert float((out.mean((1, 2, 3)) - plain.mean((1, 2, 3)))[~ident].abs().mean()) > 1e-3
    assert float((out.std((1, 2, 3)) - plain.std((1, 2, 3)))[~ident].abs().mean()) > 1e-3


# ----------------------------------------------------------------------------------------------- the ops
def ramp(lo: float = 10, hi: float = 240, c: int = 1, n: int = 64) -> torch.Tensor:
    """n copies of a left-to-right grey ramp lo..hi, 16 x 16."""
    return torch.linspace(lo, hi, 16).view(1, 1, 1, 16).expand(n, c, 16, 16).round().to(torch.uint8).contiguous()


def single_op(op: str, m: float, x: torch.Tensor):
    """``x`` through a policy of this one op (no affine): input and output (0..255), the draws, which images drew
    the op, and their factor 1 +- magnitude."""
    n, c = x.shape[:2]
    tf = raw(AugmentConfig(photometric=True, **{op: m}))
    out = tf(x, train=True, generator=torch.Generator().manual_seed(0)) * 255.0
    draw = tf.random_photometric(n, c, torch.Generator().manual_seed(0))
    assert draw.ops == ("identity", op)
    hit = draw.op == 1
    assert 10 < int(hit.sum()) < n - 10  # about half the images draw the op, the rest identity
    torch.testing.assert_close(out[~hit], x[~hit].float(), rtol=1e-5, atol=1e-3)
    f = (1.0 + draw.sign * draw.magnitude).view(-1, 1, 1, 1)
    assert (f[hit] < 1).any() and (f[hit] > 1).any() and float((f[hit] - 1).abs().max()) <= m
    return x.float(), out, draw, hit, f


TOL = dict(rtol=1e-5, atol=1e-3)


def test_brightness_scales_by_its_factor():
    x, out, d, hit, f = single_op("brightness", 0.5, ramp())
    torch.testing.assert_close(out[hit], (x * f).clamp(0, 255)[hit], **TOL)
    assert float(out.max()) == 255.0  # 240 x up to 1.5 clamps


def test_contrast_keeps_the_mean_and_scales_the_spread():
    x, out, d, hit, f = single_op("contrast", 0.3, ramp(60, 190))  # 1.3 x the spread around 125 stays in range
    torch.testing.assert_close(out[hit].mean((1, 2, 3)), x[hit].mean((1, 2, 3)), **TOL)
    torch.testing.assert_close(out[hit].std((1, 2, 3)), f[hit].flatten() * x[hit].std((1, 2, 3)), **TOL)


def test_gamma_bends_the_grey_levels_and_keeps_black_and_white():
    x, out, d, hit, f = single_op("gamma", 0.4, ramp())
    gamma = torch.exp(d.sign * d.magnitude).view(-1, 1, 1, 1)
    torch.testing.assert_close(out[hit], (255.0 * (x / 255.0) ** gamma)[hit], **TOL)
    ends = torch.zeros(32, 1, 16, 16, dtype=torch.uint8)
    ends[..., 8:] = 255
    y = raw(AugmentConfig(photometric=True, gamma=0.4))(ends, train=True, generator=torch.Generator().manual_seed(0))
    assert torch.equal(y[..., :8], torch.zeros_like(y[..., :8]))
    torch.testing.assert_close(y[..., 8:], torch.ones_like(y[..., 8:]))


def test_sharpness_below_one_blurs_and_above_one_sharpens():
    checker = ((torch.arange(16).view(16, 1) + torch.arange(16).view(1, 16)) % 2 * 50 + 100).to(torch.uint8)
    x, out, d, hit, f = single_op("sharpness", 0.8, checker.expand(64, 1, 16, 16).contiguous())
    tv = (out[..., 1:] - out[..., :-1]).abs().mean((1, 2, 3))  # total variation: 50 for the input
    blur, sharp = hit & (f.flatten() < 0.9), hit & (f.flatten() > 1.1)
    assert blur.any() and sharp.any()
    assert bool((tv[blur] < 50).all()) and bool((tv[sharp] > 50).all())
    # inside the image a checker pixel moves to its 3 x 3 SMOOTH blur (9a + 4b) / 13 plus f times the rest
    a, b = x[:, :, 5, 5], x[:, :, 5, 6]
    blurred = (9 * a + 4 * b) / 13
    torch.testing.assert_close(out[:, :, 5, 5], blurred + f[:, :, 0, 0] * (a - blurred), **TOL)
    flat = raw(AugmentConfig(photometric=True, sharpness=0.8))(torch.full((16, 1, 8, 8), 77, dtype=torch.uint8),
                                                                train=True, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(flat * 255.0, torch.full_like(flat, 77.0), **TOL)  # a flat image: nothing to change


def test_noise_has_the_drawn_spread_and_speckle_follows_the_pixel_value():
    x, out, d, hit, _ = single_op("noise", 0.03, ramp(40, 215, n=128))  # > 5 std from 0 and 255: no clamping
    resid = (out - x)[hit]
    torch.testing.assert_close(resid.std((1, 2, 3)), d.magnitude[hit] * 255.0, rtol=0.15, atol=0.1)
    assert float(resid.mean().abs()) < 0.3
    x, out, d, hit, _ = single_op("speckle", 0.2, ramp(10, 180, n=128))
    dark, bright = (out - x)[hit][..., :4].std(), (out - x)[hit][..., -4:].std()
    assert bright > 4 * dark  # multiplicative: about 5 x the noise where the grey level is 5 x higher


def test_saturation_keeps_the_grey_image_and_is_only_drawn_for_colour():
    r = ramp(60, 190, c=1)
    x = torch.cat([r, 250 - r, torch.full_like(r, 125)], 1)  # a colour image; 1.5 x its colourfulness stays in range
    x, out, d, hit, f = single_op("saturation", 0.5, x)
    w = torch.tensor([0.2989, 0.587, 0.114]).view(1, 3, 1, 1)
    g = (x * w).sum(1, keepdim=True)
    torch.testing.assert_close(out[hit], (g + f * (x - g))[hit], **TOL)
    assert float((out[hit] - x[hit]).abs().max()) > 20
    # the grey image moves only by the luma weights' rounding (they sum to 0.9999)
    torch.testing.assert_close((out * w).sum(1)[hit], (x * w).sum(1)[hit], rtol=0, atol=0.02)
    assert get_policy("fundus_strong").photometric_ops(1) == ("identity", "brightness", "contrast", "gamma")
    assert AugmentConfig(photometric=True, saturation=0.5).photometric_ops(1) == ()
    gen = torch.Generator().manual_seed(0)  # nothing left to draw for a grey image: no draws at all
    BatchTransform(8, [0.5], [0.5], AugmentConfig(photometric=True, saturation=0.5))(images(4, 1, 8), train=True,
                                                                                    generator=gen)
    assert torch.equal(gen.get_state(), torch.Generator().manual_seed(0).get_state())


def test_the_op_choice_covers_every_op_uniformly():
    every = AugmentConfig(photometric=True, brightness=0.3, contrast=0.3, gamma=0.3, sharpness=0.5, noise=0.03,
                          speckle=0.2, saturation=0.3)
    assert every.photometric_ops(3) == PHOTOMETRIC_OPS
    n = 4000
    d = raw(every, 8).random_photometric(n, 3, torch.Generator().manual_seed(0))
    counts = torch.bincount(d.op, minlength=len(d.ops))
    assert int(counts.min()) > 0.85 * n / len(d.ops) and int(counts.max()) < 1.15 * n / len(d.ops)
    for k, op in enumerate(d.ops):
        m = d.magnitude[d.op == k]
        top = 0.0 if op == "identity" else getattr(every, op)
        assert float(m.min()) >= 0.0 and float(m.max()) <= top and float(m.max()) >= 0.95 * top
        assert 0.35 < float((d.sign[d.op == k] > 0).float().mean()) < 0.65
    noisy = int(counts[d.ops.index("noise")] + counts[d.ops.index("speckle")])
    assert d.noise.shape == (noisy, 3, 8, 8)
    y = raw(every, 8)(images(n, 3, 8), train=True, generator=torch.Generator().manual_seed(0))
    assert y.min() >= 0.0 and y.max() <= 1.0


@pytest.mark.parametrize("name", list(STRONG))
def test_shards_get_the_rows_of_the_whole_batch(name):
    c = 3 if name == "fundus_strong" else 1
    x, tf = images(10, c, 20, seed=2), BatchTransform(24, [0.5] * c, [0.2] * c, get_policy(name))
    g = torch.Generator().manual_seed(5)
    whole = [tf(x, train=True, generator=g) for _ in range(2)]
    shards = [slice(0, 4), slice(4, 7), slice(7, 10)]
    for rows in shards:  # each process: its rows of the same two batches, from the same seed
        gs = torch.Generator().manual_seed(5)
        for w in whole:
            assert torch.equal(tf(x, train=True, generator=gs, rows=rows), w[rows])
        assert torch.equal(gs.get_state(), g.get_state())


@pytest.mark.parametrize("name", list(STRONG))
def test_evaluation_is_untouched(name):
    c = 3 if name == "fundus_strong" else 1
    x, gen = images(6, c, 28), torch.Generator().manual_seed(0)
    plain = BatchTransform(28, [0.3] * c, [0.2] * c)
    strong = BatchTransform(28, [0.3] * c, [0.2] * c, get_policy(name))
    assert torch.equal(strong(x), plain(x)) and torch.equal(strong(x, train=False, generator=gen), plain(x))
    assert torch.equal(gen.get_state(), torch.Generator().manual_seed(0).get_state())


# ----------------------------------------------------------------------------------------------- names and options
def test_the_strong_policies_are_offered_everywhere():
    assert set(AUGMENTS) == set(AUGMENT_POLICIES)
    assert set(STRONG) <= set(AUGMENTS) and set(STRONG) <= set(AUGMENT_CHOICES)
    assert set(AUGMENT_CHOICES) <= set(AUGMENT_POLICIES)
    assert not get_policy("radiology_strong").hflip and not get_policy("radiology_strong").vflip
    assert get_policy("ultrasound_strong").speckle > 0 and get_policy("ultrasound_strong").noise == 0
    assert not get_policy("radiology_strong").identity  # so BatchNorm statistics are re-estimated after training


@pytest.mark.parametrize("kw,msg", [(dict(photometric=True), "at least one op"),
                                    (dict(brightness=1.5), "brightness maximum must be at most 1"),
                                    (dict(noise=-0.1), "noise maximum must be a number >= 0"),
                                    (dict(gamma=float("nan")), "gamma maximum must be a number >= 0")])
def test_bad_op_maxima_are_config_errors(kw, msg):
    with pytest.raises(ConfigError, match=msg):
        AugmentConfig(**kw)


def test_train_radiology_strong_through_the_command_line(tmp_path, packed_data, capsys):
    out = tmp_path / "strong"
    assert main(["train", "--dataset", str(packed_data), "--augment", "radiology_strong", "--epochs", "1",
                 "--batch-size", "16", "--no-ood", "--out", str(out), "--quiet"]) == 0
    assert json.loads((out / "config.json").read_text())["augment"] == "radiology_strong"
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines() if line.strip()]
    assert len(log) == 1 and math.isfinite(log[0]["train_loss"])
    capsys.readouterr()
    assert main(["train", "--dataset", str(packed_data), "--augment", "radiology_stronger", "--epochs", "1",
                 "--no-ood", "--out", str(tmp_path / "bad"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("medmix: error: unknown augmentation 'radiology_stronger'") and err.count("\n") == 1, err
    assert "radiology_strong" in err
