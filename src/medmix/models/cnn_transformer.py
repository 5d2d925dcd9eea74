"""CNN + Transformer hybrid for Medical MNIST.

Reimplements the ``MedicalMNISTCNN`` model of the technical report *"A CNN + Transformer model for Medical
MNIST"* (Medical MNIST, Kaggle ``andrewmvd/medical-mnist``: 6 grey-scale classes, 64×64 px): a stack of
convolutional blocks (conv → batch norm → ReLU → max pool, widening at every block, dropout), the last feature
map flattened into a token sequence with a positional encoding, a transformer block with 4-head self-attention and
a position-wise feed-forward network (LayerNorm, residual connections), then dropout and a linear classifier.

What the report fixes and what it leaves open
---------------------------------------------
Taken from the report: conv → BN → ReLU → max-pool blocks whose width grows block by block with dropout in
between; one transformer block with **4 attention heads**, a positional encoding and layer normalisation; dropout
before the fully-connected classifier; Adam, learning rate ``1e-3``, cross-entropy, batch size 64 for training and
32 for validation/test, 10 epochs, early stopping on the validation loss, images resized to 224×224 and scaled to
[0, 1], augmentation by rotation, flip and zoom, a 70/15/15 split (its training log shows 553 steps of 64 per epoch,
i.e. about 35.4 k training images — closer to 60 % of the 58 954 images than 70 %).

Not given by the report, chosen here (all are constructor arguments):

* three blocks of widths ``32 → 64 → 128`` (3×3 convs, each followed by a 2×2 max pool: total stride 8);
* dropout ``0.1`` after every conv block (``conv_drop_rate``) and ``0.3`` before the classifier (``drop_rate``,
  the builder's default; :func:`medmix.models.create_model` passes its own ``drop_rate``, 0.0 unless asked);
* ``d_model = 128`` (equal to the last conv width, so no projection is needed), FFN width ``4 × 128 = 512``
  with GELU, one block (``depth=1``);
* pre-norm residual blocks (timm's ViT ``Block``) followed by a final LayerNorm (the report does not say pre- or
  post-norm; pre-norm trains more stably and makes the final norm meaningful);
* a learned positional embedding sized from ``img_size`` (``pos_embed="learned"``), bicubically resized when the
  runtime token grid differs; ``pos_embed="sincos"`` gives a fixed 2-D sine-cosine encoding for any grid;
* mean pooling over the tokens before the head.

Parameter count (6 classes, 1 channel): 293,350 at 28 px, 300,390 at 64 px (default), 392,550 at 224 px — the
learned positional embedding (``N × 128``) is the only size-dependent part; 3 input channels add 576.

Token grid / Grad-CAM
---------------------
Each block halves the resolution with a floor, so an ``H × W`` input gives a ``H // 8 × W // 8`` grid of
``N = (H // 8) · (W // 8)`` tokens: 28 px → 3×3 (9 tokens), 64 px → 8×8 (64), 224 px → 28×28 (784).
``grid_size``, ``feature_grid(x)`` and ``tokens_to_map(tokens, grid)`` give and use that grid; ``gradcam_layer`` is the
last conv block, whose output ``(B, 128, H // 8, W // 8)`` is the map the tokens are made from.
"""
from __future__ import annotations

import inspect
import math
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from timm.layers import Attention, Mlp  # the transformer block's self-attention and feed-forward network
from timm.models.vision_transformer import Block as TransformerBlock  # pre-norm, stochastic depth
from torch import nn

from ._registry import Classifier, init_weights, register_model

__all__ = ["Attention", "CNNTransformer", "ConvBlock", "Mlp", "TransformerBlock", "cnn_transformer",
           "sincos_pos_embed_2d"]

PosEmbedKind = Literal["learned", "sincos", "none"]


class ConvBlock(nn.Module):
    """3×3 conv (no bias) → BatchNorm → ReLU → 2×2 max pool → dropout. Halves H and W (floor)."""

    def __init__(self, in_chs: int, out_chs: int, drop_rate: float = 0.0) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_chs, out_chs, kernel_size=3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(out_chs)
        self.act = nn.ReLU(inplace=True)
        self.pool = nn.MaxPool2d(kernel_size=2, stride=2)
        self.drop = nn.Dropout(drop_rate) if drop_rate > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.pool(self.act(self.bn(self.conv(x)))))


