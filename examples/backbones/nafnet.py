"""NAFNet (Chen et al., "Simple Baselines for Image Restoration", ECCV 2022): a nonlinear-activation-free U-Net.

A fresh re-implementation from the published architecture (docs/method.md §6). Attribute and argument names follow
the upstream release, so its checkpoints (BasicSR ``{'params': state_dict}``) load with ``strict=True``.

Layout (w = ``width``, n = len(enc_blk_nums); ``@1/s`` = resolution divided by s)::

    x   = Conv3x3(I)                                          intro                 w  @1
    e_i = Enc_i(x);  x = Conv2x2/2(e_i)   (i = 0..n-1)        encoders.i, downs.i   w·2^i @1/2^i → w·2^(i+1)
    x   = Middle(x)                                           middle_blks           w·2^n @1/2^n
    x   = Dec_j(Up_j(x) + e_(n-1-j))      (j = 0..n-1)        ups.j, decoders.j     w·2^(n-1-j) @1/2^(n-1-j)
    out = Conv3x3(x) + I                                      ending

``Up`` = Conv1x1 (C→2C, no bias) then PixelShuffle(2). Skips are added, not concatenated. Every stage is a
stack of NAFBlocks (c channels, no nonlinear activation anywhere):

    y   = x + β ⊙ Conv1x1(SCA(SG(DW3x3(Conv1x1_{c→2c}(LN(x))))))
    out = y + γ ⊙ Conv1x1(SG(Conv1x1_{c→2c}(LN(y))))

- SG (SimpleGate): split channels in halves ``[a, b]`` and return ``a ⊙ b``.
- SCA (simplified channel attention): ``z ⊙ Conv1x1(AvgPool_global(z))``.
- LN: per-pixel layer norm over channels with affine ``w, b`` (eps 1e-6). β, γ start at 0, so every block
  starts as the identity.

The forward pass zero-pads H and W up to a multiple of 2^n and crops the result back, as upstream does;
``size_factor`` = 2^n tells callers which multiple avoids that padding. The SIDD width-32 config
(width 32, enc [2, 2, 4, 8], middle 12, dec [2, 2, 2, 2]) has 29,159,715 parameters.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .base import RestorationBackbone

CONFIGS: dict[str, dict] = {
    "default": dict(img_channel=3, width=32, middle_blk_num=12, enc_blk_nums=(2, 2, 4, 8), dec_blk_nums=(2, 2, 2, 2)),
    "tiny": dict(img_channel=3, width=4, middle_blk_num=1, enc_blk_nums=(1, 1, 1, 1), dec_blk_nums=(1, 1, 1, 1)),
}


class LayerNorm2d(nn.Module):
    """Layer norm over the channels of every pixel of ``(B, C, H, W)``: ``(x − μ)/√(σ² + eps)·w + b``."""

    def __init__(self, channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normed = F.layer_norm(x.permute(0, 2, 3, 1), x.shape[1:2], self.weight, self.bias, self.eps)
        return normed.permute(0, 3, 1, 2)


class SimpleGate(nn.Module):
    """``(B, 2C, H, W) → (B, C, H, W)``: the product of the two channel halves."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        first, second = x.chunk(2, dim=1)
        return first * second


