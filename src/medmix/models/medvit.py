"""MedViT: a hybrid CNN-Transformer for medical image classification.

Paper: O. N. Manzari, H. Ahmadabadi, H. Kashiani, S. B. Shokouhi, A. Ayatollahi, "MedViT: A robust vision
transformer for generalized medical image classification", Computers in Biology and Medicine 157 (2023) 106791.
Official code: https://github.com/Omid-Nejati/MedViT (``MedViT.py``), itself derived from Next-ViT.

Layout (as in the official ``MedViT.py``)::

    stem       ConvBNReLU(in_chans, 64, s2) -> ConvBNReLU(64, 32) -> ConvBNReLU(32, 64) -> ConvBNReLU(64, 64, s2)
    stage 0    [ECB] * d0                              widths [96] * d0                           stride 1
    stage 1    [ECB] * (d1 - 1) + [LTB]                widths [192] * (d1 - 1) + [256]            stride 2, sr 4
    stage 2    [ECB, ECB, ECB, ECB, LTB] * (d2 // 5)   widths [384, 384, 384, 384, 512] * (...)   stride 2, sr 2
    stage 3    [ECB] * (d3 - 1) + [LTB]                widths [768] * (d3 - 1) + [1024]           stride 2, sr 1
    head       BatchNorm2d(1024) -> AdaptiveAvgPool2d(1) -> flatten -> [Dropout] -> Linear(num_classes)

All blocks live in one flat ``nn.Sequential`` called ``features`` (official naming). The stride of a stage is
applied by the ``PatchEmbed`` of its first block (2x2 average pool, ``ceil_mode=True``, then 1x1 conv + BN).
``sr_ratios[0]`` (8) is never used because stage 0 holds no LTB -- this is also true of the official code.

* **ECB** (Efficient Convolution Block): ``x = PatchEmbed(x); x = x + DropPath(MHCA(x)); x = x + LFFN(BN(x))``.
* **MHCA** (multi-head convolutional attention): grouped 3x3 conv (``channels // head_dim`` groups) -> BN -> ReLU ->
  1x1 projection.
* **LFFN** (``LocalityFeedForward``, from LocalViT): 1x1 expand -> BN -> h-swish -> depthwise 3x3 -> BN -> h-swish
  -> SE -> 1x1 -> BN, *with its own inner residual*; so a block computes ``x + (y + LFFN_body(y))`` with
  ``y = BN(x)``, exactly like the official code. ECB uses expand ratio 3, LTB 2; the SE ``reduction`` is the block
  width, so the SE bottleneck has ``expand_ratio`` (3 or 2) hidden units (official behaviour, kept).
* **LTB** (Local Transformer Block): ``PatchEmbed`` to ``c1 = make_divisible(0.75 * out, 32)`` channels,
  ``x = x + DropPath(E_MHSA(BN(x)))`` on the token sequence, then ``y = PatchEmbed(x)`` to ``out - c1`` channels,
  ``y = y + DropPath(MHCA(y))``, ``x = cat([x, y])`` and ``x = x + LFFN(BN(x))``. The two drop-path rates are
  ``rate * 0.75`` and ``rate * 0.25`` as in the official code.
* **E_MHSA**: multi-head self-attention (head dim 32) whose keys/values come from a token sequence shortened by
  ``AvgPool1d(kernel=sr**2)`` over the *flattened* (row-major) sequence followed by ``BatchNorm1d`` -- the official
  code pools the 1-D sequence, not an ``sr x sr`` window of the 2-D map, and this module does the same.

State-dict compatibility with the official implementation
---------------------------------------------------------
Every parameter and buffer name and shape is the official one (``stem.0.conv.weight``, ``features.6.e_mhsa.q.weight``,
``features.6.conv.conv.6.fc.0.weight``, ``norm.running_mean``, ``proj_head.0.weight`` ...), so an official
checkpoint loads with ``load_state_dict(strict=True)`` except where the shapes below differ by construction:

* ``stem.0.conv.weight`` is ``(64, in_chans, 3, 3)``; the official stem is hard-wired to 3 input channels. For
  ``in_chans=1`` sum an official kernel over its input-channel axis (timm's ``adapt_input_conv`` does this).
* ``proj_head.0.weight`` / ``proj_head.0.bias`` are ``(num_classes, 1024)`` / ``(num_classes,)``.

Nothing else differs: h-swish / h-sigmoid are ``nn.Hardswish`` / ``nn.Hardsigmoid`` (same functions, no
parameters), the official ``self.sr = nn.AvgPool1d`` (no parameters) is a functional call here, and the
``Dropout`` of the head (``drop_rate``) has no parameters, and a zero drop-path rate gives ``nn.Identity``
instead of ``DropPath(0.0)``.

Behavioural deviations from the official code
---------------------------------------------
1. ``in_chans`` is configurable (official: always 3).
2. Spatial-reduction pooling is clamped: the kernel is ``min(sr**2, N)`` for ``N`` tokens, so maps with fewer tokens
   than ``sr**2`` still work (the official code fails there, e.g. for inputs below 25 px or very thin images). At
   28 px the stage-1 LTB sees 4x4 = 16 = 4**2 tokens, so the official code and this one agree from 28 px up: when
   ``N >= sr**2`` the result is identical. Like the official ``AvgPool1d`` it floors, i.e. trailing tokens that do
   not fill a window are dropped when ``N`` is not a multiple of the kernel.
3. ``drop_rate`` is classifier dropout before the linear head (timm convention; the official head has none).
   The official ``drop`` argument (dropout after the E_MHSA output projection) is called ``proj_drop`` here and
   the official ``path_dropout`` is ``drop_path_rate``; ``attn_drop`` keeps its name. The official ECB accepts
   ``drop`` but never uses it (its MLP is commented out), so ECB here does not take it.
4. Attention uses ``F.scaled_dot_product_attention`` (same maths as the official explicit softmax attention).
5. The official ``merge_bn`` (inference BN folding) is not ported: it refers to an ``mlp`` attribute that the
   official blocks no longer create, so it cannot run there either. The ``print`` in the constructor is dropped.
6. ``forward_features`` / ``forward_head`` are split timm-style; ``forward`` computes the same as the official one.
7. Bad ``depths`` raise ``ValueError`` up front: ``depths[2]`` must be a positive multiple of 5 (the official code
   fails with an ``IndexError`` otherwise).

The default stochastic-depth rates of the builders follow the official registrations (0.1 for small, 0.2 for base
and large); :func:`medmix.models.create_model` and ``medmix train`` keep them unless ``drop_path_rate`` is given.

Parameter counts (num_classes=9, in_chans=3; in_chans=1 is 64 * 2 * 9 = 1,152 fewer)
--------------------------------------------------------------------------------------
================  ===============  ==============  ========
model             this module      official code   paper
================  ===============  ==============  ========
``medvit_small``  31,145,665       31,145,665      ~10 M
``medvit_base``   44,415,197       44,415,197      ~23 M
``medvit_large``  57,684,729       57,684,729      ~45 M
================  ===============  ==============  ========

We match the official code, not the paper: an official state dict must load, which fixes every shape, and the
paper's counts do not follow from the released configuration. (In the released code the LFFNs -- expand ratio 3 in
ECB, 2 in LTB, at widths up to 1024 -- alone hold 22.0 M of MedViT-S's 31.1 M parameters, and stage 3 holds 16.1 M.)
Checked against a transcription of the official ``MedViT.py``: identical state-dict keys (832 / 1232 / 1632 entries)
and shapes for 3 channels, and identical logits (float32 rounding) after ``load_state_dict(official.state_dict(),
strict=True)`` at 28, 64 and 224 px.

Input sizes: any size >= 28 px works (28 -> 14 -> 7 after the stem, then 7 -> 4 -> 2 -> 1 through the stride-2
stages with ``ceil_mode`` pooling). Training needs a batch of at least 2 at 28 px because BatchNorm then sees
1x1 maps (true of any BN network).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from functools import partial

import torch
import torch.nn.functional as F
from timm.layers import DropPath, trunc_normal_
from torch import nn
from torch.utils.checkpoint import checkpoint

from ._registry import Classifier, register_model

__all__ = ["ECB", "E_MHSA", "LTB", "MHCA", "ConvBNReLU", "ECALayer", "LocalityFeedForward", "MedViT", "PatchEmbed",
           "SELayer", "medvit_base", "medvit_large", "medvit_small"]

NORM_EPS = 1e-5


def _make_divisible(v: float, divisor: int, min_value: int | None = None) -> int:
    """Round ``v`` to the nearest multiple of ``divisor`` without going down by more than 10 %."""
    min_value = divisor if min_value is None else min_value
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


class ConvBNReLU(nn.Module):
    """Conv (no bias) -> BatchNorm -> ReLU; the stem layer."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1, groups: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=kernel_size // 2,
                              groups=groups, bias=False)
        self.norm = nn.BatchNorm2d(out_channels, eps=NORM_EPS)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.norm(self.conv(x)))


