"""CLIP-aware loss L_clip (docs/method.md §2.1): push the restored image toward the "excellent" prompt.

    v = normalize( E_img( clamp01(R) ) )          (frozen CLIP, gradient flows into R)
    p = softmax( s · v Tᵀ )                       T: (3, D) cached prompt features of a frozen perceiver
    L_clip(b) = 1 − p_b[excellent]                (form "one_minus_p", default)
              = − log p_b[excellent]              (form "nll")

Logit scale s: ``None`` (default) uses the perceiver's scale (CLIP's exp(logit_scale) ≈ 100, the scale
the prompts were trained at); ``1.0`` reproduces the authors' code, where p ≈ 1/3 and the gradient is
almost zero. Clamp: straight-through by default (forward clamps to [0, 1], backward passes the gradient
unchanged, so over- and undershooting pixels are still pushed); ``straight_through=False`` is the hard
clamp of the authors' code (zero gradient outside [0, 1]).
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..ops.frozen import FrozenHolder
from ..ops.validation import check_choice, check_images, deferred_value_checks
from .common import check_loss_weight, check_reduction, reduce

FORMS = ("one_minus_p", "nll")


def _check_perceiver(perceiver: object) -> nn.Module:
    needed = ("encode_images", "text_features", "logit_scale")
    if not isinstance(perceiver, nn.Module) or any(not hasattr(perceiver, name) for name in needed):
        raise TypeError(f"perceiver must be a QualityPerceiver (or a repo id / folder to load one), "
                        f"got {type(perceiver).__name__}")
    return perceiver


def _check_scale(logit_scale: object) -> float | None:
    if logit_scale is None:
        return None
    if isinstance(logit_scale, bool) or not isinstance(logit_scale, (int, float)) or not 0 < logit_scale < float("inf"):
        raise ValueError(f"logit_scale must be None (the perceiver's scale) or a positive number, got {logit_scale!r}")
    return float(logit_scale)


@deferred_value_checks()  # value checks: one host sync, after the work is queued
def clip_aware_loss(
    restored: torch.Tensor,
    perceiver: nn.Module,
    *,
    form: str = "one_minus_p",
    logit_scale: float | None = None,
    target_tier: int = -1,
    straight_through: bool = True,
    reduction: str = "mean",
) -> torch.Tensor:
    """L_clip of ``restored (B, 3, H, W)`` in [0, 1] under a frozen ``perceiver``; ``(B,)`` for 'none'.

    ``target_tier`` indexes the tier to reach (-1: the best, "excellent").
    """
    check_reduction(reduction)
    check_choice(form, "form", FORMS)
    scale = _check_scale(logit_scale)
    check_images(restored, "restored", value_range=None)  # outputs may overshoot: clamped below
    features = perceiver.encode_images(restored, straight_through=straight_through)
    with torch.autocast(restored.device.type, enabled=False):  # the 3-way head in fp32, even under bf16 autocast
        text = perceiver.text_features().float()
        logits = (perceiver.logit_scale if scale is None else scale) * features.float() @ text.t()
        log_p = logits.log_softmax(dim=-1)[:, target_tier]
        values = -log_p if form == "nll" else 1.0 - log_p.exp()
    return reduce(values, reduction)


class CLIPAwareLoss(FrozenHolder):
    """L_clip as a module; the perceiver (CLIP + prompts) is held frozen, out of ``state_dict()`` and
    ``parameters()``.

    Args:
        perceiver: a ``QualityPerceiver`` or a Hub repo id / folder for ``QualityPerceiver.from_pretrained``.
            Its prompts are frozen here (``freeze_prompts``): the three text features are computed once and
            cached; with ``drop_text_encoder`` (default) the CLIP text tower is released.
        form: ``"one_minus_p"`` (paper and authors' code) or ``"nll"``.
        logit_scale: ``None`` = the perceiver's scale (≈100, default); ``1.0`` = the authors' code.
    """

    def __init__(
        self,
        perceiver: nn.Module | str | Path,
        form: str = "one_minus_p",
        logit_scale: float | None = None,
        *,
        target_tier: int = -1,
        straight_through: bool = True,
        drop_text_encoder: bool = True,
        loss_weight: float = 1.0,
        reduction: str = "mean",
    ) -> None:
        super().__init__()
        if isinstance(perceiver, (str, Path)):
            from ..perceiver import QualityPerceiver

            perceiver = QualityPerceiver.from_pretrained(perceiver)
        perceiver = _check_perceiver(perceiver)
        self.form = check_choice(form, "form", FORMS)
        self.logit_scale = _check_scale(logit_scale)
        self.reduction = check_reduction(reduction)
        self.loss_weight = check_loss_weight(loss_weight)
        self.target_tier = int(target_tier)
        self.straight_through = bool(straight_through)
        perceiver.freeze_prompts(drop_text_encoder=drop_text_encoder)
        self.hold_frozen("perceiver", perceiver)

    def forward(self, restored: torch.Tensor) -> torch.Tensor:
        loss = clip_aware_loss(restored, self.perceiver, form=self.form, logit_scale=self.logit_scale,
                               target_tier=self.target_tier, straight_through=self.straight_through,
                               reduction=self.reduction)
        return self.loss_weight * loss

    def extra_repr(self) -> str:
        scale = self.perceiver.logit_scale if self.logit_scale is None else self.logit_scale
        return (f"form={self.form!r}, logit_scale={scale:g}, loss_weight={self.loss_weight}, "
                f"reduction={self.reduction!r}")
