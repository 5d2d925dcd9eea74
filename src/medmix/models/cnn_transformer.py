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
* pre-norm residual blocks followed by a final LayerNorm (the report does not say pre- or post-norm; pre-norm
  trains more stably and makes the final norm meaningful);
* a learned positional embedding sized from ``img_size`` (``pos_embed="learned"``), bicubically resized when the
  runtime token grid differs; ``pos_embed="sincos"`` gives a fixed 2-D sine-cosine encoding for any grid;
* mean pooling over the tokens before the head.

Parameter count (6 classes, 1 channel): 293,350 at 28 px, 300,390 at 64 px (default), 392,550 at 224 px — the
learned positional embedding (``N × 128``) is the only size-dependent part; 3 input channels add 576.

Token grid / Grad-CAM
---------------------
Each block halves the resolution with a floor, so an ``H × W`` input gives a ``H // 8 × W // 8`` grid of
``N = (H // 8) · (W // 8)`` tokens: 28 px → 3×3 (9 tokens), 64 px → 8×8 (64), 224 px → 28×28 (784).
``model.grid_size`` is the grid at the configured ``img_size``; ``model.feature_grid(x)`` gives it for any input
(tensor or ``(H, W)``); ``model.tokens_to_map(tokens, grid)`` reshapes ``(B, N, D)`` tokens into a
``(B, D, h, w)`` map. ``model.gradcam_layer`` is the last conv block, whose output is the last 2-D conv map
``(B, 128, H // 8, W // 8)`` that the tokens are made from.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import StochasticDepth

from ._registry import register_model

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


class Attention(nn.Module):
    """Multi-head self-attention on ``(B, N, D)`` tokens via :func:`F.scaled_dot_product_attention`."""

    def __init__(self, dim: int, num_heads: int = 4, qkv_bias: bool = True, attn_drop: float = 0.0,
                 proj_drop: float = 0.0) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} must be divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, D = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B, heads, N, head_dim)
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0)
        x = x.transpose(1, 2).reshape(B, N, D)
        return self.proj_drop(self.proj(x))


class Mlp(nn.Module):
    """Position-wise feed-forward network: Linear → activation → dropout → Linear → dropout."""

    def __init__(self, dim: int, hidden_dim: int, act_layer: type[nn.Module] = nn.GELU, drop: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = act_layer()
        self.drop1 = nn.Dropout(drop)
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))


class TransformerBlock(nn.Module):
    """Pre-norm transformer encoder block: ``x + attn(LN(x))`` then ``x + ffn(LN(x))``, with stochastic depth."""

    def __init__(self, dim: int, num_heads: int = 4, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 proj_drop: float = 0.0, attn_drop: float = 0.0, drop_path: float = 0.0,
                 act_layer: type[nn.Module] = nn.GELU, norm_layer: type[nn.Module] = nn.LayerNorm) -> None:
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=proj_drop)
        self.drop_path1 = StochasticDepth(drop_path, "row") if drop_path > 0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer, drop=proj_drop)
        self.drop_path2 = StochasticDepth(drop_path, "row") if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path1(self.attn(self.norm1(x)))
        x = x + self.drop_path2(self.mlp(self.norm2(x)))
        return x


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


class CNNTransformer(nn.Module):
    """Conv blocks → tokens + positional encoding → transformer block(s) → LayerNorm → mean pool → dropout → linear.

    ``forward_features(x)`` returns the normalised tokens ``(B, N, D)``; ``forward_head(tokens, pre_logits)``
    pools them (and classifies unless ``pre_logits``); ``forward(x)`` returns logits ``(B, num_classes)``.
    """

    def __init__(
        self,
        *,
        num_classes: int = 6,
        in_chans: int = 1,
        img_size: int | tuple[int, int] = 64,
        widths: Sequence[int] = (32, 64, 128),
        embed_dim: int | None = None,
        depth: int = 1,
        num_heads: int = 4,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        pos_embed: PosEmbedKind = "learned",
        drop_rate: float = 0.3,
        conv_drop_rate: float = 0.1,
        proj_drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__()
        if not widths:
            raise ValueError("widths must name at least one conv block")
        if pos_embed not in ("learned", "sincos", "none"):
            raise ValueError(f"pos_embed must be 'learned', 'sincos' or 'none', got {pos_embed!r}")
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.img_size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        self.widths = tuple(int(w) for w in widths)
        self.reduction = 2 ** len(self.widths)
        self.embed_dim = self.num_features = int(embed_dim or self.widths[-1])
        self.pos_embed_kind = pos_embed
        self.drop_rate = drop_rate

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
        self.pos_drop = nn.Dropout(proj_drop_rate)

        dpr = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)] if depth > 1 else [drop_path_rate]
        self.blocks = nn.Sequential(*[
            TransformerBlock(self.embed_dim, num_heads, mlp_ratio, qkv_bias=qkv_bias, proj_drop=proj_drop_rate,
                             attn_drop=attn_drop_rate, drop_path=dpr[i])
            for i in range(depth)
        ])
        self.norm = nn.LayerNorm(self.embed_dim)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(self.embed_dim, num_classes) if num_classes > 0 else nn.Identity()

        self.apply(self._init_weights)
        if self.pos_embed is not None:
            nn.init.trunc_normal_(self.pos_embed, std=0.02)

    # ------------------------------------------------------------------ init
    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.LayerNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"pos_embed"}

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
            if N == self.grid_size[0] * self.grid_size[1]:
                grid = self.grid_size
            else:
                side = math.isqrt(N)
                if side * side != N:
                    raise ValueError(f"cannot infer a grid for {N} tokens; pass grid=model.feature_grid(x)")
                grid = (side, side)
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

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Tokens ``(B, N, D)`` → mean over tokens → dropout → logits (or the pooled ``(B, D)`` if ``pre_logits``)."""
        x = x.mean(dim=1)
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    # ------------------------------------------------------------ classifier
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.head = nn.Linear(self.embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        if num_classes > 0:
            self._init_weights(self.head)


@register_model(
    family="cnn_transformer",
    paper="A CNN + Transformer model for Medical MNIST (technical report; MedicalMNISTCNN)",
    default_img_size=64,
    min_img_size=28,
)
def cnn_transformer(
    *, num_classes: int = 6, in_chans: int = 1, img_size: int = 64, drop_rate: float = 0.3,
    drop_path_rate: float = 0.0, widths: Sequence[int] = (32, 64, 128), embed_dim: int | None = None,
    depth: int = 1, num_heads: int = 4, mlp_ratio: float = 4.0, qkv_bias: bool = True,
    pos_embed: PosEmbedKind = "learned", conv_drop_rate: float = 0.1, proj_drop_rate: float = 0.0,
    attn_drop_rate: float = 0.0,
) -> CNNTransformer:
    """CNN + Transformer: conv blocks 32/64/128, 1 block with 4 heads, d=128, FFN 512; 300,390 params at 64 px.

    Extra keywords are listed explicitly so :func:`create_model` rejects misspelt ones with a ``ConfigError``.
    """
    return CNNTransformer(num_classes=num_classes, in_chans=in_chans, img_size=img_size, drop_rate=drop_rate,
                          drop_path_rate=drop_path_rate, widths=widths, embed_dim=embed_dim, depth=depth,
                          num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, pos_embed=pos_embed,
                          conv_drop_rate=conv_drop_rate, proj_drop_rate=proj_drop_rate,
                          attn_drop_rate=attn_drop_rate)