class PatchEmbed(nn.Module):
    """Downsample / re-width: 2x2 avg-pool + 1x1 conv + BN (stride 2), 1x1 conv + BN (widths differ) or identity."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"PatchEmbed stride must be 1 or 2, got {stride}")
        if stride == 2:
            # ceil_mode keeps odd maps (7 -> 4 -> 2 -> 1 at 28 px input); count_include_pad=False averages only real
            # pixels in the partial border windows.
            self.avgpool: nn.Module = nn.AvgPool2d(2, stride=2, ceil_mode=True, count_include_pad=False)
        else:
            self.avgpool = nn.Identity()
        if stride == 2 or in_channels != out_channels:
            self.conv: nn.Module = nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=False)
            self.norm: nn.Module = nn.BatchNorm2d(out_channels, eps=NORM_EPS)
        else:
            self.conv = nn.Identity()
            self.norm = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(self.avgpool(x)))


class MHCA(nn.Module):
    """Multi-Head Convolutional Attention: grouped 3x3 conv (one group per head) -> BN -> ReLU -> 1x1 projection."""

    def __init__(self, out_channels: int, head_dim: int = 32):
        super().__init__()
        if out_channels % head_dim:
            raise ValueError(f"MHCA width {out_channels} is not a multiple of head_dim {head_dim}")
        self.group_conv3x3 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1,
                                       groups=out_channels // head_dim, bias=False)
        self.norm = nn.BatchNorm2d(out_channels, eps=NORM_EPS)
        self.act = nn.ReLU(inplace=True)
        self.projection = nn.Conv2d(out_channels, out_channels, kernel_size=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projection(self.act(self.norm(self.group_conv3x3(x))))


class SELayer(nn.Module):
    """Squeeze-and-excitation with a hard-sigmoid gate (``channel // reduction`` hidden units)."""

    def __init__(self, channel: int, reduction: int = 4):
        super().__init__()
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Sequential(nn.Linear(channel, channel // reduction), nn.ReLU(inplace=True),
                                nn.Linear(channel // reduction, channel), nn.Hardsigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c = x.shape[:2]
        return x * self.fc(self.avg_pool(x).view(b, c)).view(b, c, 1, 1)


class ECALayer(nn.Module):
    """Efficient channel attention (1-D conv across channels); only used with ``act='hs+eca'`` / ``'hs+ecah'``."""

    def __init__(self, channel: int, gamma: int = 2, b: int = 1, sigmoid: bool = True):
        super().__init__()
        t = int(abs((math.log2(channel) + b) / gamma))
        k = t if t % 2 else t + 1
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.conv = nn.Conv1d(1, 1, kernel_size=k, padding=k // 2, bias=False)
        self.sigmoid: nn.Module = nn.Sigmoid() if sigmoid else nn.Hardsigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.avg_pool(x).squeeze(-1).transpose(-1, -2)  # B, 1, C
        y = self.conv(y).transpose(-1, -2).unsqueeze(-1)  # B, C, 1, 1
        return x * self.sigmoid(y)


class LocalityFeedForward(nn.Module):
    """LFFN: 1x1 expand -> BN -> act -> depthwise 3x3 -> BN -> act -> [SE | ECA] -> 1x1 -> BN, plus a residual.

    ``act`` is ``"relu"`` (ReLU6) or ``"hs"`` (h-swish), optionally followed by ``"+se"``, ``"+eca"`` or ``"+ecah"``
    (ECA with a hard sigmoid); MedViT uses ``"hs+se"``. The layers sit in one ``nn.Sequential`` named ``conv`` so
    that the official indices (``conv.0`` expand, ``conv.3`` depthwise, ``conv.6`` SE, ``conv.7`` project) hold.
    """

    def __init__(self, in_dim: int, out_dim: int | None = None, stride: int = 1, expand_ratio: float = 4.0,
                 act: str = "hs+se", reduction: int = 4):
        super().__init__()
        out_dim = in_dim if out_dim is None else out_dim
        if out_dim != in_dim or stride != 1:
            raise ValueError("LocalityFeedForward has a residual: in_dim must equal out_dim and stride must be 1")
        hidden_dim = int(in_dim * expand_ratio)
        base_act, _, attn = act.partition("+")
        if base_act not in ("hs", "relu"):
            raise ValueError(f"unknown LFFN activation {act!r}")
        act_layer = nn.Hardswish if base_act == "hs" else partial(nn.ReLU6, inplace=True)

        layers = [nn.Conv2d(in_dim, hidden_dim, 1, bias=False), nn.BatchNorm2d(hidden_dim), act_layer(),
                  nn.Conv2d(hidden_dim, hidden_dim, 3, stride, 1, groups=hidden_dim, bias=False),
                  nn.BatchNorm2d(hidden_dim), act_layer()]
        if attn == "se":
            layers.append(SELayer(hidden_dim, reduction=reduction))
        elif attn in ("eca", "ecah"):
            layers.append(ECALayer(hidden_dim, sigmoid=attn == "eca"))
        elif attn:
            raise ValueError(f"unknown LFFN attention {attn!r} in act={act!r}")
        layers += [nn.Conv2d(hidden_dim, out_dim, 1, bias=False), nn.BatchNorm2d(out_dim)]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x)


class E_MHSA(nn.Module):
    """Efficient multi-head self-attention: keys/values from an ``sr**2``-fold average-pooled token sequence.

    Input and output are token sequences ``(B, N, C)``. For ``sr_ratio > 1`` the sequence is pooled with kernel and
    stride ``min(sr_ratio**2, N)`` and batch-normalised before the key/value projections.
    """

    def __init__(self, dim: int, out_dim: int | None = None, head_dim: int = 32, qkv_bias: bool = True,
                 qk_scale: float | None = None, attn_drop: float = 0.0, proj_drop: float = 0.0, sr_ratio: int = 1):
        super().__init__()
        if dim % head_dim:
            raise ValueError(f"E_MHSA width {dim} is not a multiple of head_dim {head_dim}")
        self.dim = dim
        self.out_dim = dim if out_dim is None else out_dim
        self.num_heads = dim // head_dim
        self.head_dim = head_dim
        self.scale = qk_scale or head_dim ** -0.5
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.k = nn.Linear(dim, dim, bias=qkv_bias)
        self.v = nn.Linear(dim, dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, self.out_dim)
        self.attn_drop = attn_drop
        self.proj_drop = nn.Dropout(proj_drop)
        self.sr_ratio = sr_ratio
        self.N_ratio = sr_ratio ** 2
        if sr_ratio > 1:
            self.norm = nn.BatchNorm1d(dim, eps=NORM_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        q = self.q(x).reshape(B, N, self.num_heads, self.head_dim).transpose(1, 2)
        if self.sr_ratio > 1:
            kernel = min(self.N_ratio, N)  # clamp: small maps (e.g. 28 px inputs) have fewer tokens than sr**2
            kv = F.avg_pool1d(x.transpose(1, 2), kernel, kernel)
            kv = self.norm(kv).transpose(1, 2)
        else:
            kv = x
        k = self.k(kv).reshape(B, -1, self.num_heads, self.head_dim).transpose(1, 2)
        v = self.v(kv).reshape(B, -1, self.num_heads, self.head_dim).transpose(1, 2)
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0,
                                           scale=self.scale)
        x = x.transpose(1, 2).reshape(B, N, C)
        return self.proj_drop(self.proj(x))


class ECB(nn.Module):
    """Efficient Convolution Block: ``PatchEmbed`` -> residual MHCA (drop path) -> residual LFFN on ``BN(x)``."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, path_dropout: float = 0.0,
                 head_dim: int = 32, mlp_ratio: float = 3.0):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.patch_embed = PatchEmbed(in_channels, out_channels, stride)
        self.mhca = MHCA(out_channels, head_dim)
        self.attention_path_dropout = DropPath(path_dropout) if path_dropout > 0 else nn.Identity()
        self.conv = LocalityFeedForward(out_channels, out_channels, 1, mlp_ratio, reduction=out_channels)
        self.norm = nn.BatchNorm2d(out_channels, eps=NORM_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        x = x + self.attention_path_dropout(self.mhca(x))
        return x + self.conv(self.norm(x))


class LTB(nn.Module):
    """Local Transformer Block: E_MHSA on ``mix_block_ratio`` of the channels, MHCA on the rest, concat, LFFN."""

    def __init__(self, in_channels: int, out_channels: int, path_dropout: float = 0.0, stride: int = 1,
                 sr_ratio: int = 1, mlp_ratio: float = 2.0, head_dim: int = 32, mix_block_ratio: float = 0.75,
                 attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.mix_block_ratio = mix_block_ratio
        self.mhsa_out_channels = _make_divisible(int(out_channels * mix_block_ratio), 32)
        self.mhca_out_channels = out_channels - self.mhsa_out_channels
        if self.mhca_out_channels <= 0:
            raise ValueError(f"LTB width {out_channels} leaves no channels for MHCA at ratio {mix_block_ratio}")

        self.patch_embed = PatchEmbed(in_channels, self.mhsa_out_channels, stride)
        self.norm1 = nn.BatchNorm2d(self.mhsa_out_channels, eps=NORM_EPS)
        self.e_mhsa = E_MHSA(self.mhsa_out_channels, head_dim=head_dim, sr_ratio=sr_ratio, attn_drop=attn_drop,
                             proj_drop=proj_drop)
        mhsa_dp = path_dropout * mix_block_ratio
        self.mhsa_path_dropout = DropPath(mhsa_dp) if mhsa_dp > 0 else nn.Identity()

        self.projection = PatchEmbed(self.mhsa_out_channels, self.mhca_out_channels, stride=1)
        self.mhca = MHCA(self.mhca_out_channels, head_dim=head_dim)
        mhca_dp = path_dropout * (1 - mix_block_ratio)
        self.mhca_path_dropout = DropPath(mhca_dp) if mhca_dp > 0 else nn.Identity()

        self.norm2 = nn.BatchNorm2d(out_channels, eps=NORM_EPS)
        self.conv = LocalityFeedForward(out_channels, out_channels, 1, mlp_ratio, reduction=out_channels)

    @property
    def sr_ratio(self) -> int:
        return self.e_mhsa.sr_ratio

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        B, C, H, W = x.shape
        out = self.norm1(x).flatten(2).transpose(1, 2)  # B, HW, C
        out = self.mhsa_path_dropout(self.e_mhsa(out))
        x = x + out.transpose(1, 2).reshape(B, C, H, W)

        out = self.projection(x)
        out = out + self.mhca_path_dropout(self.mhca(out))
        x = torch.cat([x, out], dim=1)
        return x + self.conv(self.norm2(x))


class MedViT(Classifier):
    """MedViT with the official block layout; ``forward`` returns logits ``(B, num_classes)``.

    Args:
        num_classes: classifier outputs (0 makes the head an identity).
        in_chans: input channels (official: always 3).
        img_size: nominal input size; recorded only, the network accepts any size >= 28.
        stem_chs: widths of the stem convolutions (official ``[64, 32, 64]``).
        depths: blocks per stage; ``depths[2]`` must be a multiple of 5.
        drop_path_rate: stochastic-depth rate, increasing linearly over all blocks (official ``path_dropout``).
        attn_drop: attention-probability dropout in E_MHSA.
        proj_drop: dropout after the E_MHSA output projection (official ``drop``).
        drop_rate: dropout before the classifier (not in the official code).
        strides: stride of the first block of each stage.
        sr_ratios: E_MHSA spatial-reduction ratio per stage.
        head_dim: channels per head in MHCA and E_MHSA.
        mix_block_ratio: fraction of an LTB's output channels produced by E_MHSA.
        use_checkpoint: gradient checkpointing over the blocks.
    """

    def __init__(self, *, num_classes: int = 1000, in_chans: int = 3, img_size: int = 224,
                 stem_chs: Sequence[int] = (64, 32, 64), depths: Sequence[int] = (3, 4, 10, 3),
                 drop_path_rate: float = 0.1, attn_drop: float = 0.0, proj_drop: float = 0.0, drop_rate: float = 0.0,
                 strides: Sequence[int] = (1, 2, 2, 2), sr_ratios: Sequence[int] = (8, 4, 2, 1), head_dim: int = 32,
                 mix_block_ratio: float = 0.75, use_checkpoint: bool = False):
        super().__init__()
        depths = list(depths)
        if len(depths) != 4 or len(strides) != 4 or len(sr_ratios) != 4 or len(stem_chs) != 3:
            raise ValueError("MedViT needs 4 depths, 4 strides, 4 sr_ratios and 3 stem_chs")
        if depths[0] < 1 or depths[1] < 1 or depths[3] < 1 or depths[2] < 5 or depths[2] % 5:
            raise ValueError(f"MedViT depths must be positive with depths[2] a multiple of 5, got {depths}")
        self.num_classes, self.in_chans, self.img_size, self.drop_rate = num_classes, in_chans, img_size, drop_rate
        self.depths, self.sr_ratios = tuple(depths), tuple(sr_ratios)
        self.grad_checkpointing = use_checkpoint

        self.stage_out_channels = [[96] * depths[0], [192] * (depths[1] - 1) + [256],
                                   [384, 384, 384, 384, 512] * (depths[2] // 5), [768] * (depths[3] - 1) + [1024]]
        # "Next Hybrid Strategy": convolution blocks with a transformer block closing each group.
        self.stage_block_types: list[list[type[nn.Module]]] = [[ECB] * depths[0], [ECB] * (depths[1] - 1) + [LTB],
                                                               [ECB, ECB, ECB, ECB, LTB] * (depths[2] // 5),
                                                               [ECB] * (depths[3] - 1) + [LTB]]

        self.stem = nn.Sequential(ConvBNReLU(in_chans, stem_chs[0], kernel_size=3, stride=2),
                                  ConvBNReLU(stem_chs[0], stem_chs[1], kernel_size=3, stride=1),
                                  ConvBNReLU(stem_chs[1], stem_chs[2], kernel_size=3, stride=1),
                                  ConvBNReLU(stem_chs[2], stem_chs[2], kernel_size=3, stride=2))

        dpr = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()  # stochastic depth decay rule
        blocks: list[nn.Module] = []
        self.block_stage: list[int] = []  # stage index of every block in ``features``
        in_ch = stem_chs[-1]
        idx = 0
        for stage_id, depth in enumerate(depths):
            for block_id in range(depth):
                stride = 2 if strides[stage_id] == 2 and block_id == 0 else 1
                out_ch = self.stage_out_channels[stage_id][block_id]
                if self.stage_block_types[stage_id][block_id] is ECB:
                    block: nn.Module = ECB(in_ch, out_ch, stride=stride, path_dropout=dpr[idx], head_dim=head_dim)
                else:
                    block = LTB(in_ch, out_ch, path_dropout=dpr[idx], stride=stride, sr_ratio=sr_ratios[stage_id],
                                head_dim=head_dim, mix_block_ratio=mix_block_ratio, attn_drop=attn_drop,
                                proj_drop=proj_drop)
                blocks.append(block)
                self.block_stage.append(stage_id)
                in_ch = out_ch
                idx += 1
        self.features = nn.Sequential(*blocks)
        self.stage_out_idx = [sum(depths[: i + 1]) - 1 for i in range(len(depths))]
        self.num_features = self.head_hidden_size = in_ch

        self.norm = nn.BatchNorm2d(in_ch, eps=NORM_EPS)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.head_drop = nn.Dropout(drop_rate)
        self.proj_head = nn.Sequential(nn.Linear(in_ch, num_classes) if num_classes > 0 else nn.Identity())

        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        """Official init: truncated normal (std 0.02) for Linear and Conv2d, zero biases, unit/zero norms."""
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d, nn.GroupNorm, nn.LayerNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.proj_head[0]

    def reset_classifier(self, num_classes: int) -> None:
        self.num_classes = num_classes
        head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self._init_weights(head)
        self.proj_head = nn.Sequential(head)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Stem, all blocks and the final BatchNorm: ``(B, in_chans, H, W) -> (B, 1024, ~H/32, ~W/32)``."""
        x = self.stem(x)
        if self.grad_checkpointing and torch.is_grad_enabled():
            for block in self.features:
                x = checkpoint(block, x, use_reentrant=False)
        else:
            x = self.features(x)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = torch.flatten(self.avgpool(x), 1)
        return x if pre_logits else self.proj_head(self.head_drop(x))


_PAPER = "Manzari et al. 2023, MedViT"


def _register(size: str, depths: tuple[int, ...], drop_path_rate: float, params: str) -> Callable[..., MedViT]:
    def build(*, num_classes: int = 2, in_chans: int = 1, img_size: int = 224, drop_rate: float = 0.0,
              drop_path_rate: float = drop_path_rate, **kwargs) -> MedViT:
        return MedViT(num_classes=num_classes, in_chans=in_chans, img_size=img_size, stem_chs=(64, 32, 64),
                      depths=depths, drop_rate=drop_rate, drop_path_rate=drop_path_rate, **kwargs)

    build.__name__ = build.__qualname__ = f"medvit_{size}"
    build.__doc__ = f"MedViT-{size[0].upper()} (official MedViT_{size}): depths {list(depths)}, {params} parameters."
    return register_model(family="medvit", paper=_PAPER, default_img_size=224, min_img_size=28)(build)


medvit_small = _register("small", (3, 4, 10, 3), 0.1, "31.1 M")
medvit_base = _register("base", (3, 4, 20, 3), 0.2, "44.4 M")
medvit_large = _register("large", (3, 4, 30, 3), 0.2, "57.7 M")
