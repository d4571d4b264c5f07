"""Degradation contrastive loss L_cl on CFE embeddings (docs/method.md §2.3), InfoNCE with τ = 0.1.

For anchor i (z_i = CFE(degraded crop), positive z⁺_i = CFE(another crop of the same degraded image)):

    N(i)   = { j in the whole (all-rank) batch : task_j ≠ task_i }              negatives, detached
    ℓ_i    = − log( exp(z_i·z⁺_i/τ) / ( exp(z_i·z⁺_i/τ) + Σ_{j∈N(i)} exp(z_i·z_j/τ) ) )
    L_cl   = mean over valid anchors (|N(i)| ≥ 1) of ℓ_i ;   0 (still in the graph) if none is valid

Under ``torch.distributed`` the anchors and labels of every rank are gathered (unequal per-rank batches
are padded to the largest one and the padding is masked out), so each anchor sees every negative of
the global batch. The returned value is the *global* mean, identical on every rank. Gradients reach
only the local anchors and positives (the gathered copies are detached, as are the local negatives in
one process), with ∂L/∂z_i equal to the single-process gradient on the concatenated batch; with
``ddp_mean_gradients=True`` (default) that local gradient is multiplied by the world size, so that
DDP's gradient *averaging* yields exactly the single-process parameter gradient.

A batch that holds one task only has no negative at all: L_cl is then 0 and CFE learns nothing from it.
``DegradationContrastiveLoss`` counts such calls (the count rides along in the value checks' one host
sync, no extra sync) and warns (``NoNegativesWarning``) at the 1st, 2nd, 4th, 8th … of them, with the
count so far; mix tasks in every batch, e.g. with ``perceive_components.data.TaskMixingBatchSampler``.
"""
from __future__ import annotations

import warnings
from typing import Sequence

import torch
import torch.distributed as dist
from torch import nn

from ..data.tasks import TaskLike, TaskVocabulary, as_vocabulary
from ..ops.validation import check_values, defer_host_read, deferred_value_checks
from .common import check_loss_weight, check_reduction

TEMPERATURE = 0.1
Labels = torch.Tensor | Sequence[TaskLike]


def task_labels(labels: Labels, vocabulary: TaskVocabulary | Sequence[str] | None,
                device: torch.device) -> torch.Tensor:
    """A ``(B,)`` integer tensor as given, or a sequence of task names / aliases / ids mapped by ``vocabulary``
    (default ``STANDARD_TASKS``; all noise levels are one task). Every rank must use the same vocabulary."""
    if isinstance(labels, torch.Tensor):
        return labels
    if isinstance(labels, (str, bytes)) or not isinstance(labels, Sequence):
        raise TypeError(f"labels must be an integer tensor of task ids or a sequence of task names, got {labels!r}")
    return as_vocabulary(vocabulary, "vocabulary").labels(labels, device=device)


class NoNegativesWarning(UserWarning):
    """Calls of ``DegradationContrastiveLoss`` in which no anchor had a negative (one task per batch)."""


def _check_inputs(anchor: object, positive: object, labels: object) -> None:
    for name, value in (("anchor", anchor), ("positive", positive), ("labels", labels)):
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if not anchor.is_floating_point() or anchor.ndim != 2:
        raise ValueError(f"anchor must be a floating (B, D) tensor of embeddings, "
                         f"got {anchor.dtype} {tuple(anchor.shape)}")
    if tuple(positive.shape) != tuple(anchor.shape) or not positive.is_floating_point():
        raise ValueError(f"positive must be a floating tensor of the anchor's shape {tuple(anchor.shape)}, "
                         f"got {positive.dtype} {tuple(positive.shape)}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor of task ids, got dtype {labels.dtype}")
    if tuple(labels.shape) != (anchor.shape[0],):
        raise ValueError(f"labels must have shape (B,) = ({anchor.shape[0]},), got {tuple(labels.shape)}")
    if anchor.numel():
        check_values(anchor, "anchor", value_range=None)
        check_values(positive, "positive", value_range=None)


