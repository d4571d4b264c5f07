"""Difficulty-adaptive perceptual loss L_dpl (docs/method.md §2.2): a contrastive ratio in VGG-16 feature space.

Anchor R (restored, with gradient), positive G (ground truth), easy negative L (degraded input), proxy
negatives P_j (outputs of frozen, weaker restorers) with validity m_j(b) ∈ {0, 1}:

    D(a, b)   = mean |a − b|                                         (per sample, over C·H·W)
    L_dpl(b)  = Σ_l ω_l · D(R_l, G_l) / max( w_easy·D(R_l, L_l) + Σ_j m_j(b)·w_j(b)·D(R_l, P_jl), ε )

with taps l = relu1_2, relu2_2, relu3_1, relu3_3, ω = (1/12, 1/6, 1/3, 1), w_easy = 2, ε = 1e-6.
Difficulty weights: w_j(b) = 1.25 ("hard") if PSNR(P_j(b), G(b)) ≤ reference, else 0.75 ("very hard",
closer to G than the model: pushed less). The reference is

- ``"online"`` (default): PSNR(R(b), G(b)) of the same step, per sample (detached);
- ``"probe"`` (authors' code): one scalar, the model's mean PSNR on a fixed probe set re-measured at each
  epoch start (``probe_psnr``).

Cost: one VGG pass with gradient on R, and ONE no-grad VGG pass on the concatenation
[G; L; valid P_j]. Masked-out negatives are never gathered, validated or run.
"""
from __future__ import annotations

from typing import Callable, Iterable, Sequence

import torch
from torch import nn

from ..ops.frozen import FrozenHolder
from ..ops.metrics import psnr
from ..ops.validation import check_choice, check_images, check_same_shape, deferred_value_checks
from .common import at_least_float32, check_loss_weight, check_reduction, reduce, straight_through_clamp
from .feature_distance import mean_abs_to_anchor
from .vgg import DEFAULT_TAPS, DEFAULT_VGG, as_vgg_features

LAYER_WEIGHTS = (1 / 12, 1 / 6, 1 / 3, 1.0)
W_EASY = 2.0
HARD_WEIGHT = 1.25
VERY_HARD_WEIGHT = 0.75
EPS = 1e-6
DIFFICULTY_RULES = ("online", "probe")

FeatureFn = Callable[[torch.Tensor], Sequence[torch.Tensor]]


def difficulty_weights(negative_psnr: torch.Tensor, reference_psnr: torch.Tensor | float,
                       hard_weight: float = HARD_WEIGHT, very_hard_weight: float = VERY_HARD_WEIGHT) -> torch.Tensor:
    """w = ``hard_weight`` where PSNR(P) ≤ reference (as bad as the model or worse), else ``very_hard_weight``."""
    reference = torch.as_tensor(reference_psnr, dtype=negative_psnr.dtype, device=negative_psnr.device)
    return torch.where(negative_psnr <= reference, negative_psnr.new_tensor(hard_weight),
                       negative_psnr.new_tensor(very_hard_weight))