def sincos_pos_embed_2d(h: int, w: int, dim: int, temperature: float = 10000.0,
                        device: torch.device | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Fixed 2-D sine-cosine positional encoding of shape ``(1, h * w, dim)`` (``dim`` divisible by 4)."""
    if dim % 4:
        raise ValueError(f"sincos positional encoding needs dim divisible by 4, got {dim}")
    ys, xs = torch.meshgrid(torch.arange(h, device=device, dtype=torch.float32),
                            torch.arange(w, device=device, dtype=torch.float32), indexing="ij")
    quarter = dim // 4
    omega = 1.0 / temperature ** (torch.arange(quarter, device=device, dtype=torch.float32) / quarter)
    ys = ys.reshape(-1, 1) * omega
    xs = xs.reshape(-1, 1) * omega
    pe = torch.cat([xs.sin(), xs.cos(), ys.sin(), ys.cos()], dim=1)
    return pe.unsqueeze(0).to(dtype)


class CNNTransformer(Classifier):
    """Conv blocks → tokens + positional encoding → transformer block(s) → LayerNorm → mean pool → dropout → linear."""

    def __init__(self, *, num_classes: int = 6, in_chans: int = 1, img_size: int | tuple[int, int] = 64,
                 widths: Sequence[int] = (32, 64, 128), embed_dim: int | None = None, depth: int = 1,
                 num_heads: int = 4, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 pos_embed: PosEmbedKind = "learned", drop_rate: float = 0.3, conv_drop_rate: float = 0.1,
                 proj_drop_rate: float = 0.0, attn_drop_rate: float = 0.0, drop_path_rate: float = 0.0) -> None:
        super().__init__()
        if not widths:
            raise ValueError("widths must name at least one conv block")
        if pos_embed not in ("learned", "sincos", "none"):
            raise ValueError(f"pos_embed must be 'learned', 'sincos' or 'none', got {pos_embed!r}")
        self.num_classes, self.in_chans = num_classes, in_chans
        self.img_size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        self.widths = tuple(int(w) for w in widths)
        self.reduction = 2 ** len(self.widths)
        self.embed_dim = self.num_features = int(embed_dim or self.widths[-1])
        self.pos_embed_kind, self.drop_rate = pos_embed, drop_rate

        chs = (in_chans, *self.widths)
        self.stages = nn.Sequential(*[ConvBlock(chs[i], chs[i + 1], conv_drop_rate) for i in range(len(self.widths))])
        # 1x1 projection only when the token width differs from the last conv width.
        self.proj = (nn.Identity() if self.embed_dim == self.widths[-1]
                     else nn.Linear(self.widths[-1], self.embed_dim))

        self.grid_size: tuple[int, int] = self.feature_grid(self.img_size)
        if min(self.grid_size) < 1:
            raise ValueError(f"img_size {self.img_size} is too small for {len(self.widths)} stride-2 blocks")
        self.num_tokens = self.grid_size[0] * self.grid_size[1]
        if pos_embed == "learned":
            self.pos_embed: nn.Parameter | None = nn.Parameter(torch.zeros(1, self.num_tokens, self.embed_dim))
        else:
            self.pos_embed = None
            if pos_embed == "sincos" and self.embed_dim % 4:
                raise ValueError(f"pos_embed='sincos' needs embed_dim divisible by 4, got {self.embed_dim}")
        if depth and self.embed_dim % num_heads:
            raise ValueError(f"dim {self.embed_dim} must be divisible by num_heads {num_heads}")
        self.pos_drop = nn.Dropout(proj_drop_rate)

        dpr = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)] if depth > 1 else [drop_path_rate]
        self.blocks = nn.Sequential(*[TransformerBlock(self.embed_dim, num_heads, mlp_ratio, qkv_bias=qkv_bias,
                                                       proj_drop=proj_drop_rate, attn_drop=attn_drop_rate,
                                                       drop_path=dpr[i], norm_layer=nn.LayerNorm)
                                      for i in range(depth)])
        self.norm = nn.LayerNorm(self.embed_dim)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(self.embed_dim, num_classes) if num_classes > 0 else nn.Identity()

        self.apply(init_weights)
        if self.pos_embed is not None:
            nn.init.trunc_normal_(self.pos_embed, std=0.02)

    # ------------------------------------------------------------- geometry
    def feature_grid(self, x: torch.Tensor | Sequence[int]) -> tuple[int, int]:
        """Token grid ``(h, w)`` for an input tensor ``(..., H, W)`` or a size ``(H, W)``: each block floors H/2."""
        h, w = (x.shape[-2], x.shape[-1]) if isinstance(x, torch.Tensor) else (int(x[0]), int(x[1]))
        for _ in self.widths:
            h, w = h // 2, w // 2
        return h, w

    def tokens_to_map(self, tokens: torch.Tensor, grid: tuple[int, int] | None = None) -> torch.Tensor:
        """Reshape tokens ``(B, N, D)`` to a map ``(B, D, h, w)``.

        ``grid`` defaults to :attr:`grid_size` when ``N`` matches it, else to a square grid (``N`` must be a
        perfect square); pass ``model.feature_grid(x)`` for non-square inputs.
        """
        B, N, D = tokens.shape
        if grid is None:
            side = math.isqrt(N)
            if N != self.num_tokens and side * side != N:
                raise ValueError(f"cannot infer a grid for {N} tokens; pass grid=model.feature_grid(x)")
            grid = self.grid_size if N == self.num_tokens else (side, side)
        if grid[0] * grid[1] != N:
            raise ValueError(f"grid {grid} does not hold {N} tokens")
        return tokens.transpose(1, 2).reshape(B, D, grid[0], grid[1])

    @property
    def gradcam_layer(self) -> nn.Module:
        """The last conv block: its output ``(B, C, H // 8, W // 8)`` is the last 2-D conv map (Grad-CAM target)."""
        return self.stages[-1]

    def _pos_embed(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        if self.pos_embed_kind == "none":
            return x
        if self.pos_embed_kind == "sincos":
            return x + sincos_pos_embed_2d(grid[0], grid[1], self.embed_dim, device=x.device, dtype=x.dtype)
        pos = self.pos_embed
        assert pos is not None
        if grid != self.grid_size:
            gh, gw = self.grid_size
            pos = pos.float().reshape(1, gh, gw, -1).permute(0, 3, 1, 2)
            pos = F.interpolate(pos, size=grid, mode="bicubic", align_corners=False)
            pos = pos.permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], -1)
        return x + pos.to(x.dtype)

    # -------------------------------------------------------------- forward
    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images ``(B, C, H, W)`` → normalised tokens ``(B, N, D)`` with ``N = (H // 8) * (W // 8)``."""
        x = self.stages(x)  # (B, C, h, w); zero-copy token view also for channels_last
        grid = (x.shape[-2], x.shape[-1])
        x = x.flatten(2).transpose(1, 2)  # (B, N, C)
        x = self.proj(x)
        x = self.pos_drop(self._pos_embed(x, grid))
        x = self.blocks(x)
        return self.norm(x)

    def reset_classifier(self, num_classes: int) -> None:
        super().reset_classifier(num_classes)
        init_weights(self.head)


@register_model(family="cnn_transformer",
                paper="A CNN + Transformer model for Medical MNIST (technical report; MedicalMNISTCNN)",
                default_img_size=64, min_img_size=28)
def cnn_transformer(**kwargs) -> CNNTransformer:
    """CNN + Transformer: conv blocks 32/64/128, 1 block with 4 heads, d=128, FFN 512; 300,390 params at 64 px.

    Takes the keywords of :class:`CNNTransformer`, whose signature it carries, so :func:`create_model` rejects
    misspelt ones with a ``ConfigError``.
    """
    return CNNTransformer(**kwargs)


cnn_transformer.__signature__ = inspect.signature(CNNTransformer)  # type: ignore[attr-defined]
