"""One ``(negatives, mask)`` pair per batch, whatever mix of cached and online proxies made it.

The losses take ``negatives (B, K, 3, h, w)`` and ``mask (B, K)``. A batch often has two sources: negatives
read from a render cache by the data loader, and proxies run online on the device (``ProxyNegatives``).
``merge_negatives`` concatenates them along K; ``no_negatives`` is the K = 0 pair for a fixed batch format
without proxies (the losses accept it and use the easy negative only).
"""
from __future__ import annotations

import torch


def _check_part(index: int, negatives: object, mask: object) -> None:
    if not isinstance(negatives, torch.Tensor) or negatives.ndim != 5 or negatives.shape[2] != 3:
        shape = tuple(negatives.shape) if isinstance(negatives, torch.Tensor) else type(negatives).__name__
        raise ValueError(f"part {index}: negatives must have shape (B, K, 3, h, w), got {shape}")
    expected = tuple(negatives.shape[:2])
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or tuple(mask.shape) != expected:
        shape = f"{mask.dtype} {tuple(mask.shape)}" if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(f"part {index}: mask must be a bool tensor of shape (B, K) = {expected}, "
                         f"got {shape}")


def merge_negatives(*parts: tuple[torch.Tensor, torch.Tensor], device: torch.device | str | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate ``(negatives (B, K_i, 3, h, w), mask (B, K_i))`` pairs along K, in the order given.

    Returns ``(B, ΣK_i, 3, h, w)`` float32 and ``(B, ΣK_i)`` bool on ``device`` (default: the first part's).
    Every part must have the same batch size and crop size."""
    if not parts:
        raise ValueError("merge_negatives needs at least one (negatives, mask) pair")
    for index, part in enumerate(parts):
        if not isinstance(part, (tuple, list)) or len(part) != 2:
            raise ValueError(f"part {index} must be a (negatives, mask) pair, got {type(part).__name__}")
        _check_part(index, *part)
    reference = parts[0][0].shape
    for index, (negatives, _) in enumerate(parts[1:], 1):
        if negatives.shape[0] != reference[0] or negatives.shape[3:] != reference[3:]:
            raise ValueError(f"part {index} has negatives {tuple(negatives.shape)}, which does not match part 0 "
                             f"{tuple(reference)} in batch size or crop size")
    device = parts[0][0].device if device is None else torch.device(device)
    negatives = torch.cat([n.to(device=device, dtype=torch.float32) for n, _ in parts], dim=1)
    return negatives, torch.cat([m.to(device) for _, m in parts], dim=1)


def no_negatives(batch: int, size: tuple[int, int], device: torch.device | str | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """The K = 0 pair: ``(batch, 0, 3, h, w)`` float32 negatives and a ``(batch, 0)`` bool mask."""
    height, width = size
    return (torch.zeros(batch, 0, 3, height, width, device=device),
            torch.zeros(batch, 0, dtype=torch.bool, device=device))
