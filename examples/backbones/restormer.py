"""Restormer (Zamir et al., "Restormer: Efficient Transformer for High-Resolution Image Restoration", CVPR 2022).

A fresh re-implementation from the published architecture (docs/method.md §6). Attribute names follow the
upstream release, so its checkpoints (BasicSR ``{'params': state_dict}``) load with ``strict=True``;
constructor arguments use the upstream names too (``LayerNorm_type`` included), so an upstream YAML
``network_g`` section can be passed as keyword arguments.

Layout (C = ``dim``; ``@1/s`` = resolution divided by s)::

    x0  = Conv3x3(I)                                  patch_embed                    C  @1
    e1  = Enc1(x0)                                    encoder_level1                 C  @1
    e2  = Enc2(Down(e1))                              down1_2, encoder_level2       2C  @1/2
    e3  = Enc3(Down(e2))                              down2_3, encoder_level3       4C  @1/4
    z   = Latent(Down(e3))                            down3_4, latent               8C  @1/8
    d3  = Dec3(Conv1x1_{8C→4C}([Up(z), e3]))          up4_3, reduce_chan_level3, decoder_level3   4C @1/4
    d2  = Dec2(Conv1x1_{4C→2C}([Up(d3), e2]))         up3_2, reduce_chan_level2, decoder_level2   2C @1/2
    d1  = Dec1([Up(d2), e1])                          up2_1, decoder_level1 (no 1x1 reduce)       2C @1
    out = Conv3x3(Refine(d1)) + I                     refinement, output

``Down`` = Conv3x3 (C→C/2) then PixelUnshuffle(2): channels ×2, size /2. ``Up`` = Conv3x3 (C→2C) then
PixelShuffle(2): channels /2, size ×2. Every stage is a stack of transformer blocks:

    x ← x + MDTA(LN(x));   x ← x + GDFN(LN(x))

- LN: per-pixel layer norm over channels, ``(x − μ)/√(σ² + 1e-5)·w + b`` ('WithBias') or
  ``x/√(σ² + 1e-5)·w`` ('BiasFree', no centring in the numerator).
- MDTA (multi-Dconv-head transposed attention): ``[q, k, v] = split(DW3x3(Conv1x1_{C→3C}(x)))``; per head h
  (C/h channels), with q̂, k̂ L2-normalised along the pixels, ``A = softmax(τ_h · q̂ k̂ᵀ)`` is a
  (C/h × C/h) channel attention, ``out = Conv1x1(A v)``; τ_h is learnt (init 1). Cost is linear in H·W.
- GDFN (gated-Dconv feed-forward): ``[a, b] = split(DW3x3(Conv1x1_{C→2F}(x)))``, F = int(C·γ),
  ``out = Conv1x1_{F→C}(GELU(a) ⊙ b)``.

The default config (dim 48, blocks [4, 6, 6, 8], 4 refinement blocks, heads [1, 2, 4, 8], γ = 2.66,
no bias, 'WithBias' LN) has 26,126,644 parameters.
"""
from __future__ import annotations

from functools import partial
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .base import RestorationBackbone

CONFIGS: dict[str, dict] = {
    "default": dict(inp_channels=3, out_channels=3, dim=48, num_blocks=(4, 6, 6, 8), num_refinement_blocks=4,
                    heads=(1, 2, 4, 8), ffn_expansion_factor=2.66, bias=False, LayerNorm_type="WithBias",
                    dual_pixel_task=False),
    "tiny": dict(inp_channels=3, out_channels=3, dim=4, num_blocks=(1, 1, 1, 1), num_refinement_blocks=1,
                 heads=(1, 1, 2, 2), ffn_expansion_factor=2.66, bias=False, LayerNorm_type="WithBias",
                 dual_pixel_task=False),
}


