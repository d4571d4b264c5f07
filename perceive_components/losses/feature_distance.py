"""Mean-L1 distances between anchor feature maps (with gradient) and constant ones, for L_dpl (docs/method.md §2.2).

    D(a, b) = mean |a − b|        (per pair, over C·H·W)        ∂D/∂a = sign(a − b) / (C·H·W)

The perceptual loss compares the restored image's VGG features with those of G, L and every valid
proxy negative: (2B + N) feature-map pairs per tap. Written as one autograd function this costs no
copy of the anchor per negative and keeps only the sign of a − b for the backward pass, as int8.
"""
from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable


def _sign_int8(diff: torch.Tensor) -> torch.Tensor:
    return diff.sign_().to(torch.int8)  # d|x|/dx, kept in one byte per element until the backward pass


class _MeanAbsToAnchor(torch.autograd.Function):
    """D = mean |a − o| between anchor feature maps and constant ones; the gradient goes to the anchors.

    ``forward(anchor (B, C, H, W), paired (P, B, C, H, W), gathered (N, C, H, W), owner (N,))`` returns
    ``(P, B)`` distances to the paired maps (G and L) and ``(N,)`` distances of the gathered maps (valid
    proxy negatives; row n belongs to sample ``owner[n]``) to their sample's anchor. No host sync.
    Versus the autograd graph of ``(a[owner] − o).abs().mean()``: no copy of the anchor per negative and
    no saved float ``|a − o|`` (only its sign, as int8: a quarter of the memory); on the CPU no large
    temporaries at all (row by row through a cache-hot scratch map), on accelerators a few batched kernels.
    """

    @staticmethod
    def forward(ctx, anchor, paired, gathered, owner):
        numel = anchor[0].numel()
        if _vectorized(anchor):
            diff_paired = anchor.unsqueeze(0) - paired
            diff_gathered = anchor.index_select(0, owner).sub_(gathered)
            paired_dist = torch.linalg.vector_norm(diff_paired.flatten(2), ord=1, dim=2) / numel
            gathered_dist = torch.linalg.vector_norm(diff_gathered.flatten(1), ord=1, dim=1) / numel
            sign_paired, sign_gathered = _sign_int8(diff_paired), _sign_int8(diff_gathered)
        else:  # row by row through one cache-hot scratch map
            rows = [(sample, paired[index, sample]) for index in range(paired.shape[0])
                    for sample in range(paired.shape[1])]
            rows += [(sample, gathered[row]) for row, sample in enumerate(owner.tolist())]
            signs = torch.empty((len(rows),) + anchor.shape[1:], dtype=torch.int8, device=anchor.device)
            scratch, sign, norms = torch.empty_like(anchor[0]), torch.empty_like(anchor[0]), []
            for row, (sample, other) in enumerate(rows):
                torch.sub(anchor[sample], other, out=scratch)
                signs[row].copy_(torch.sign(scratch, out=sign))
                norms.append(scratch.abs_().sum())
            dist = torch.stack(norms) / numel if rows else anchor.new_zeros(0)
            split = paired.shape[0] * paired.shape[1]
            paired_dist, gathered_dist = dist[:split].view(paired.shape[:2]), dist[split:]
            sign_paired, sign_gathered = signs[:split].view(paired.shape[:2] + anchor.shape[1:]), signs[split:]
        ctx.save_for_backward(sign_paired, sign_gathered, owner)
        ctx.numel = numel
        return paired_dist, gathered_dist

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_paired, grad_gathered):
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        sign_paired, sign_gathered, owner = ctx.saved_tensors
        trailing = (1,) * (sign_gathered.ndim - 1)
        scale_paired = (grad_paired / ctx.numel).view(grad_paired.shape + trailing)
        scale_gathered = (grad_gathered / ctx.numel).view((-1,) + trailing)
        grad = sign_paired[0] * scale_paired[0]
        for index in range(1, sign_paired.shape[0]):
            grad.addcmul_(sign_paired[index], scale_paired[index])
        if _vectorized(grad):  # three large kernels; the caching allocator makes the temporary free
            grad.index_add_(0, owner, sign_gathered.to(grad.dtype).mul_(scale_gathered))
        else:  # in place, no temporaries (fresh CPU memory costs page faults)
            for row, sample in enumerate(owner.tolist()):
                grad[sample].addcmul_(sign_gathered[row], scale_gathered[row])
        return grad, None, None, None


def _vectorized(tensor: torch.Tensor) -> bool:
    """Large batched kernels on accelerators; row-by-row on the CPU, where fresh memory costs page faults."""
    return tensor.device.type != "cpu"


def mean_abs_to_anchor(anchor: torch.Tensor, paired: torch.Tensor, gathered: torch.Tensor, owner: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(P, B)`` distances of ``anchor (B, C, H, W)`` to ``paired (P, B, C, H, W)`` and ``(N,)`` distances of
    ``gathered (N, C, H, W)`` to ``anchor[owner]``."""
    return _MeanAbsToAnchor.apply(anchor, paired, gathered, owner)
