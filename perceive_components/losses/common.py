"""Small pieces shared by the losses: reduction, the straight-through clamp, precision handling."""
from __future__ import annotations

import torch

from ..ops.validation import check_choice

REDUCTIONS = ("none", "mean", "sum")


def check_reduction(reduction: object) -> str:
    return check_choice(reduction, "reduction", REDUCTIONS)


def check_loss_weight(loss_weight: object, name: str = "loss_weight") -> float:
    if isinstance(loss_weight, bool) or not isinstance(loss_weight, (int, float)) \
            or not 0 <= loss_weight < float("inf"):
        raise ValueError(f"{name} must be a finite number >= 0, got {loss_weight!r}")
    return float(loss_weight)


def reduce(values: torch.Tensor, reduction: str) -> torch.Tensor:
    """``values (B,)`` → ``(B,)`` for 'none', their mean or their sum."""
    if reduction == "mean":
        return values.mean()
    if reduction == "sum":
        return values.sum()
    return values


def straight_through_clamp(images: torch.Tensor) -> torch.Tensor:
    """clamp01 in the forward pass, identity in the backward pass (docs/method.md §2.1: out-of-range pixels still
    receive the loss gradient instead of a zero)."""
    return images + (images.clamp(0.0, 1.0) - images).detach()


def at_least_float32(tensor: torch.Tensor) -> torch.Tensor:
    """Cast bf16/fp16 (autocast) results up to float32; leave float32/float64 as they are."""
    return tensor.to(torch.promote_types(tensor.dtype, torch.float32))
