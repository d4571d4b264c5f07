"""PGCA (prior-guided cross attention) and ETB (enhanced transformer block), docs/method.md §3.3.

PGCA(x, g) is Restormer's transposed attention with the *guidance* g as query:

    Q      = DW3×3( Conv1×1(g) )
    K, V   = split( DW3×3( Conv1×1_{C→2C}(x) ) )
    A      = softmax( τ_h · normalize(Q) normalize(K)ᵀ )      per head, C/h × C/h, τ_h learnable (init 1)
    out    = Conv1×1( A V )

ETB(x, Y), the authors' code form (default), with Y = PGM(x, F_l, Z) computed once per level:

    c   = PGCA( LN(x), LN(Y) )
    x'  = Y + MDTA( LN(c) )
    x'' = x' + GDFN( LN(x') )

``form="figure"`` follows the paper's figure instead: x' = Y + PGCA(LN(x), LN(Y)) (no extra MDTA).

``PGCABlock`` is the backbone-agnostic plug-in step the adapter inserts at a level:
``Y + PGCA(LN(x), LN(Y))`` (the figure's residual form), optionally zero-initialised so it starts at Y.
"""
from __future__ import annotations

import torch
from torch import nn

from ..ops.validation import check_choice
from .restormer_blocks import GDFN, MDTA, LayerNorm2d, channel_attention, check_heads

ETB_FORMS = ("code", "figure")


def _check_pair(x: torch.Tensor, guidance: torch.Tensor, channels: int) -> None:
    if x.ndim != 4 or x.shape[1] != channels:
        raise ValueError(f"x must have shape (B, {channels}, H, W), got {tuple(x.shape)}")
    if guidance.shape != x.shape:
        raise ValueError(f"guidance must have the shape of x {tuple(x.shape)}, got {tuple(guidance.shape)}")


class PGCA(nn.Module):
    """Prior-guided cross attention: ``(x, guidance) (B, C, H, W) each -> (B, C, H, W)``.

    Args:
        channels: C. heads: attention heads (must divide C). bias: bias in the convolutions
            (the paper's network uses biases). zero_init: zero the output projection, so PGCA returns 0
            at start (useful when it is added as a residual to a pretrained backbone).
    """

    def __init__(self, channels: int, heads: int = 1, bias: bool = True, zero_init: bool = False) -> None:
        super().__init__()
        check_heads(channels, heads)
        self.channels, self.heads = channels, heads
        self.temperature = nn.Parameter(torch.ones(heads, 1, 1))
        self.to_q = nn.Sequential(
            nn.Conv2d(channels, channels, 1, bias=bias),
            nn.Conv2d(channels, channels, 3, padding=1, groups=channels, bias=bias),
        )
        self.to_kv = nn.Sequential(
            nn.Conv2d(channels, channels * 2, 1, bias=bias),
            nn.Conv2d(channels * 2, channels * 2, 3, padding=1, groups=channels * 2, bias=bias),
        )
        self.project_out = nn.Conv2d(channels, channels, 1, bias=bias)
        if zero_init:
            nn.init.zeros_(self.project_out.weight)
            if bias:
                nn.init.zeros_(self.project_out.bias)

    def forward(self, x: torch.Tensor, guidance: torch.Tensor) -> torch.Tensor:
        _check_pair(x, guidance, self.channels)
        q = self.to_q(guidance)
        k, v = self.to_kv(x).chunk(2, dim=1)
        return self.project_out(channel_attention(q, k, v, self.heads, self.temperature))


class PGCABlock(nn.Module):
    """One plug-in cross-attention step at a backbone level: ``(x, Y) -> Y + PGCA(LN(x), LN(Y))``.

    With ``zero_init=True`` the output projection starts at zero, so the block returns Y unchanged
    (and, with a zero-initialised PGM, the backbone's own features) until it has trained.
    """

    def __init__(self, channels: int, heads: int = 1, bias: bool = True, zero_init: bool = False) -> None:
        super().__init__()
        self.norm_x = LayerNorm2d(channels)
        self.norm_guidance = LayerNorm2d(channels)
        self.attn = PGCA(channels, heads, bias=bias, zero_init=zero_init)

    def forward(self, x: torch.Tensor, guidance: torch.Tensor) -> torch.Tensor:
        return guidance + self.attn(self.norm_x(x), self.norm_guidance(guidance))


class ETB(nn.Module):
    """Enhanced transformer block: ``(x, Y) (B, C, H, W) each -> (B, C, H, W)`` (docs/method.md §3.3).

    Args:
        channels, heads: width and attention heads. expansion: GDFN expansion (2.66).
        bias: convolution biases (True in the paper's network). form: ``"code"`` (authors' code, with the
            extra MDTA) or ``"figure"`` (the paper's figure).
    """

    def __init__(
        self, channels: int, heads: int = 1, expansion: float = 2.66, bias: bool = True, form: str = "code"
    ) -> None:
        super().__init__()
        self.form = check_choice(form, "form", ETB_FORMS)
        self.norm_x = LayerNorm2d(channels)
        self.norm_guidance = LayerNorm2d(channels)
        self.pgca = PGCA(channels, heads, bias=bias)
        if form == "code":
            self.norm_attn = LayerNorm2d(channels)
            self.mdta = MDTA(channels, heads, bias=bias)
        self.norm_ffn = LayerNorm2d(channels)
        self.ffn = GDFN(channels, expansion, bias=bias)

    def forward(self, x: torch.Tensor, guidance: torch.Tensor) -> torch.Tensor:
        cross = self.pgca(self.norm_x(x), self.norm_guidance(guidance))
        x = guidance + (self.mdta(self.norm_attn(cross)) if self.form == "code" else cross)
        return x + self.ffn(self.norm_ffn(x))
