"""Restormer-style building blocks: channel LayerNorm, MDTA, GDFN and the plain transformer block.

Used by ETB/PGCA (docs/method.md §3.3) and by the paper's own network (docs/method.md §3.4, examples/). Written from
the equations of Zamir et al., "Restormer" (CVPR 2022):

    LayerNorm2d:  y = (x − μ_c) / sqrt(σ²_c + ε) · w + b        statistics over channels, per pixel
                  (bias-free form: y = x / sqrt(σ²_c + ε) · w, no mean subtraction)
    MDTA:         q, k, v = split( DW3×3( Conv1×1_{C→3C}(x) ) )
                  per head h: q̂, k̂ = L2-normalised over the H·W axis
                  A = softmax( τ_h · q̂ k̂ᵀ )   (C/h × C/h)            out = Conv1×1( A v )
    GDFN:         u, g = split( DW3×3( Conv1×1_{C→2D}(x) ) ),  D = int(C · expansion)
                  out = Conv1×1_{D→C}( GELU(u) ⊙ g )
    Block:        x = x + MDTA(LN(x));  x = x + GDFN(LN(x))

Attention runs across channels ("transposed"), so its cost is linear in H·W.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

LAYERNORM_EPS = 1e-5


class LayerNorm2d(nn.Module):
    """LayerNorm over the channels of a ``(B, C, H, W)`` map, per pixel ("WithBias" by default).

    Statistics are computed in float32 (also under bf16 autocast) and the result is cast back.
    ``bias=False`` gives Restormer's "BiasFree" form, which scales without centring.
    """

    def __init__(self, channels: int, bias: bool = True, eps: float = LAYERNORM_EPS) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels)) if bias else None
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.to(torch.promote_types(x.dtype, torch.float32))  # statistics in ≥ float32 (float64 stays)
        variance, mean = torch.var_mean(x32, dim=1, keepdim=True, correction=0)
        scale = self.weight.to(x32.dtype).view(1, -1, 1, 1)
        if self.bias is None:
            y = x32 * torch.rsqrt(variance + self.eps) * scale
        else:
            y = (x32 - mean) * torch.rsqrt(variance + self.eps) * scale + self.bias.to(x32.dtype).view(1, -1, 1, 1)
        return y.to(x.dtype)


def channel_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, temperature: torch.Tensor
) -> torch.Tensor:
    """Transposed (channel) attention: ``q, k, v (B, C, H, W) -> (B, C, H, W)``.

    Per head: ``softmax(τ_h · normalize(q) normalize(k)ᵀ) v`` with the C/heads × C/heads attention map;
    ``temperature`` has shape ``(heads, 1, 1)``.
    """
    batch, channels, height, width = v.shape
    q = F.normalize(q.reshape(batch, heads, channels // heads, height * width), dim=-1)
    k = F.normalize(k.reshape(batch, heads, channels // heads, height * width), dim=-1)
    v = v.reshape(batch, heads, channels // heads, height * width)
    attention = (q @ k.transpose(-2, -1) * temperature.to(q.dtype)).softmax(dim=-1)
    return (attention @ v).reshape(batch, channels, height, width)


def check_heads(channels: int, heads: int) -> None:
    if heads <= 0 or channels % heads:
        raise ValueError(f"heads must be a positive divisor of channels={channels}, got heads={heads}")


class MDTA(nn.Module):
    """Multi-Dconv-head Transposed Attention: ``(B, C, H, W) -> (B, C, H, W)``."""

    def __init__(self, channels: int, heads: int, bias: bool = False) -> None:
        super().__init__()
        check_heads(channels, heads)
        self.heads = heads
        self.temperature = nn.Parameter(torch.ones(heads, 1, 1))
        self.qkv = nn.Conv2d(channels, channels * 3, 1, bias=bias)
        self.qkv_dwconv = nn.Conv2d(channels * 3, channels * 3, 3, padding=1, groups=channels * 3, bias=bias)
        self.project_out = nn.Conv2d(channels, channels, 1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv_dwconv(self.qkv(x)).chunk(3, dim=1)
        return self.project_out(channel_attention(q, k, v, self.heads, self.temperature))


class GDFN(nn.Module):
    """Gated-Dconv Feed-forward Network: ``(B, C, H, W) -> (B, C, H, W)``, hidden width int(C·expansion)."""

    def __init__(self, channels: int, expansion: float = 2.66, bias: bool = False) -> None:
        super().__init__()
        hidden = int(channels * expansion)
        self.project_in = nn.Conv2d(channels, hidden * 2, 1, bias=bias)
        self.dwconv = nn.Conv2d(hidden * 2, hidden * 2, 3, padding=1, groups=hidden * 2, bias=bias)
        self.project_out = nn.Conv2d(hidden, channels, 1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        content, gate = self.dwconv(self.project_in(x)).chunk(2, dim=1)
        return self.project_out(F.gelu(content) * gate)


class RestormerBlock(nn.Module):
    """Plain Restormer transformer block: ``x + MDTA(LN(x))`` then ``x + GDFN(LN(x))``."""

    def __init__(
        self, channels: int, heads: int, expansion: float = 2.66, bias: bool = False, norm_bias: bool = True
    ) -> None:
        super().__init__()
        self.norm1 = LayerNorm2d(channels, bias=norm_bias)
        self.attn = MDTA(channels, heads, bias=bias)
        self.norm2 = LayerNorm2d(channels, bias=norm_bias)
        self.ffn = GDFN(channels, expansion, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.ffn(self.norm2(x))
