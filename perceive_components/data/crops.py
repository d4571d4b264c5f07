"""Random crops and flips as explicit parameters, so they can be re-applied to other images.

A training sample records the crop box ``(y, x, h, w)`` and the flip flags ``(horizontal, vertical)``
it was cut with. ``crop_flip(image, box, flip)`` is the one function that applies them: the dataset
uses it on the degraded image and its target, and a render cache uses it on a proxy's stored output
of the same degraded image, which is then aligned pixel for pixel with the training crop.

Order: pad (only if the box reaches past the image) → crop → horizontal flip → vertical flip.
Images smaller than the crop are padded at the bottom/right by reflection (replication where the
image is too small to reflect), so the same box gives the same pixels on any image of that size.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

Box = tuple[int, int, int, int]
Flip = tuple[bool, bool]


def _randint(high: int, generator: torch.Generator | None) -> int:
    """Uniform integer in [0, high)."""
    return int(torch.randint(high, (1,), generator=generator).item())


def random_box(height: int, width: int, size: int, generator: torch.Generator | None = None) -> Box:
    """A uniformly placed ``size × size`` box ``(y, x, size, size)`` in an image of ``height × width``.

    If the image is smaller than ``size`` along an axis, the box starts at 0 on that axis (the image is
    padded by ``crop_flip``).
    """
    if size <= 0:
        raise ValueError(f"size must be a positive integer, got {size!r}")
    y = _randint(height - size + 1, generator) if height > size else 0
    x = _randint(width - size + 1, generator) if width > size else 0
    return (y, x, size, size)


def random_flip(generator: torch.Generator | None = None, enabled: bool = True) -> Flip:
    """Independent fair coin flips ``(horizontal, vertical)``; ``(False, False)`` when disabled."""
    if not enabled:
        return (False, False)
    coins = torch.randint(2, (2,), generator=generator).tolist()
    return (bool(coins[0]), bool(coins[1]))


def crop_flip(image: torch.Tensor, box: Sequence[int] | torch.Tensor, flip: Sequence[bool] | torch.Tensor) -> torch.Tensor:
    """Cut ``box = (y, x, h, w)`` out of ``image (..., C, H, W)`` and apply ``flip = (horizontal, vertical)``.

    Returns ``(..., C, h, w)``. Works on one image or a batch (the same box for all).
    """
    if image.ndim < 3:
        raise ValueError(f"image must have shape (..., C, H, W), got {tuple(image.shape)}")
    y, x, h, w = (int(v) for v in box)
    if min(y, x) < 0 or min(h, w) <= 0:
        raise ValueError(f"box must be (y >= 0, x >= 0, h > 0, w > 0), got {(y, x, h, w)}")
    height, width = image.shape[-2:]
    pad_h, pad_w = max(0, y + h - height), max(0, x + w - width)
    if pad_h or pad_w:
        mode = "reflect" if pad_h < height and pad_w < width else "replicate"
        flat = image.reshape(-1, *image.shape[-3:])
        image = F.pad(flat, (0, pad_w, 0, pad_h), mode=mode).reshape(*image.shape[:-2], height + pad_h, width + pad_w)
    out = image[..., y : y + h, x : x + w]
    horizontal, vertical = (bool(v) for v in flip)
    if horizontal:
        out = out.flip(-1)
    if vertical:
        out = out.flip(-2)
    return out.contiguous()
