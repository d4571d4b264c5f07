"""Guidance: what CFE and SGM compute for one batch, as a value the caller holds and passes on.

    guidance = net.guide(degraded, positive=view)     # Z, Z⁺ (CFE) and F_1 … F_n (SGM), docs/method.md §2.3, §3.1
    restored = net(degraded, guidance=guidance)       # the decoder levels are modulated by PGM(F_l, Z)
    loss, terms = criterion(restored, gt, degraded, guidance=guidance, labels=task)   # L_cl takes Z and Z⁺

``PerceiveAdapter`` and the paper's network compute it with the same function (``compute_guidance``) and check
a given one with the same rules (``check_guidance``). Nothing is stashed on a module between calls, so a
guidance can be computed once on a whole image and reused for each of its tiles, passed through
``torch.utils.checkpoint`` or DDP as an ordinary argument, and used by several forwards.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn


class Guidance(NamedTuple):
    """Per-image guidance of a batch of ``B`` degraded images.

    ``priors``: the SGM's DINOv2 CLS priors ``(F_1 … F_n)``, each ``(B, D)``, finest level first (no gradient);
    ``None`` without an SGM. ``embedding``: Z ``(B, E)``, the CFE embedding (L2-normalised, with gradient); ``None``
    without a CFE. ``positive_embedding``: Z⁺ ``(B, E)`` of the positive view, for the contrastive loss; ``None``
    unless a positive view was given.
    """

    priors: tuple[torch.Tensor, ...] | None
    embedding: torch.Tensor | None
    positive_embedding: torch.Tensor | None = None

    def expand(self, batch: int) -> "Guidance":
        """The guidance of one image ``(batch 1)`` for ``batch`` tiles of that image (views, no copies)."""
        if self.batch_size != 1:
            raise ValueError(f"expand() repeats the guidance of one image, got a batch of {self.batch_size}")

        def grow(tensor: torch.Tensor | None) -> torch.Tensor | None:
            return None if tensor is None else tensor.expand(batch, *tensor.shape[1:])

        priors = None if self.priors is None else tuple(grow(prior) for prior in self.priors)
        return Guidance(priors, grow(self.embedding), grow(self.positive_embedding))

    @property
    def batch_size(self) -> int | None:
        for tensor in (self.embedding, *(self.priors or ())):
            if tensor is not None:
                return int(tensor.shape[0])
        return None


def compute_guidance(cfe: nn.Module | None, sgm: nn.Module | None, images: torch.Tensor,
                     positive: torch.Tensor | None = None) -> Guidance:
    """Z (and Z⁺) from ``cfe`` and the priors from ``sgm`` for ``images (B, 3, H, W)`` in [0, 1].

    ``positive``: a second view of each image ``(B, 3, h, w)``; with the same shape as ``images`` both go
    through the CFE as one batch. Either network may be ``None`` (its fields are then ``None``).
    """
    if positive is not None and positive.shape[0] != images.shape[0]:
        raise ValueError(f"positive must have the batch size of the images ({images.shape[0]}), "
                         f"got {tuple(positive.shape)}")
    embedding = positive_embedding = None
    if cfe is not None:
        if positive is None:
            embedding = cfe(images)
        elif positive.shape == images.shape:
            both = cfe(torch.cat([images, positive]))
            embedding, positive_embedding = both[: images.shape[0]], both[images.shape[0]:]
        else:
            embedding, positive_embedding = cfe(images), cfe(positive)
    elif positive is not None:
        raise ValueError("positive= needs a CFE (its Z⁺ feeds the contrastive loss), but this network has none")
    priors = tuple(sgm(images)) if sgm is not None else None
    return Guidance(priors, embedding, positive_embedding)


def check_guidance(guidance: object, batch: int, *, prior_count: int, prior_dim: int, embed_dim: int) -> Guidance:
    """Raise a clear error unless ``guidance`` fits a batch of ``batch`` images of a network whose SGM gives
    ``prior_count`` priors of width ``prior_dim`` (0: no SGM) and whose CFE gives ``embed_dim`` (0: no CFE)."""
    if not isinstance(guidance, Guidance):
        raise TypeError(f"guidance must be the Guidance returned by .guide(images), got {type(guidance).__name__}")
    if (guidance.priors is None) != (prior_count == 0):
        have = "no priors" if guidance.priors is None else f"{len(guidance.priors)} priors"
        raise ValueError(f"guidance has {have} but this network expects {prior_count or 'none'} (SGM priors); "
                         "compute it with this network's .guide()")
    if guidance.priors is not None:
        if len(guidance.priors) != prior_count:
            raise ValueError(f"guidance.priors must hold {prior_count} tensors (finest level first), "
                             f"got {len(guidance.priors)}")
        for index, prior in enumerate(guidance.priors):
            _check_rows(prior, f"guidance.priors[{index}]", (batch, prior_dim))
    if (guidance.embedding is None) != (embed_dim == 0):
        raise ValueError("guidance.embedding (Z) must be given exactly when the network has a CFE; compute the "
                         "guidance with this network's .guide()")
    if guidance.embedding is not None:
        _check_rows(guidance.embedding, "guidance.embedding", (batch, embed_dim))
    if guidance.positive_embedding is not None:
        _check_rows(guidance.positive_embedding, "guidance.positive_embedding", (batch, embed_dim))
    return guidance


def _check_rows(tensor: object, name: str, shape: tuple[int, int]) -> None:
    if not isinstance(tensor, torch.Tensor) or tuple(tensor.shape) != shape:
        got = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
        raise ValueError(f"{name} must have shape {shape} (one row per image of the batch), got {got}")
    if not tensor.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {tensor.dtype}")
