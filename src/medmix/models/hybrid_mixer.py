"""HybridCNN with a Global Token Mixer.

After Ananth Angel et al., "Hybrid Convolutional Neural Network with Global Token Mixer for Medical Image
Classification": a convolutional backbone extracts local features, the feature map is cut into patches, each
patch is embedded linearly as a token, MLPs with GELU mix information across *all* tokens, the tokens are
average-pooled and a linear layer classifies. The paper gives no widths or depths; the token mixer here is the
MLP-Mixer block (token-mixing MLP across tokens, then channel-mixing MLP across features, each with LayerNorm and
a residual), which is what "MLP with GELU across all tokens" describes.

Shape of the model::

    ConvStage (conv3x3-BN-GELU x d, maxpool /2)  x2                              -> B x C x H/4 x W/4
    timm PatchEmbed (conv k=p, s=p == cut into p x p patches + shared linear)     -> B x N x D, N = (H/4p)^2
    MixerBlock x depth                                                            -> B x N x D
    LayerNorm, mean over tokens, dropout, Linear                                  -> logits

The patch size defaults to the one that gives a token grid of about 7 x 7 at the configured ``img_size``
(1 at 28 px, 2 at 64 px, 8 at 224 px). The model returns logits: the paper's LogSoftmax + NLL is the
``--loss nll`` option of the trainer and equals cross-entropy on these logits.
"""
from __future__ import annotations

from functools import partial

import torch
import torch.nn as nn
from timm.layers import DropPath, Mlp, PatchEmbed, trunc_normal_

from ..errors import ConfigError
from ._registry import Classifier, init_weights, register_model

__all__ = ["ConvStage", "PatchEmbed", "MixerBlock", "HybridMixer", "hybrid_mixer_small", "hybrid_mixer_base"]

_PAPER = "Ananth Angel et al., Hybrid CNN with Global Token Mixer for Medical Image Classification"


class ConvStage(nn.Module):
    """``depth`` x (conv3x3 -> BatchNorm -> GELU), then 2x2 max pooling."""

    def __init__(self, in_chs: int, out_chs: int, depth: int = 2) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for i in range(depth):
            layers += [nn.Conv2d(in_chs if i == 0 else out_chs, out_chs, 3, padding=1, bias=False),
                       nn.BatchNorm2d(out_chs), nn.GELU()]
        self.convs = nn.Sequential(*layers)
        self.pool = nn.MaxPool2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.convs(x))