class BiasFreeLayerNorm(nn.Module):
    """``x / √(Var(x) + eps) · w`` over the last axis (the mean is used for the variance only)."""

    def __init__(self, channels: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        variance = x.var(-1, keepdim=True, unbiased=False)
        return x * torch.rsqrt(variance + self.eps) * self.weight


class LayerNorm2d(nn.Module):
    """Layer norm over the channels of every pixel of ``(B, C, H, W)``; the affine part lives in ``body``."""

    def __init__(self, channels: int, layer_norm_type: str) -> None:
        super().__init__()
        if layer_norm_type == "BiasFree":
            self.body: nn.Module = BiasFreeLayerNorm(channels)
        elif layer_norm_type == "WithBias":
            self.body = nn.LayerNorm(channels, eps=1e-5)
        else:
            raise ValueError(f"LayerNorm_type must be 'WithBias' or 'BiasFree', got {layer_norm_type!r}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class MDTA(nn.Module):
    """Multi-Dconv head transposed attention: channel attention per head, ``(B, C, H, W) → (B, C, H, W)``."""

    def __init__(self, dim: int, num_heads: int, bias: bool) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"attention width {dim} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.temperature = nn.Parameter(torch.ones(num_heads, 1, 1))
        self.qkv = nn.Conv2d(dim, dim * 3, kernel_size=1, bias=bias)
        self.qkv_dwconv = nn.Conv2d(dim * 3, dim * 3, kernel_size=3, padding=1, groups=dim * 3, bias=bias)
        self.project_out = nn.Conv2d(dim, dim, kernel_size=1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        heads = self.num_heads
        q, k, v = (t.reshape(batch, heads, channels // heads, height * width)
                   for t in self.qkv_dwconv(self.qkv(x)).chunk(3, dim=1))
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        attention = (q @ k.transpose(-2, -1) * self.temperature).softmax(dim=-1)  # (B, heads, C/h, C/h)
        return self.project_out((attention @ v).reshape(batch, channels, height, width))


class GDFN(nn.Module):
    """Gated-Dconv feed-forward network, ``(B, C, H, W) → (B, C, H, W)`` through ``int(C·γ)`` hidden channels."""

    def __init__(self, dim: int, ffn_expansion_factor: float, bias: bool) -> None:
        super().__init__()
        hidden = int(dim * ffn_expansion_factor)
        self.project_in = nn.Conv2d(dim, hidden * 2, kernel_size=1, bias=bias)
        self.dwconv = nn.Conv2d(hidden * 2, hidden * 2, kernel_size=3, padding=1, groups=hidden * 2, bias=bias)
        self.project_out = nn.Conv2d(hidden, dim, kernel_size=1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, value = self.dwconv(self.project_in(x)).chunk(2, dim=1)
        return self.project_out(F.gelu(gate) * value)


class TransformerBlock(nn.Module):
    """``x ← x + MDTA(LN(x)); x ← x + GDFN(LN(x))`` at constant shape ``(B, C, H, W)``."""

    def __init__(self, dim: int, num_heads: int, ffn_expansion_factor: float, bias: bool,
                 layer_norm_type: str) -> None:
        super().__init__()
        self.norm1 = LayerNorm2d(dim, layer_norm_type)
        self.attn = MDTA(dim, num_heads, bias)
        self.norm2 = LayerNorm2d(dim, layer_norm_type)
        self.ffn = GDFN(dim, ffn_expansion_factor, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.ffn(self.norm2(x))


def transformer_stage(dim: int, depth: int, num_heads: int, ffn_expansion_factor: float, bias: bool,
                      layer_norm_type: str) -> nn.Sequential:
    """``depth`` transformer blocks of width ``dim`` in sequence (an encoder/decoder level)."""
    return nn.Sequential(*(TransformerBlock(dim, num_heads, ffn_expansion_factor, bias, layer_norm_type)
                           for _ in range(depth)))


class PatchEmbed(nn.Module):
    """Overlapping patch embedding: one 3x3 convolution, ``(B, in, H, W) → (B, dim, H, W)``."""

    def __init__(self, in_channels: int, dim: int, bias: bool = False) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=3, padding=1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class Downsample(nn.Module):
    """``(B, C, H, W) → (B, 2C, H/2, W/2)``: Conv3x3 to C/2 channels, then PixelUnshuffle(2)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(channels, channels // 2, kernel_size=3, padding=1, bias=False),
                                  nn.PixelUnshuffle(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class Upsample(nn.Module):
    """``(B, C, H, W) → (B, C/2, 2H, 2W)``: Conv3x3 to 2C channels, then PixelShuffle(2)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(channels, channels * 2, kernel_size=3, padding=1, bias=False),
                                  nn.PixelShuffle(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class RestormerLevels:
    """The decoder levels of the Restormer U-Net (shared with PromptIR, built on the same skeleton): the
    latent and three decoder stages by name, their channels (``dim`` = C) and strides."""

    @property
    def size_factor(self) -> int:
        return 8

    def decoder_levels(self) -> dict[str, int]:
        c = self.config["dim"]
        return {"latent": 8 * c, "decoder_level3": 4 * c, "decoder_level2": 2 * c, "decoder_level1": 2 * c}

    def decoder_strides(self) -> dict[str, int]:
        return {"latent": 8, "decoder_level3": 4, "decoder_level2": 2, "decoder_level1": 1}


class Restormer(RestormerLevels, RestorationBackbone):
    """Restormer, ``(B, inp_channels, H, W) → (B, out_channels, H, W)`` with H, W multiples of 8.

    ``dual_pixel_task=True`` (with ``inp_channels=6``) is the dual-pixel defocus-deblurring variant: a 1x1
    skip from the patch embedding replaces the global image residual.
    """

    family = "Restormer"
    checkpoint_format = "basicsr"

    def __init__(self, inp_channels: int = 3, out_channels: int = 3, dim: int = 48,
                 num_blocks: Sequence[int] = (4, 6, 6, 8), num_refinement_blocks: int = 4,
                 heads: Sequence[int] = (1, 2, 4, 8), ffn_expansion_factor: float = 2.66, bias: bool = False,
                 LayerNorm_type: str = "WithBias", dual_pixel_task: bool = False) -> None:  # noqa: N803 (upstream name)
        super().__init__(dict(inp_channels=inp_channels, out_channels=out_channels, dim=dim,
                              num_blocks=tuple(num_blocks), num_refinement_blocks=num_refinement_blocks,
                              heads=tuple(heads), ffn_expansion_factor=ffn_expansion_factor, bias=bias,
                              LayerNorm_type=LayerNorm_type, dual_pixel_task=dual_pixel_task))
        if len(num_blocks) != 4 or len(heads) != 4:
            raise ValueError(f"num_blocks and heads need 4 entries (3 levels + latent), got {num_blocks}, {heads}")
        stage = partial(transformer_stage, ffn_expansion_factor=ffn_expansion_factor, bias=bias,
                        layer_norm_type=LayerNorm_type)  # stage(width, depth, num_heads)
        c = dim
        self.patch_embed = PatchEmbed(inp_channels, c)
        self.encoder_level1 = stage(c, num_blocks[0], heads[0])
        self.down1_2 = Downsample(c)
        self.encoder_level2 = stage(2 * c, num_blocks[1], heads[1])
        self.down2_3 = Downsample(2 * c)
        self.encoder_level3 = stage(4 * c, num_blocks[2], heads[2])
        self.down3_4 = Downsample(4 * c)
        self.latent = stage(8 * c, num_blocks[3], heads[3])

        self.up4_3 = Upsample(8 * c)
        self.reduce_chan_level3 = nn.Conv2d(8 * c, 4 * c, kernel_size=1, bias=bias)
        self.decoder_level3 = stage(4 * c, num_blocks[2], heads[2])
        self.up3_2 = Upsample(4 * c)
        self.reduce_chan_level2 = nn.Conv2d(4 * c, 2 * c, kernel_size=1, bias=bias)
        self.decoder_level2 = stage(2 * c, num_blocks[1], heads[1])
        self.up2_1 = Upsample(2 * c)
        self.decoder_level1 = stage(2 * c, num_blocks[0], heads[0])
        self.refinement = stage(2 * c, num_refinement_blocks, heads[0])
        self.dual_pixel_task = dual_pixel_task
        if dual_pixel_task:
            self.skip_conv = nn.Conv2d(c, 2 * c, kernel_size=1, bias=bias)
        self.output = nn.Conv2d(2 * c, out_channels, kernel_size=3, padding=1, bias=bias)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self.check_input_size(images)
        embedded = self.patch_embed(images)
        enc1 = self.encoder_level1(embedded)
        enc2 = self.encoder_level2(self.down1_2(enc1))
        enc3 = self.encoder_level3(self.down2_3(enc2))
        latent = self.latent(self.down3_4(enc3))

        dec3 = self.decoder_level3(self.reduce_chan_level3(torch.cat([self.up4_3(latent), enc3], 1)))
        dec2 = self.decoder_level2(self.reduce_chan_level2(torch.cat([self.up3_2(dec3), enc2], 1)))
        dec1 = self.refinement(self.decoder_level1(torch.cat([self.up2_1(dec2), enc1], 1)))
        if self.dual_pixel_task:
            return self.output(dec1 + self.skip_conv(embedded))
        return self.output(dec1) + images
