"""QualityAwareLoss: the whole stage-2 objective of Perceive-IR in one call (docs/method.md §2.4).

    L = λ0·L1(R, G) + λ1·L_cl + λ2·L_clip + λ3·L_dpl        λ0 = 1, λ1 = 0.1, λ2 = 0.05, λ3 = 0.1

L1 is inside (``l1_weight=1.0``) so that the common case is one line; ``l1_weight=0`` leaves the
reconstruction loss to the caller. L_cl is added when the CFE outputs are given — the network's
``guidance`` (Z and Z⁺ from ``net.guide(degraded, positive=view)``) or ``anchor``/``positive`` — with the
task ``labels``; a term whose weight is 0 is neither built nor computed (no CLIP or VGG needed for it).
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from ..data.tasks import TaskVocabulary
from ..guidance import Guidance
from ..ops.validation import check_same_shape, deferred_value_checks
from .clip_aware import CLIPAwareLoss
from .common import at_least_float32, check_loss_weight, check_reduction, reduce
from .contrastive import TEMPERATURE, DegradationContrastiveLoss
from .perceptual import LAYER_WEIGHTS, W_EASY, DifficultyAdaptivePerceptualLoss
from .vgg import DEFAULT_TAPS, DEFAULT_VGG

LAMBDA_CONTRASTIVE = 0.1
LAMBDA_CLIP = 0.05
LAMBDA_PERCEPTUAL = 0.1


class QualityAwareLoss(nn.Module):
    """``forward(restored, gt, degraded, negatives=None, mask=None, *, guidance=None, labels=None,
    anchor=None, positive=None, model_psnr=None) -> (total, terms)``.

    Shapes: images ``(B, 3, H, W)`` in [0, 1]; ``negatives (B, K, 3, H, W)``; ``mask (B, K)`` bool;
    ``guidance``: the ``Guidance`` of the batch (its ``embedding`` Z and ``positive_embedding`` Z⁺ are the
    anchors and positives of L_cl); or ``anchor, positive (B, D)`` CFE embeddings given directly;
    ``labels``: ``(B,)`` integer task ids, or task names / aliases of ``vocabulary`` (default the standard
    tasks, ``perceive_components.data.STANDARD_TASKS``: all noise levels are one task). ``terms`` maps
    ``"l1"``, ``"contrastive"``, ``"clip"``, ``"perceptual"`` (each term *before* its λ, detached; only the
    terms computed) and ``"total"`` (detached) for logging. ``total`` keeps the graph.

    Args:
        perceiver: a trained ``QualityPerceiver`` (or repo id / folder); prompts are frozen and cached.
            May be ``None`` when ``clip_weight == 0``.
        vgg: timm VGG name (``vgg16.tv_in1k``), a built VGG, or a ``VGGFeatures``; ``vgg_pretrained``
            loads ImageNet weights for a name. Unused when ``perceptual_weight == 0``.
        difficulty: ``"online"`` (default) or ``"probe"`` (then pass ``model_psnr`` to ``forward``).
        vocabulary: the ``TaskVocabulary`` (or task names) that names in ``labels`` are read with.
        Frozen networks live in neither ``state_dict()`` nor ``parameters()``; ``.to(device)`` moves them.
    """

    def __init__(
        self,
        perceiver: nn.Module | str | Path | None = None,
        vgg: str | nn.Module = DEFAULT_VGG,
        *,
        vgg_pretrained: bool = True,
        l1_weight: float = 1.0,
        contrastive_weight: float = LAMBDA_CONTRASTIVE,
        clip_weight: float = LAMBDA_CLIP,
        perceptual_weight: float = LAMBDA_PERCEPTUAL,
        temperature: float = TEMPERATURE,
        clip_form: str = "one_minus_p",
        clip_logit_scale: float | None = None,
        difficulty: str = "online",
        taps: Sequence[str] = DEFAULT_TAPS,
        layer_weights: Sequence[float] = LAYER_WEIGHTS,
        w_easy: float = W_EASY,
        straight_through: bool = True,
        vocabulary: TaskVocabulary | Sequence[str] | None = None,
        loss_weight: float = 1.0,
        reduction: str = "mean",
    ) -> None:
        super().__init__()
        self.reduction = check_reduction(reduction)
        self.loss_weight = check_loss_weight(loss_weight)
        self.l1_weight = check_loss_weight(l1_weight, "l1_weight")
        self.contrastive_weight = check_loss_weight(contrastive_weight, "contrastive_weight")
        self.clip_weight = check_loss_weight(clip_weight, "clip_weight")
        self.perceptual_weight = check_loss_weight(perceptual_weight, "perceptual_weight")
        if self.clip_weight > 0 and perceiver is None:
            raise ValueError("perceiver is required when clip_weight > 0 (pass a trained QualityPerceiver, "
                             "or clip_weight=0 to train without the CLIP-aware term)")
        self.clip_loss = CLIPAwareLoss(perceiver, clip_form, clip_logit_scale, straight_through=straight_through,
                                       reduction="none") if self.clip_weight > 0 else None
        self.perceptual_loss = DifficultyAdaptivePerceptualLoss(
            vgg, pretrained=vgg_pretrained, taps=taps, layer_weights=layer_weights, w_easy=w_easy,
            difficulty=difficulty, straight_through=straight_through, reduction="none",
        ) if self.perceptual_weight > 0 else None
        self.contrastive_loss = DegradationContrastiveLoss(temperature, reduction=self.reduction, vocabulary=vocabulary)

    @deferred_value_checks()  # every term's value checks share one host sync, after the work is queued
    def forward(
        self,
        restored: torch.Tensor,
        gt: torch.Tensor,
        degraded: torch.Tensor,
        negatives: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        *,
        guidance: Guidance | None = None,
        labels: torch.Tensor | None = None,
        anchor: torch.Tensor | None = None,
        positive: torch.Tensor | None = None,
        model_psnr: float | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if guidance is not None:
            if anchor is not None or positive is not None:
                raise ValueError("pass the CFE embeddings either as guidance= or as anchor=/positive=, not both")
            if not isinstance(guidance, Guidance):
                raise TypeError(f"guidance must be the Guidance returned by net.guide(), got {type(guidance).__name__}")
            if labels is not None and guidance.positive_embedding is None:
                raise ValueError("labels were given for the contrastive term but the guidance has no positive "
                                 "embedding: compute it with net.guide(degraded, positive=view)")
            if labels is not None:
                anchor, positive = guidance.embedding, guidance.positive_embedding
        cfe_inputs = (anchor, positive, labels)
        if any(x is not None for x in cfe_inputs) and any(x is None for x in cfe_inputs):
            missing = [n for n, x in zip(("anchor", "positive", "labels"), cfe_inputs) if x is None]
            raise ValueError(f"the contrastive term needs anchor, positive and labels together; missing {missing}")
        weighted: list[tuple[float, str, torch.Tensor]] = []
        if self.perceptual_loss is not None:
            weighted.append((self.perceptual_weight, "perceptual", self.perceptual_loss(
                restored, gt, degraded, negatives, mask, model_psnr=model_psnr)))
        elif (negatives is not None and negatives.shape[1:2] != (0,)) or (mask is not None and mask.shape[1:2] != (0,)):
            raise ValueError("negatives/mask were given but perceptual_weight is 0, so they would be ignored "
                             "(a fixed batch format with K = 0 negatives is fine)")
        if self.clip_loss is not None:
            weighted.append((self.clip_weight, "clip", self.clip_loss(restored)))
        if self.l1_weight > 0:
            check_same_shape(restored, "restored", gt, "gt")
            l1 = (at_least_float32(restored) - at_least_float32(gt)).abs().flatten(1).mean(1)
            weighted.append((self.l1_weight, "l1", l1))

        terms: dict[str, torch.Tensor] = {}
        total = restored.new_zeros((), dtype=torch.float32)
        for weight, name, values in weighted:
            value = reduce(values, self.reduction)
            terms[name] = value.detach()
            total = total + weight * value
        if anchor is not None and self.contrastive_weight > 0:
            value = self.contrastive_loss(anchor, positive, labels)
            terms["contrastive"] = value.detach()
            total = total + self.contrastive_weight * value
        total = self.loss_weight * total
        terms["total"] = total.detach()
        return total, terms

    def extra_repr(self) -> str:
        return (f"l1_weight={self.l1_weight}, contrastive_weight={self.contrastive_weight}, "
                f"clip_weight={self.clip_weight}, perceptual_weight={self.perceptual_weight}, "
                f"loss_weight={self.loss_weight}, reduction={self.reduction!r}")
