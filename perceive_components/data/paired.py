"""One call for a training sample: paired crop, CFE positive view and the geometry to read aligned negatives.

``paired_crops(degraded, clean, size)`` takes the *whole* degraded image and its clean partner and returns
the anchor crop, the target crop (the same geometry), a positive view — another crop of the same degraded
image with its own flips, so the same degradation realisation (docs/method.md §2.3) — and the two
``CropFlip`` values. ``crop`` is what a render cache reads the aligned proxy negatives with.

Synthetic degradations must be made on the whole image *before* the call (crop-then-noise pipelines have no
positive view of the same realisation). For the authors' small-image rule, resize the clean image first
(``fit_image``) and degrade that: noise is not resized.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .crops import CropFlip
from .fitting import SMALL_IMAGE_RULES, fit_size


@dataclass(frozen=True)
class PairedCrops:
    """``degraded``, ``target``: ``(..., C, h, w)`` cut with ``crop``; ``positive``: ``(..., C, h, w)`` cut from
    the same degraded image with ``positive_crop`` (``None`` when not asked for)."""

    degraded: torch.Tensor
    target: torch.Tensor
    crop: CropFlip
    positive: torch.Tensor | None = None
    positive_crop: CropFlip | None = None


def _check_pair(degraded: object, clean: object) -> None:
    for name, value in (("degraded", degraded), ("clean", clean)):
        if not isinstance(value, torch.Tensor) or value.ndim not in (3, 4) or not value.is_floating_point():
            got = f"{value.dtype} {tuple(value.shape)}" if isinstance(value, torch.Tensor) else type(value).__name__
            raise ValueError(f"{name} must be a floating tensor (C, H, W) or (B, C, H, W) in [0, 1], got {got}")
    if degraded.shape != clean.shape:
        raise ValueError(f"degraded {tuple(degraded.shape)} and clean {tuple(clean.shape)} must have the same shape")


def draw_crop(image_size: tuple[int, int], size: int | tuple[int, int], *, small_image: str = "resize",
              flips: bool = True, rotations: bool = False, generator: torch.Generator | None = None) -> CropFlip:
    """A random ``CropFlip`` of ``size`` for a whole image of ``image_size`` (H, W), small images handled by
    ``small_image``: ``"resize"`` (the authors' rule, ``fit_size``) or a padding mode (the box starts at 0 on a
    side shorter than the crop). Draws top, left, then the flip coins, then the quarter turns."""
    if small_image not in SMALL_IMAGE_RULES:
        raise ValueError(f"small_image must be one of {list(SMALL_IMAGE_RULES)}, got {small_image!r}")
    crop = (size, size) if isinstance(size, int) else tuple(size)
    if min(crop) <= 0:
        raise ValueError(f"size must be positive, got {size!r}")
    image_size = tuple(int(v) for v in image_size)
    if small_image == "resize":
        frame = fit_size(image_size, crop)
        geometry = {"resize": frame if frame != image_size else None, "padding": None}
    else:
        frame = (max(image_size[0], crop[0]), max(image_size[1], crop[1]))
        geometry = {"resize": None, "padding": small_image}
    drawn = CropFlip.random(frame, crop, flips=flips, rotations=rotations, generator=generator)
    return CropFlip(drawn.top, drawn.left, drawn.height, drawn.width, drawn.hflip, drawn.vflip, drawn.rot90,
                    image_size=image_size, **geometry)


def paired_crops(degraded: torch.Tensor, clean: torch.Tensor, size: int | tuple[int, int], *,
                 generator: torch.Generator | None = None, positive: bool = True, flips: bool = True,
                 rotations: bool = False, small_image: str = "resize") -> PairedCrops:
    """Random paired crop of ``size`` from whole images ``degraded``, ``clean`` ``(C, H, W)`` or ``(B, C, H, W)``
    (a batch shares one geometry), plus a positive view of ``degraded``.

    Args:
        generator: the only source of randomness (a draw is a pure function of its seed).
        positive: also cut the CFE positive view (own box, own flips).
        flips: random horizontal and vertical flips (the authors'); ``rotations``: random quarter turns too.
        small_image: ``"resize"`` (default, Perceive-IR: bicubic upscale so the crop fits) or a padding mode
            ``"reflect"`` / ``"symmetric"`` / ``"edge"`` / ``"zeros"`` (``fitting`` module).
    """
    _check_pair(degraded, clean)
    image_size = tuple(degraded.shape[-2:])
    options = {"small_image": small_image, "flips": flips, "rotations": rotations, "generator": generator}
    crop = draw_crop(image_size, size, **options)
    result = {"degraded": crop.apply(degraded), "target": crop.apply(clean), "crop": crop}
    if positive:
        positive_crop = draw_crop(image_size, size, **options)
        result.update(positive=positive_crop.apply(degraded), positive_crop=positive_crop)
    return PairedCrops(**result)
