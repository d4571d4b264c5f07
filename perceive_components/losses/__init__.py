"""Quality-aware losses of Perceive-IR (docs/method.md §2): module + functional pairs.

- ``CLIPAwareLoss`` / ``clip_aware_loss``: push the output toward the "excellent" prompt (§2.1).
- ``DifficultyAdaptivePerceptualLoss`` / ``difficulty_adaptive_perceptual_loss``: VGG contrastive ratio
  with difficulty-weighted proxy negatives (§2.2); ``probe_psnr`` for the authors' probe rule.
- ``DegradationContrastiveLoss`` / ``degradation_contrastive_loss``: InfoNCE on CFE embeddings,
  all-rank negatives under ``torch.distributed`` (§2.3).
- ``QualityAwareLoss``: L1 + λ1·L_cl + λ2·L_clip + λ3·L_dpl, returning ``(total, terms)`` (§2.4).
"""
from .clip_aware import CLIPAwareLoss, clip_aware_loss
from .contrastive import (
    DegradationContrastiveLoss, NoNegativesWarning, degradation_contrastive_loss, info_nce_per_anchor,
)
from .perceptual import (
    DifficultyAdaptivePerceptualLoss,
    difficulty_adaptive_perceptual_loss,
    difficulty_weights,
    probe_psnr,
)
from .quality_aware import QualityAwareLoss
from .vgg import VGGFeatures

__all__ = [
    "CLIPAwareLoss",
    "DegradationContrastiveLoss",
    "DifficultyAdaptivePerceptualLoss",
    "NoNegativesWarning",
    "QualityAwareLoss",
    "VGGFeatures",
    "clip_aware_loss",
    "degradation_contrastive_loss",
    "difficulty_adaptive_perceptual_loss",
    "difficulty_weights",
    "info_nce_per_anchor",
    "probe_psnr",
]