def _valid_negatives(restored: torch.Tensor, negatives: torch.Tensor | None, mask: torch.Tensor | None
                     ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Validate ``negatives (B, K, 3, H, W)`` / ``mask (B, K)``; return the valid ones ``(N, 3, H, W)`` and
    the sample index each belongs to ``(N,)``, sample-major (``None, None`` when there are none)."""
    batch, _, height, width = restored.shape
    if negatives is None:
        if mask is not None:
            raise ValueError("mask was given without negatives; pass negatives (B, K, 3, H, W) or drop the mask")
        return None, None
    if not isinstance(negatives, torch.Tensor):
        raise TypeError(f"negatives must be a torch.Tensor of shape (B, K, 3, H, W), got {type(negatives).__name__}")
    if negatives.ndim != 5 or negatives.shape[0] != batch or negatives.shape[2] != 3 \
            or tuple(negatives.shape[3:]) != (height, width):
        raise ValueError(
            f"negatives must have shape (B, K, 3, H, W) = ({batch}, K, 3, {height}, {width}) to match restored "
            f"{tuple(restored.shape)}, got {tuple(negatives.shape)}"
        )
    count = negatives.shape[1]
    if mask is not None:
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"mask must be a bool torch.Tensor of shape (B, K), got {type(mask).__name__}")
        if mask.dtype != torch.bool:
            raise TypeError(f"mask must have dtype torch.bool (use mask.bool()), got {mask.dtype}")
        if tuple(mask.shape) != (batch, count):
            raise ValueError(f"mask must have shape (B, K) = ({batch}, {count}) to match negatives, "
                             f"got {tuple(mask.shape)}")
    if count == 0:  # a fixed batch format without proxies: (B, 0, 3, H, W) and a (B, 0) mask
        return None, None
    if mask is None:
        owner = torch.arange(batch, device=negatives.device).repeat_interleave(count)
        valid = negatives.flatten(0, 1)
    else:
        owner, slot = mask.to(negatives.device).nonzero(as_tuple=True)
        if owner.numel() == 0:
            return None, None
        valid = negatives[owner, slot]
    check_images(valid, "negatives (valid entries)")
    return valid, owner


@deferred_value_checks()  # value checks: one host sync, after the work is queued
def difficulty_adaptive_perceptual_loss(
    restored: torch.Tensor,
    gt: torch.Tensor,
    degraded: torch.Tensor,
    negatives: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    *,
    features: FeatureFn,
    difficulty: str = "online",
    model_psnr: float | None = None,
    layer_weights: Sequence[float] = LAYER_WEIGHTS,
    w_easy: float = W_EASY,
    hard_weight: float = HARD_WEIGHT,
    very_hard_weight: float = VERY_HARD_WEIGHT,
    eps: float = EPS,
    straight_through: bool = True,
    reduction: str = "mean",
) -> torch.Tensor:
    """L_dpl of ``restored (B, 3, H, W)`` against ``gt``, ``degraded`` and ``negatives (B, K, 3, H, W)``.

    Args:
        negatives: ``(B, K, 3, H, W)`` proxy outputs; ``None`` or K = 0 (with a ``(B, 0)`` mask) means none, and
            the easy negative alone is the denominator.
        mask: ``(B, K)`` bool, True where negative k of sample b is valid (default: all valid).
        features: maps images ``(N, 3, H, W)`` in [0, 1] to one feature map per tap (e.g. ``VGGFeatures``).
        difficulty: ``"online"`` (per-sample PSNR of R in this step) or ``"probe"`` (``model_psnr`` scalar).
        straight_through: clamp R to [0, 1] for VGG with a straight-through gradient (else a hard clamp).
    Returns:
        ``(B,)`` for ``reduction='none'``, else a scalar.
    """
    check_reduction(reduction)
    check_choice(difficulty, "difficulty", DIFFICULTY_RULES)
    check_images(restored, "restored", value_range=None)  # outputs may overshoot: clamped below
    check_images(gt, "gt")
    check_images(degraded, "degraded")
    check_same_shape(restored, "restored", gt, "gt")
    check_same_shape(restored, "restored", degraded, "degraded")
    if difficulty == "probe" and model_psnr is None:
        raise ValueError("difficulty='probe' needs model_psnr (the model's mean probe PSNR; see probe_psnr())")
    valid, owner = _valid_negatives(restored, negatives, mask)
    batch = restored.shape[0]
    clean = [at_least_float32(gt), at_least_float32(degraded)]

    with torch.no_grad():
        if valid is not None:
            clean.append(at_least_float32(valid))
            negative_psnr = psnr(at_least_float32(valid).clamp(0, 1), clean[0][owner])
            if difficulty == "online":
                reference = psnr(at_least_float32(restored.detach()).clamp(0, 1), clean[0])[owner]
            else:
                reference = float(model_psnr)
            weights = difficulty_weights(negative_psnr, reference, hard_weight, very_hard_weight)
        others = features(torch.cat(clean).clamp(0, 1))  # ONE pass: [G; L; valid P]
    anchor_input = straight_through_clamp(restored) if straight_through else restored.clamp(0, 1)
    anchors = features(anchor_input)
    if len(anchors) != len(layer_weights):
        raise ValueError(f"features returned {len(anchors)} maps but layer_weights has {len(layer_weights)} entries")

    owner_rows = owner if valid is not None else torch.zeros(0, dtype=torch.long, device=restored.device)
    ratio = 0.0
    for weight, anchor, other in zip(layer_weights, anchors, others):
        anchor, other = at_least_float32(anchor), at_least_float32(other)  # distances in fp32 under autocast
        paired = other[: 2 * batch].unflatten(0, (2, batch))
        (positive, easy), push = mean_abs_to_anchor(anchor, paired, other[2 * batch :], owner_rows)
        denominator = w_easy * easy
        if valid is not None:
            denominator = denominator.index_add(0, owner, weights.to(denominator.dtype) * push)
        ratio = ratio + weight * positive / denominator.clamp_min(eps)
    return reduce(ratio, reduction)


@torch.no_grad()
def probe_psnr(
    model: Callable[[torch.Tensor], torch.Tensor],
    probe: Iterable[tuple[torch.Tensor, torch.Tensor]],
    *,
    device: torch.device | str | None = None,
    autocast_dtype: torch.dtype | None = None,
) -> float:
    """The model's mean per-image PSNR (dB) on a fixed probe set: the authors' "probe" reference (docs/method.md §2.2).

    ``probe`` yields ``(degraded, gt)`` batches ``(B, 3, H, W)`` (the same fixed crops at every call; the
    authors use 24 training crops per task and re-measure at each epoch start). Outputs are clamped to
    [0, 1]. An ``nn.Module`` runs in eval mode and gets its mode back. Under ``torch.distributed`` each
    rank passes its share of the probe set and the result is the mean over all ranks' images.
    """
    was_training = isinstance(model, nn.Module) and model.training
    if isinstance(model, nn.Module):
        model.eval()
    total = count = 0.0
    try:
        for degraded, gt in probe:
            if device is not None:
                degraded, gt = degraded.to(device), gt.to(device)
            check_images(degraded, "probe degraded")
            check_same_shape(degraded, "probe degraded", gt, "probe gt")
            with torch.autocast(degraded.device.type, dtype=autocast_dtype or torch.bfloat16,
                                enabled=autocast_dtype is not None):
                restored = model(degraded)
            values = psnr(restored.float().clamp(0, 1), gt.float())
            total += float(values.double().sum())
            count += values.numel()
    finally:
        if was_training:
            model.train()
    totals = torch.tensor([total, count], dtype=torch.float64)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        backend_device = device or ("cuda" if torch.distributed.get_backend() == "nccl" else "cpu")
        totals = totals.to(backend_device)
        torch.distributed.all_reduce(totals)
    total, count = totals.tolist()
    if count == 0:
        raise ValueError("probe is empty: it must yield at least one (degraded, gt) batch")
    return total / count


class DifficultyAdaptivePerceptualLoss(FrozenHolder):
    """L_dpl as a module with a frozen, truncated VGG (out of ``state_dict()`` and ``parameters()``).

    ``forward(restored, gt, degraded, negatives=None, mask=None, *, model_psnr=None)``; see
    ``difficulty_adaptive_perceptual_loss`` for shapes. ``vgg``: timm name (default ``vgg16.tv_in1k``,
    ImageNet weights when ``pretrained``), a built VGG / ``features`` stack, or a ``VGGFeatures``.
    """

    def __init__(
        self,
        vgg: str | nn.Module = DEFAULT_VGG,
        *,
        pretrained: bool = True,
        taps: Sequence[str] = DEFAULT_TAPS,
        layer_weights: Sequence[float] = LAYER_WEIGHTS,
        w_easy: float = W_EASY,
        difficulty: str = "online",
        hard_weight: float = HARD_WEIGHT,
        very_hard_weight: float = VERY_HARD_WEIGHT,
        eps: float = EPS,
        straight_through: bool = True,
        loss_weight: float = 1.0,
        reduction: str = "mean",
    ) -> None:
        super().__init__()
        self.reduction = check_reduction(reduction)
        self.loss_weight = check_loss_weight(loss_weight)
        self.difficulty = check_choice(difficulty, "difficulty", DIFFICULTY_RULES)
        self.layer_weights = tuple(float(w) for w in layer_weights)
        if len(self.layer_weights) != len(tuple(taps)):
            raise ValueError(f"layer_weights needs one weight per tap ({len(tuple(taps))}), got {self.layer_weights}")
        self.w_easy, self.eps = check_loss_weight(w_easy, "w_easy"), float(eps)
        self.hard_weight = check_loss_weight(hard_weight, "hard_weight")
        self.very_hard_weight = check_loss_weight(very_hard_weight, "very_hard_weight")
        self.straight_through = bool(straight_through)
        self.hold_frozen("vgg", as_vgg_features(vgg, taps, pretrained))

    def forward(self, restored: torch.Tensor, gt: torch.Tensor, degraded: torch.Tensor,
                negatives: torch.Tensor | None = None, mask: torch.Tensor | None = None, *,
                model_psnr: float | None = None) -> torch.Tensor:
        loss = difficulty_adaptive_perceptual_loss(
            restored, gt, degraded, negatives, mask, features=self.vgg, difficulty=self.difficulty,
            model_psnr=model_psnr, layer_weights=self.layer_weights, w_easy=self.w_easy,
            hard_weight=self.hard_weight, very_hard_weight=self.very_hard_weight, eps=self.eps,
            straight_through=self.straight_through, reduction=self.reduction,
        )
        return self.loss_weight * loss

    def extra_repr(self) -> str:
        return (f"taps={self.vgg.taps}, layer_weights={self.layer_weights}, w_easy={self.w_easy}, "
                f"difficulty={self.difficulty!r}, loss_weight={self.loss_weight}, reduction={self.reduction!r}")
