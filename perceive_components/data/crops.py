"""Random crops and flips as explicit parameters, so they can be re-applied to other images.

A training sample records the crop box ``(y, x, h, w)`` and the flip flags ``(horizontal, vertical)``
it was cut with. ``CropFlip`` is that geometry as a value (box, flips, optional quarter turns) and the one
implementation of it: ``crop_flip(image, box, flip)`` applies it to the degraded image and its target
(padding small images), and a render cache applies the same ``CropFlip`` to a proxy's stored output of
the same degraded image, which is then aligned pixel for pixel with the training crop.

Order: pad (only if the box reaches past the image) → crop → horizontal flip → vertical flip.
Images smaller than the crop are padded at the bottom/right by reflection (replication where the
image is too small to reflect), so the same box gives the same pixels on any image of that size.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np
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


@dataclass(frozen=True)
class CropFlip:
    """A box (top, left, height, width) in the full image, then an optional horizontal flip, vertical flip
    and ``rot90`` quarter turns (counter-clockwise), in that order. A data set draws one per sample
    (``CropFlip.random``) and applies it to the degraded image, the ground truth and the proxy negatives
    read from the render cache, so all of them stay pixel-aligned. ``apply`` needs the box inside the image;
    ``crop_flip`` pads images smaller than the box first."""

    top: int
    left: int
    height: int
    width: int
    hflip: bool = False
    vflip: bool = False
    rot90: int = 0

    def __post_init__(self) -> None:
        if min(self.top, self.left) < 0 or min(self.height, self.width) <= 0:
            raise ValueError("crop box must be (top >= 0, left >= 0, height > 0, width > 0), got "
                             f"{(self.top, self.left, self.height, self.width)}")
        if self.rot90 not in (0, 1, 2, 3):
            raise ValueError(f"rot90 must be 0, 1, 2 or 3 quarter turns, got {self.rot90!r}")

    @classmethod
    def full(cls, height: int, width: int) -> "CropFlip":
        """The whole image, unflipped."""
        return cls(0, 0, height, width)

    @classmethod
    def random(cls, image_size: tuple[int, int], crop_size: int | tuple[int, int], *, flips: bool = True,
               rotations: bool = False, generator: torch.Generator | None = None) -> "CropFlip":
        """A uniformly random box of ``crop_size`` inside ``image_size`` (H, W), with random flips/turns."""
        height, width = image_size
        crop_h, crop_w = (crop_size, crop_size) if isinstance(crop_size, int) else crop_size
        if crop_h > height or crop_w > width:
            raise ValueError(f"crop_size {crop_h}×{crop_w} does not fit in an image of {height}×{width}")

        def draw(high: int) -> int:
            return int(torch.randint(0, high, (), generator=generator))

        return cls(draw(height - crop_h + 1), draw(width - crop_w + 1), crop_h, crop_w,
                   hflip=flips and bool(draw(2)), vflip=flips and bool(draw(2)), rot90=draw(4) if rotations else 0)

    def check(self, image_size: tuple[int, int], name: str = "image") -> None:
        """Raise ``ValueError`` unless the box lies inside an image of ``image_size`` (H, W)."""
        height, width = image_size
        if self.top + self.height > height or self.left + self.width > width:
            raise ValueError(f"crop {self.top}:{self.top + self.height} × {self.left}:{self.left + self.width} "
                             f"does not fit in {name} of size {height}×{width}")

    def crop_array(self, array: np.ndarray) -> np.ndarray:
        """Crop an ``(H, W, C)`` array (a memory map reads only the box)."""
        self.check(array.shape[:2])
        return array[self.top : self.top + self.height, self.left : self.left + self.width]

    def transform(self, image: torch.Tensor) -> torch.Tensor:
        """Flips and quarter turns of an already cropped ``(..., C, h, w)`` tensor."""
        if self.hflip:
            image = image.flip(-1)
        if self.vflip:
            image = image.flip(-2)
        return torch.rot90(image, self.rot90, dims=(-2, -1)) if self.rot90 else image

    def apply(self, image: torch.Tensor) -> torch.Tensor:
        """Crop, then flip/turn, a ``(..., C, H, W)`` tensor."""
        self.check(tuple(image.shape[-2:]))
        box = image[..., self.top : self.top + self.height, self.left : self.left + self.width]
        return self.transform(box)

    def output_size(self) -> tuple[int, int]:
        """(h, w) after the quarter turns."""
        return (self.width, self.height) if self.rot90 % 2 else (self.height, self.width)

    def as_dict(self) -> dict:
        return asdict(self)


def crop_flip(image: torch.Tensor, box: Sequence[int] | torch.Tensor, flip: Sequence[bool] | torch.Tensor) -> torch.Tensor:
    """Cut ``box = (y, x, h, w)`` out of ``image (..., C, H, W)`` and apply ``flip = (horizontal, vertical)``.

    Returns ``(..., C, h, w)``. Works on one image or a batch (the same box for all).
    """
    if image.ndim < 3:
        raise ValueError(f"image must have shape (..., C, H, W), got {tuple(image.shape)}")
    y, x, h, w = (int(v) for v in box)
    horizontal, vertical = (bool(v) for v in flip)
    crop = CropFlip(y, x, h, w, hflip=horizontal, vflip=vertical)  # validates the box
    height, width = image.shape[-2:]
    pad_h, pad_w = max(0, y + h - height), max(0, x + w - width)
    if pad_h or pad_w:
        mode = "reflect" if pad_h < height and pad_w < width else "replicate"
        flat = image.reshape(-1, *image.shape[-3:])
        image = F.pad(flat, (0, pad_w, 0, pad_h), mode=mode).reshape(*image.shape[:-2], height + pad_h, width + pad_w)
    return crop.apply(image).contiguous()