class NAFBlock(nn.Module):
    """Two residual branches (spatial mixing with SCA, then channel mixing), scaled by β and γ; shape-preserving."""

    def __init__(self, c: int, DW_Expand: int = 2, FFN_Expand: int = 2, drop_out_rate: float = 0.0) -> None:  # noqa: N803
        super().__init__()
        dw_channels, ffn_channels = c * DW_Expand, c * FFN_Expand
        self.conv1 = nn.Conv2d(c, dw_channels, kernel_size=1)
        self.conv2 = nn.Conv2d(dw_channels, dw_channels, kernel_size=3, padding=1, groups=dw_channels)
        self.conv3 = nn.Conv2d(dw_channels // 2, c, kernel_size=1)
        self.sca = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(dw_channels // 2, dw_channels // 2, kernel_size=1))
        self.sg = SimpleGate()
        self.conv4 = nn.Conv2d(c, ffn_channels, kernel_size=1)
        self.conv5 = nn.Conv2d(ffn_channels // 2, c, kernel_size=1)
        self.norm1 = LayerNorm2d(c)
        self.norm2 = LayerNorm2d(c)
        self.dropout1 = nn.Dropout(drop_out_rate) if drop_out_rate > 0 else nn.Identity()
        self.dropout2 = nn.Dropout(drop_out_rate) if drop_out_rate > 0 else nn.Identity()
        self.beta = nn.Parameter(torch.zeros(1, c, 1, 1))
        self.gamma = nn.Parameter(torch.zeros(1, c, 1, 1))

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        x = self.sg(self.conv2(self.conv1(self.norm1(inputs))))
        x = self.dropout1(self.conv3(x * self.sca(x)))
        y = inputs + x * self.beta
        x = self.dropout2(self.conv5(self.sg(self.conv4(self.norm2(y)))))
        return y + x * self.gamma


class NAFNet(RestorationBackbone):
    """NAFNet, ``(B, img_channel, H, W) → (B, img_channel, H, W)`` for any H, W (padded internally)."""

    family = "NAFNet"
    checkpoint_format = "basicsr"

    def __init__(self, img_channel: int = 3, width: int = 32, middle_blk_num: int = 12,
                 enc_blk_nums: Sequence[int] = (2, 2, 4, 8), dec_blk_nums: Sequence[int] = (2, 2, 2, 2)) -> None:
        super().__init__(dict(img_channel=img_channel, width=width, middle_blk_num=middle_blk_num,
                              enc_blk_nums=tuple(enc_blk_nums), dec_blk_nums=tuple(dec_blk_nums)))
        if len(enc_blk_nums) != len(dec_blk_nums):
            raise ValueError(f"enc_blk_nums and dec_blk_nums need the same length, got {enc_blk_nums}, {dec_blk_nums}")
        self.intro = nn.Conv2d(img_channel, width, kernel_size=3, padding=1)
        self.ending = nn.Conv2d(width, img_channel, kernel_size=3, padding=1)
        self.encoders, self.downs = nn.ModuleList(), nn.ModuleList()
        self.ups, self.decoders = nn.ModuleList(), nn.ModuleList()
        channels = width
        for depth in enc_blk_nums:
            self.encoders.append(nn.Sequential(*(NAFBlock(channels) for _ in range(depth))))
            self.downs.append(nn.Conv2d(channels, 2 * channels, kernel_size=2, stride=2))
            channels *= 2
        self.middle_blks = nn.Sequential(*(NAFBlock(channels) for _ in range(middle_blk_num)))
        for depth in dec_blk_nums:
            self.ups.append(nn.Sequential(nn.Conv2d(channels, 2 * channels, kernel_size=1, bias=False),
                                          nn.PixelShuffle(2)))
            channels //= 2
            self.decoders.append(nn.Sequential(*(NAFBlock(channels) for _ in range(depth))))

    @property
    def size_factor(self) -> int:
        return 2 ** len(self.encoders)

    def decoder_levels(self) -> dict[str, int]:
        width, depth = self.config["width"], len(self.encoders)
        levels = {"middle_blks": width * 2**depth}
        levels.update({f"decoders.{j}": width * 2 ** (depth - 1 - j) for j in range(depth)})
        return levels

    def decoder_strides(self) -> dict[str, int]:
        depth = len(self.encoders)
        strides = {"middle_blks": 2**depth}
        strides.update({f"decoders.{j}": 2 ** (depth - 1 - j) for j in range(depth)})
        return strides

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        height, width = images.shape[-2:]
        factor = self.size_factor
        padded = F.pad(images, (0, (-width) % factor, 0, (-height) % factor))  # zeros, as upstream
        x = self.intro(padded)
        skips = []
        for encoder, down in zip(self.encoders, self.downs):
            x = encoder(x)
            skips.append(x)
            x = down(x)
        x = self.middle_blks(x)
        for decoder, up, skip in zip(self.decoders, self.ups, reversed(skips)):
            x = decoder(up(x) + skip)
        return (self.ending(x) + padded)[..., :height, :width]