def _gather_bank(anchor: torch.Tensor, labels: torch.Tensor, group
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """All ranks' detached anchors ``(W·M, D)``, labels ``(W·M,)``, a padding mask ``(W·M,)`` (True = real)
    and the world size; M = the largest per-rank batch."""
    world = dist.get_world_size(group)
    size = torch.tensor([anchor.shape[0]], device=anchor.device, dtype=torch.long)
    sizes = [torch.empty_like(size) for _ in range(world)]
    dist.all_gather(sizes, size, group=group)
    sizes_list = [int(s) for s in torch.cat(sizes).tolist()]
    largest = max(sizes_list)
    padded = anchor.new_zeros((largest, anchor.shape[1]))
    padded[: anchor.shape[0]] = anchor.detach()
    padded_labels = labels.new_zeros((largest,))
    padded_labels[: labels.shape[0]] = labels
    banks = [torch.empty_like(padded) for _ in range(world)]
    label_banks = [torch.empty_like(padded_labels) for _ in range(world)]
    dist.all_gather(banks, padded.contiguous(), group=group)
    dist.all_gather(label_banks, padded_labels.contiguous(), group=group)
    positions = torch.arange(largest, device=anchor.device).expand(world, largest)
    real = positions < torch.tensor(sizes_list, device=anchor.device)[:, None]
    return torch.cat(banks), torch.cat(label_banks), real.reshape(-1), world


def info_nce_per_anchor(
    anchor: torch.Tensor,
    positive: torch.Tensor,
    labels: torch.Tensor,
    bank: torch.Tensor,
    bank_labels: torch.Tensor,
    bank_valid: torch.Tensor,
    temperature: float = TEMPERATURE,
) -> tuple[torch.Tensor, torch.Tensor]:
    """ℓ_i against an explicit negative ``bank (M, D)`` with ``bank_labels (M,)`` and ``bank_valid (M,)``.

    Entry j is a negative of anchor i when ``bank_valid[j]`` and ``bank_labels[j] != labels[i]``. Returns
    the per-anchor losses ``(B,)`` (0 where an anchor has no negative) and that validity ``(B,)``. Computed
    in at least float32, outside autocast. The bank is used as given: detach it to stop its gradient.
    """
    dtype = torch.promote_types(anchor.dtype, torch.float32)
    with torch.autocast(anchor.device.type, enabled=False):
        z, z_pos, bank = anchor.to(dtype), positive.to(dtype), bank.to(dtype)
        positive_logit = (z * z_pos).sum(-1, keepdim=True) / temperature                     # (B, 1)
        is_negative = (bank_labels[None, :] != labels[:, None]) & bank_valid[None, :]        # (B, M)
        negative_logits = (z @ bank.t() / temperature).masked_fill(~is_negative, float("-inf"))
        logits = torch.cat([positive_logit, negative_logits], dim=1)
        per_anchor = logits.logsumexp(dim=1) - positive_logit[:, 0]
        valid = is_negative.any(dim=1)
        return torch.where(valid, per_anchor, per_anchor.new_zeros(())), valid


@deferred_value_checks()  # value checks: one host sync, after the work is queued
def degradation_contrastive_loss(
    anchor: torch.Tensor,
    positive: torch.Tensor,
    labels: Labels,
    *,
    vocabulary: TaskVocabulary | Sequence[str] | None = None,
    temperature: float = TEMPERATURE,
    reduction: str = "mean",
    process_group=None,
    ddp_mean_gradients: bool = True,
) -> torch.Tensor:
    """L_cl for ``anchor, positive (B, D)`` (L2-normalised CFE embeddings) and task ``labels (B,)``: integer ids,
    or task names / aliases of ``vocabulary`` (default ``STANDARD_TASKS``, e.g. ``["denoise_25", "derain"]``).

    ``reduction``: 'mean' (over valid anchors, all ranks), 'sum' (over valid anchors, all ranks) or 'none'
    (the local ``(B,)`` per-anchor losses, 0 where an anchor has no negative). Distributed use needs an
    initialised process group (default group unless ``process_group`` is given); every rank must call it.
    """
    return _loss_and_counts(anchor, positive, labels, vocabulary, temperature, reduction, process_group,
                            ddp_mean_gradients)[0]


def _loss_and_counts(anchor, positive, labels, vocabulary, temperature, reduction, process_group, ddp_mean_gradients
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """L_cl and ``[anchors with a negative, anchors]`` (global for 'mean'/'sum' under DDP), on the device."""
    check_reduction(reduction)
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    if isinstance(anchor, torch.Tensor):
        labels = task_labels(labels, vocabulary, anchor.device)
    _check_inputs(anchor, positive, labels)
    labels = labels.to(anchor.device)
    distributed = dist.is_available() and dist.is_initialized()
    if distributed:
        bank, bank_labels, real, world = _gather_bank(anchor, labels, process_group)
    else:
        bank, bank_labels, world = anchor.detach(), labels, 1
        real = torch.ones_like(labels, dtype=torch.bool)

    per_anchor, valid = info_nce_per_anchor(anchor, positive, labels, bank, bank_labels, real, temperature)
    local_counts = torch.stack([valid.sum(), torch.full((), valid.numel(), device=valid.device)])  # no copy
    if reduction == "none":
        return per_anchor, local_counts

    local_sum = per_anchor.sum()
    if not distributed:
        count = valid.sum()
        return (local_sum / count.clamp_min(1) if reduction == "mean" else local_sum), local_counts
    stats = torch.stack([local_sum.detach(), valid.sum().to(local_sum.dtype)])
    dist.all_reduce(stats, group=process_group)
    global_sum, global_count = stats[0], stats[1]
    scale = float(world) if ddp_mean_gradients else 1.0
    # value = the global sum; gradient = scale × ∂(local part)/∂(local anchors and positives)
    total = global_sum + scale * (local_sum - local_sum.detach())
    counts = torch.stack([global_count.detach(), real.sum().to(global_count.dtype)])
    return (total / global_count.clamp_min(1) if reduction == "mean" else total), counts


class DegradationContrastiveLoss(nn.Module):
    """L_cl as a module: ``forward(anchor (B, D), positive (B, D), labels (B,)) -> loss``.

    Holds no parameters. ``labels``: integer task ids or names of ``vocabulary`` (default ``STANDARD_TASKS``).
    See ``degradation_contrastive_loss`` for the distributed semantics. Counts the calls in which no anchor had
    a negative (``calls_without_negatives`` of ``calls``) and warns about them (``NoNegativesWarning``, on rank 0)
    at the 1st, 2nd, 4th, 8th … such call.
    """

    def __init__(self, temperature: float = TEMPERATURE, *, loss_weight: float = 1.0, reduction: str = "mean",
                 process_group=None, ddp_mean_gradients: bool = True,
                 vocabulary: TaskVocabulary | Sequence[str] | None = None) -> None:
        super().__init__()
        self.vocabulary = as_vocabulary(vocabulary, "vocabulary")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature!r}")
        self.temperature = float(temperature)
        self.loss_weight = check_loss_weight(loss_weight)
        self.reduction = check_reduction(reduction)
        self.process_group = process_group
        self.ddp_mean_gradients = bool(ddp_mean_gradients)
        self.calls = self.calls_without_negatives = 0

    def forward(self, anchor: torch.Tensor, positive: torch.Tensor, labels: Labels) -> torch.Tensor:
        with deferred_value_checks():  # the count joins the value checks' one host sync
            loss, counts = _loss_and_counts(anchor, positive, labels, self.vocabulary, self.temperature,
                                            self.reduction, self.process_group, self.ddp_mean_gradients)
            defer_host_read(counts, self._note_negatives)
        return self.loss_weight * loss

    def _note_negatives(self, with_negative: float, anchors: float) -> None:
        self.calls += 1
        if anchors == 0 or with_negative > 0:
            return
        self.calls_without_negatives += 1
        count = self.calls_without_negatives
        if count & (count - 1) or (dist.is_available() and dist.is_initialized() and dist.get_rank() != 0):
            return  # warn at the 1st, 2nd, 4th, 8th … such call only, and on rank 0 only
        warnings.warn(
            f"DegradationContrastiveLoss: no anchor had a negative (an image of another task in the batch) in "
            f"{count} of {self.calls} calls so far, so L_cl was 0 there and CFE learnt nothing from them. Mix "
            "tasks in every batch, e.g. batch_sampler=perceive_components.data.TaskMixingBatchSampler(labels, "
            "batch_size, min_tasks=2). (Repeated at the 2nd, 4th, 8th … such call.)",
            NoNegativesWarning)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, loss_weight={self.loss_weight}, reduction={self.reduction!r}"
