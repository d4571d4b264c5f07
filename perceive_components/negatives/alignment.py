"""The geometry of a training crop, applied identically to the input, the target and cached negatives.

A ``CropFlip`` records a box (top, left, height, width) in the full image, then an optional horizontal
flip, vertical flip and ``rot90`` quarter turns (counter-clockwise), in that order. A data set draws one
per sample (``CropFlip.random``) and applies it to the degraded image, the ground truth and the proxy
negatives read from the render cache, so all of them stay pixel-aligned.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class CropFlip:
    top: int
    left: int
    height: int
    width: int
    hflip: bool = False
    vflip: bool = False
    rot90: int = 0

    def __post_init__(self) -> None:
        if min(self.top, self.left) < 0 or min(self.height, self.width) <= 0:
            raise ValueError(f"crop box must have top, left >= 0 and height, width > 0, got {self}")
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
