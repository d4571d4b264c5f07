"""PGM: prompt guidance by FiLM from a semantic prior and the degradation embedding (docs/method.md §3.2).

Code form (authors' code, default), per level with C channels:

    e      = concat(F_l, Z)                                  (B, P + E)   P = 768 (DINOv2-B), E = 128 (CFE)
    γ, β   = split( Linear_{2C→2C}( GELU( Linear_{P+E→2C}(e) ) ) )        (B, C) each
    Y_l    = X_l ⊙ (1 + γ) + β                                broadcast over H×W

Figure form (``form="figure"``, our reading of the paper's figure): separate branches
γ = Conv1×1(Linear(e)), β = Conv1×1(Linear(e)) and Y_l = γ ⊙ X_l + β.

``zero_init=True`` zeroes the last layer(s) so that Y_l = X_l at start: the module is then the identity
on a pretrained backbone until it trains. Either input may be absent (P = 0 or E = 0) for ablations.

Inputs: ``x``, ``prior`` and ``embedding`` of any floating dtype (the conditioning runs in the module's
dtype; Y has x's dtype), one batch size for all three (else a ``ValueError`` naming them). NaN/Inf in any of
them is a ``ValueError``: the check adds no host sync inside an enclosing ``deferred_value_checks`` block
(the adapter's), and one, after the work is queued, for a call on its own; ``validate_inputs=False`` skips
it, and it is skipped while ``torch.compile`` traces.

Parameters (code form): (P+E)·2C + 2C + (2C)² + 2C; at P = 768, E = 128:
C = 48 → 95,424;  96 → 209,280;  192 → 492,288;  384 → 1,279,488.
"""
from __future__ import annotations

import torch
from torch import nn

from ..ops.validation import (
    as_parameter_dtype, check_choice, check_positive_int, check_values, compiling, deferred_value_checks,
)

PGM_FORMS = ("code", "figure")


class PGM(nn.Module):
    """FiLM modulation ``(x, prior, embedding) -> Y`` with the shape of ``x``.

    ``x`` is ``(B, C, H, W)`` (channels first) or ``(B, N, C)`` (tokens, channels last);
    ``prior`` is ``(B, prior_dim)`` or None when ``prior_dim == 0``; ``embedding`` is ``(B, embed_dim)``
    or None when ``embed_dim == 0``. ``validate_inputs``: check all three for NaN/Inf (module docstring).
    """

    def __init__(
        self,
        channels: int,
        prior_dim: int = 768,
        embed_dim: int = 128,
        form: str = "code",
        zero_init: bool = False,
        validate_inputs: bool = True,
    ) -> None:
        super().__init__()
        check_positive_int(channels, "channels")
        self.validate_inputs = bool(validate_inputs)
        for value, name in ((prior_dim, "prior_dim"), (embed_dim, "embed_dim")):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
        if prior_dim + embed_dim == 0:
            raise ValueError("PGM needs a semantic prior, a degradation embedding or both (prior_dim + embed_dim > 0)")
        self.channels, self.prior_dim, self.embed_dim = channels, prior_dim, embed_dim
        self.form = check_choice(form, "form", PGM_FORMS)
        in_features = prior_dim + embed_dim
        if form == "code":
            self.mlp = nn.Sequential(
                nn.Linear(in_features, 2 * channels), nn.GELU(), nn.Linear(2 * channels, 2 * channels)
            )
            if zero_init:
                nn.init.zeros_(self.mlp[-1].weight)
                nn.init.zeros_(self.mlp[-1].bias)
        else:
            self.gamma = nn.Sequential(nn.Linear(in_features, channels), nn.Conv2d(channels, channels, 1))
            self.beta = nn.Sequential(nn.Linear(in_features, channels), nn.Conv2d(channels, channels, 1))
            if zero_init:  # γ = 1, β = 0
                nn.init.zeros_(self.gamma[-1].weight)
                nn.init.ones_(self.gamma[-1].bias)
                nn.init.zeros_(self.beta[-1].weight)
                nn.init.zeros_(self.beta[-1].bias)

    def condition(self, prior: torch.Tensor | None, embedding: torch.Tensor | None,
                  batch: int | None = None) -> torch.Tensor:
        """Validate and concatenate the conditioning inputs: ``(B, prior_dim + embed_dim)`` in the module's
        dtype; ``batch``: the B they must have (x's batch)."""
        parts = []
        for tensor, width, name in ((prior, self.prior_dim, "prior"), (embedding, self.embed_dim, "embedding")):
            if width == 0:
                if tensor is not None:
                    raise ValueError(f"this PGM was built with {name} width 0 but a {name} was given")
                continue
            if not isinstance(tensor, torch.Tensor) or tensor.ndim != 2 or tensor.shape[1] != width:
                shape = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
                raise ValueError(f"{name} must have shape (B, {width}), got {shape}")
            if not tensor.is_floating_point():
                raise TypeError(f"{name} must be a floating-point tensor, got dtype {tensor.dtype}")
            if batch is not None and tensor.shape[0] != batch:
                raise ValueError(f"{name} has batch {tensor.shape[0]} but x has batch {batch}: one {name} row per "
                                 "image")
            parts.append(as_parameter_dtype(tensor, self))
        return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]

    def forward(
        self, x: torch.Tensor, prior: torch.Tensor | None, embedding: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``Y`` with the shape and dtype of ``x``; see the class docstring for the shapes."""
        channel_dim = 1 if getattr(x, "ndim", 0) == 4 else -1
        if not isinstance(x, torch.Tensor) or x.ndim not in (3, 4) or x.shape[channel_dim] != self.channels:
            raise ValueError(f"x must have shape (B, {self.channels}, H, W) or (B, N, {self.channels}), "
                             f"got {getattr(x, 'shape', type(x))}")
        if not x.is_floating_point():
            raise TypeError(f"x must be a floating-point tensor, got dtype {x.dtype}")
        cond = self.condition(prior, embedding, batch=x.shape[0])
        if not self.validate_inputs or compiling():
            return self._modulate(x, cond)
        with deferred_value_checks():  # read back once the modulation's work is queued
            for tensor, name in ((x, "x"), (prior, "prior"), (embedding, "embedding")):
                if tensor is not None and tensor.numel():
                    check_values(tensor, name, value_range=None)
            return self._modulate(x, cond)

    def _modulate(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        if self.form == "code":
            gamma, beta = self.mlp(cond).chunk(2, dim=1)
        else:
            gamma = self._branch(self.gamma, cond)
            beta = self._branch(self.beta, cond)
        shape = (x.shape[0], self.channels, 1, 1) if x.ndim == 4 else (x.shape[0], 1, self.channels)
        gamma, beta = gamma.to(x.dtype).reshape(shape), beta.to(x.dtype).reshape(shape)
        return x * (1 + gamma) + beta if self.form == "code" else x * gamma + beta

    @staticmethod
    def _branch(branch: nn.Sequential, cond: torch.Tensor) -> torch.Tensor:
        linear, conv = branch
        return conv(linear(cond)[..., None, None]).flatten(1)