class MixerBlock(nn.Module):
    """Token mixing across all tokens, then channel mixing, both MLPs with GELU, pre-norm and residual."""

    def __init__(self, dim: int, num_tokens: int, token_mlp_ratio: float = 0.5, channel_mlp_ratio: float = 4.0,
                 drop: float = 0.0, drop_path: float = 0.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.mlp_tokens = Mlp(num_tokens, max(8, int(num_tokens * token_mlp_ratio)), act_layer=nn.GELU, drop=drop)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp_channels = Mlp(dim, int(dim * channel_mlp_ratio), act_layer=nn.GELU, drop=drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.mlp_tokens(self.norm1(x).transpose(1, 2)).transpose(1, 2))
        return x + self.drop_path(self.mlp_channels(self.norm2(x)))


class HybridMixer(Classifier):
    """Conv backbone -> patch tokens -> global token mixer -> average pool -> linear head."""

    def __init__(self, *, num_classes: int = 2, in_chans: int = 1, img_size: int = 28,
                 conv_widths: tuple[int, ...] = (32, 64), conv_depths: tuple[int, ...] = (1, 2), embed_dim: int = 128,
                 depth: int = 4, patch_size: int | None = None, token_mlp_ratio: float = 0.5,
                 channel_mlp_ratio: float = 4.0, drop_rate: float = 0.0, drop_path_rate: float = 0.0) -> None:
        super().__init__()
        self.num_classes, self.in_chans, self.img_size = num_classes, in_chans, img_size
        self.num_features = self.embed_dim = embed_dim
        if len(conv_depths) != len(conv_widths):
            raise ConfigError("conv_depths and conv_widths need one entry per stage")
        chs = (in_chans, *conv_widths)
        self.backbone = nn.Sequential(*[ConvStage(c, w, d) for c, w, d in zip(chs, conv_widths, conv_depths)])
        self.reduction = 2 ** len(conv_widths)
        feat = img_size // self.reduction
        if feat < 1:
            raise ConfigError(f"img_size {img_size} is too small for {len(conv_widths)} pooling stages")
        self.patch_size = patch_size or max(1, round(feat / 7))  # the grid closest to 7 x 7 tokens
        self.grid_size = feat // self.patch_size
        if self.grid_size < 1:
            raise ConfigError(f"patch_size {self.patch_size} is larger than the {feat}x{feat} feature map")
        self.num_tokens = self.grid_size ** 2
        self.patch_embed = PatchEmbed(None, self.patch_size, chs[-1], embed_dim)  # any input size: checked above
        dpr = torch.linspace(0, drop_path_rate, depth).tolist()
        self.blocks = nn.Sequential(*[MixerBlock(embed_dim, self.num_tokens, token_mlp_ratio, channel_mlp_ratio,
                                                 drop=0.0, drop_path=dpr[i]) for i in range(depth)])
        self.norm = nn.LayerNorm(embed_dim)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes)
        self.apply(partial(init_weights, trunc_normal=trunc_normal_))

    @property
    def gradcam_layer(self) -> nn.Module:
        """The last convolutional stage: its output is the 2D map the tokens are cut from."""
        return self.backbone[-1]

    def _check_input(self, x: torch.Tensor) -> None:
        if x.ndim != 4 or x.shape[1] != self.in_chans:
            raise ConfigError(f"expected input of shape (B, {self.in_chans}, H, W), got {tuple(x.shape)}")
        grid = (x.shape[-1] // self.reduction) // self.patch_size
        if x.shape[-1] != x.shape[-2] or grid != self.grid_size:
            raise ConfigError(f"model was built for {self.img_size}x{self.img_size} inputs, got "
                              f"{x.shape[-2]}x{x.shape[-1]}")

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens after the mixer and the final LayerNorm: ``(B, N, D)``."""
        self._check_input(x)
        x = self.patch_embed(self.backbone(x))
        return self.norm(self.blocks(x))


@register_model(family="hybrid_mixer", paper=_PAPER, default_img_size=28, min_img_size=8)
def hybrid_mixer_small(*, num_classes: int = 2, in_chans: int = 1, img_size: int = 28, drop_rate: float = 0.0,
                       drop_path_rate: float = 0.0, **kwargs) -> HybridMixer:
    """HybridCNN + Global Token Mixer, small: convs 32/64, 4 mixer blocks of width 128 (the default model)."""
    cfg = dict(conv_widths=(32, 64), conv_depths=(1, 2), embed_dim=128, depth=4, channel_mlp_ratio=2.0)
    return HybridMixer(num_classes=num_classes, in_chans=in_chans, img_size=img_size, drop_rate=drop_rate,
                       drop_path_rate=drop_path_rate, **{**cfg, **kwargs})


@register_model(family="hybrid_mixer", paper=_PAPER, default_img_size=28, min_img_size=8)
def hybrid_mixer_base(*, num_classes: int = 2, in_chans: int = 1, img_size: int = 28, drop_rate: float = 0.0,
                      drop_path_rate: float = 0.1, **kwargs) -> HybridMixer:
    """HybridCNN + Global Token Mixer, base: convs 48/96, 8 mixer blocks of width 192."""
    cfg = dict(conv_widths=(48, 96), conv_depths=(2, 2), embed_dim=192, depth=8)
    return HybridMixer(num_classes=num_classes, in_chans=in_chans, img_size=img_size, drop_rate=drop_rate,
                       drop_path_rate=drop_path_rate, **{**cfg, **kwargs})

