"""The geometry of a training crop as a value, so that it can be re-applied to other images.

``CropFlip`` records everything that turns a whole image into a training crop: an optional resize of the
whole image (images smaller than the crop, the authors' rule) or a padding mode, the crop box, then a
horizontal flip, a vertical flip and ``rot90`` counter-clockwise quarter turns. A data set applies one to
the degraded image and its target; a render cache applies the same value to a proxy's stored output of
the same degraded image, which is then aligned pixel for pixel with the training crop.

Order of ``apply``: check the image size → resize → pad (bottom/right, only as far as the box reaches) →
crop → horizontal flip → vertical flip → quarter turns.

The field's augmentation conventions map onto it exactly (``from_dihedral_mode``, ``from_basicsr``;
``centre_crop_to_multiple`` for PromptIR's ``crop_img`` offset); ``tests/test_crops.py`` checks each mapping
against the upstream NumPy operations.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np
import torch

from .fitting import PADDINGS, check_padding, pad_to, resize_bicubic_8bit

Box = tuple[int, int, int, int]
_NO_VALUE = -1  # tensor encoding of a field that is None
ENCODED_LENGTH = 12


def _pair(value: Sequence[int] | None, name: str) -> tuple[int, int] | None:
    if value is None:
        return None
    pair = tuple(int(v) for v in value)
    if len(pair) != 2 or min(pair) <= 0:
        raise ValueError(f"{name} must be (height, width) with positive sides, got {value!r}")
    return pair


@dataclass(frozen=True)
class CropFlip:
    """Box ``(top, left, height, width)``, flips, quarter turns, and how the whole image is prepared.

    Attributes:
        hflip, vflip: flip left-right (``np.fliplr``), then top-bottom (``np.flipud``).
        rot90: counter-clockwise quarter turns after the flips (``np.rot90`` / ``torch.rot90`` on (H, W)).
        padding: ``None`` (the box must lie inside the image) or one of ``PADDINGS``: the box may reach past the
            bottom/right edge and the image is padded that way (``fitting.pad_to``).
        resize: ``(H', W')`` the whole image is resized to first (``fitting.resize_bicubic_8bit``), or ``None``.
        image_size: ``(H, W)`` of the whole image this geometry was drawn for; ``apply`` refuses another size
            (e.g. a stale render-cache entry). ``None``: not checked.
    """

    top: int
    left: int
    height: int
    width: int
    hflip: bool = False
    vflip: bool = False
    rot90: int = 0
    padding: str | None = None
    resize: tuple[int, int] | None = None
    image_size: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        if min(self.top, self.left) < 0 or min(self.height, self.width) <= 0:
            raise ValueError("crop box must be (top >= 0, left >= 0, height > 0, width > 0), got "
                             f"{(self.top, self.left, self.height, self.width)}")
        if self.rot90 not in (0, 1, 2, 3):
            raise ValueError(f"rot90 must be 0, 1, 2 or 3 quarter turns, got {self.rot90!r}")
        if self.padding is not None:
            check_padding(self.padding)
        object.__setattr__(self, "resize", _pair(self.resize, "resize"))
        object.__setattr__(self, "image_size", _pair(self.image_size, "image_size"))

    # ------------------------------------------------------------------ constructors
    @classmethod
    def full(cls, height: int, width: int) -> "CropFlip":
        """The whole image, unflipped."""
        return cls(0, 0, height, width, image_size=(height, width))

    @classmethod
    def random(cls, image_size: tuple[int, int], crop_size: int | tuple[int, int], *, flips: bool = True,
               rotations: bool = False, generator: torch.Generator | None = None) -> "CropFlip":
        """A uniformly random box of ``crop_size`` inside ``image_size`` (H, W), with random flips/turns.

        Draws, in order: top, left, then (if ``flips``) horizontal and vertical coins, then (if ``rotations``)
        the quarter turns. Images smaller than the crop: use ``paired_crops``, which resizes or pads them."""
        height, width = (int(v) for v in image_size)
        crop_h, crop_w = (crop_size, crop_size) if isinstance(crop_size, int) else crop_size
        if crop_h > height or crop_w > width:
            raise ValueError(f"crop_size {crop_h}×{crop_w} does not fit in an image of {height}×{width}")

        def draw(high: int) -> int:
            return int(torch.randint(0, high, (), generator=generator))

        top, left = draw(height - crop_h + 1), draw(width - crop_w + 1)
        hflip, vflip = (bool(draw(2)), bool(draw(2))) if flips else (False, False)
        return cls(top, left, crop_h, crop_w, hflip, vflip, draw(4) if rotations else 0, image_size=(height, width))

    @classmethod
    def from_dihedral_mode(cls, box: Sequence[int], mode: int, **geometry) -> "CropFlip":
        """The crop ``box`` followed by ``data_augmentation(patch, mode)`` of AirNet, PromptIR, AdaIR, MoCE-IR and
        Restormer (mode 0..7; their ``random_augmentation`` draws ``randint(1, 7)``, Restormer's ``randint(0, 7)``).

        Upstream, mode m turns the patch by k = m // 2 counter-clockwise quarter turns (``np.rot90(patch, k)``)
        and then, for odd m, flips it top-bottom (``np.flipud``). Since flipud ∘ rot_k = rot_{−k} ∘ flipud, that
        is: ``vflip = m odd``, ``rot90 = (−k) mod 4`` for odd m and ``k`` for even m. ``geometry``: the other
        fields (``padding``, ``resize``, ``image_size``)."""
        if isinstance(mode, bool) or int(mode) != mode or not 0 <= mode <= 7:
            raise ValueError(f"mode must be an integer 0..7 (data_augmentation's mode), got {mode!r}")
        turns, flipud = int(mode) // 2, bool(mode % 2)
        return cls(*(int(v) for v in box), hflip=False, vflip=flipud, rot90=(-turns) % 4 if flipud else turns,
                   **geometry)

    @classmethod
    def from_basicsr(cls, box: Sequence[int], hflip: bool, vflip: bool, rot90: bool, **geometry) -> "CropFlip":
        """The crop ``box`` followed by BasicSR's ``augment(imgs, hflip, rotation, return_status=True)`` status
        ``(hflip, vflip, rot90)``: ``cv2.flip(img, 1)``, ``cv2.flip(img, 0)``, then ``img.transpose(1, 0, 2)``.

        BasicSR's "rot90" is a transpose, not a quarter turn: transpose = rot_3 ∘ flipud (flip top-bottom, then
        three counter-clockwise turns), so after the two flags it adds one more vertical flip and three turns.
        ``geometry``: the other fields (``padding``, ``resize``, ``image_size``)."""
        hflip, vflip, transpose = bool(hflip), bool(vflip), bool(rot90)
        return cls(*(int(v) for v in box), hflip=hflip, vflip=vflip != transpose, rot90=3 if transpose else 0,
                   **geometry)

    # ------------------------------------------------------------------ applying
    def frame_size(self, image_size: tuple[int, int]) -> tuple[int, int]:
        """(H, W) of the image the box is cut from: after the resize, before the padding."""
        return self.resize if self.resize is not None else tuple(image_size)

    def check(self, image_size: tuple[int, int], name: str = "image") -> None:
        """Raise ``ValueError`` unless this geometry can be applied to an image of ``image_size`` (H, W)."""
        image_size = tuple(int(v) for v in image_size)
        if self.image_size is not None and image_size != self.image_size:
            raise ValueError(f"{name} has size {image_size[0]}×{image_size[1]} but this crop was drawn for an image "
                             f"of {self.image_size[0]}×{self.image_size[1]} (a stale render or another image)")
        height, width = self.frame_size(image_size)
        bottom, right = self.top + self.height, self.left + self.width
        if self.padding is None and (bottom > height or right > width):
            raise ValueError(f"crop {self.top}:{bottom} × {self.left}:{right} does not fit in {name} of size "
                             f"{height}×{width} (set padding= to pad images smaller than the crop)")
        if self.top >= height or self.left >= width:
            raise ValueError(f"crop {self.top}:{bottom} × {self.left}:{right} starts outside {name} of size "
                             f"{height}×{width}")

    def inside(self, image_size: tuple[int, int]) -> bool:
        """True when the box lies inside an unresized image of ``image_size``: a plain slice, no resize or pad."""
        fits = self.top + self.height <= image_size[0] and self.left + self.width <= image_size[1]
        return self.resize is None and fits

    def crop_array(self, array: np.ndarray) -> np.ndarray:
        """Crop an ``(H, W, C)`` array (a memory map reads only the box); needs ``inside(array.shape[:2])``."""
        self.check(array.shape[:2])
        if not self.inside(array.shape[:2]):
            raise ValueError("crop_array cuts plain boxes only; use apply() for a crop that resizes or pads")
        return array[self.top : self.top + self.height, self.left : self.left + self.width]

    def transform(self, image: torch.Tensor) -> torch.Tensor:
        """Flips and quarter turns of an already cropped ``(..., C, h, w)`` tensor."""
        if self.hflip:
            image = image.flip(-1)
        if self.vflip:
            image = image.flip(-2)
        return torch.rot90(image, self.rot90, dims=(-2, -1)) if self.rot90 else image

    def apply(self, image: torch.Tensor) -> torch.Tensor:
        """Resize, pad, crop, then flip/turn a ``(..., C, H, W)`` tensor; returns ``(..., C, h, w)``."""
        if image.ndim < 3:
            raise ValueError(f"image must have shape (..., C, H, W), got {tuple(image.shape)}")
        self.check(tuple(image.shape[-2:]))
        if self.resize is not None:
            image = resize_bicubic_8bit(image, self.resize)
        height, width = image.shape[-2:]
        bottom, right = self.top + self.height, self.left + self.width
        if bottom > height or right > width:
            image = pad_to(image, (max(height, bottom), max(width, right)), self.padding)
        return self.transform(image[..., self.top : bottom, self.left : right]).contiguous()

    def output_size(self) -> tuple[int, int]:
        """(h, w) after the quarter turns."""
        return (self.width, self.height) if self.rot90 % 2 else (self.height, self.width)

    # ------------------------------------------------------------------ as data
    def as_dict(self) -> dict:
        return asdict(self)

    def as_tensor(self) -> torch.Tensor:
        """int64 ``(12,)``: top, left, height, width, hflip, vflip, rot90, padding (index in ``PADDINGS``),
        resize H', W', image H, W (−1 for ``None``). ``default_collate`` stacks it to ``(B, 12)``."""
        resize = self.resize or (_NO_VALUE, _NO_VALUE)
        size = self.image_size or (_NO_VALUE, _NO_VALUE)
        padding = _NO_VALUE if self.padding is None else PADDINGS.index(self.padding)
        return torch.tensor([self.top, self.left, self.height, self.width, int(self.hflip), int(self.vflip),
                             self.rot90, padding, *resize, *size], dtype=torch.int64)

    @classmethod
    def from_tensor(cls, encoded: torch.Tensor) -> "CropFlip | list[CropFlip]":
        """Inverse of ``as_tensor``: ``(12,)`` → one ``CropFlip``; ``(B, 12)`` (a collated batch) → a list."""
        if not isinstance(encoded, torch.Tensor) or encoded.shape[-1:] != (ENCODED_LENGTH,) or encoded.ndim > 2 \
                or encoded.is_floating_point():
            shape = tuple(encoded.shape) if isinstance(encoded, torch.Tensor) else type(encoded).__name__
            raise ValueError(f"encoded crop must be an integer tensor of shape (12,) or (B, 12) from "
                             f"CropFlip.as_tensor(), got {shape}")
        if encoded.ndim == 2:
            return [cls.from_tensor(row) for row in encoded]
        top, left, height, width, hflip, vflip, rot90, padding, *sizes = (int(v) for v in encoded.tolist())
        resize, image_size = tuple(sizes[:2]), tuple(sizes[2:])
        return cls(top, left, height, width, bool(hflip), bool(vflip), rot90,
                   None if padding == _NO_VALUE else PADDINGS[padding],
                   None if resize[0] == _NO_VALUE else resize, None if image_size[0] == _NO_VALUE else image_size)


def centre_crop_to_multiple(height: int, width: int, base: int = 64) -> Box:
    """The box ``(top, left, h, w)`` that PromptIR / AirNet / AdaIR's ``crop_img(image, base)`` keeps: each side
    cut down to a multiple of ``base``, removing r = side mod base pixels, ⌊r/2⌋ of them at the top/left (so an
    odd r drops one more at the bottom/right). Add its ``top``/``left`` to the random crop drawn inside it."""
    if base <= 0:
        raise ValueError(f"base must be a positive integer, got {base!r}")
    cut_h, cut_w = height % base, width % base
    if cut_h == height or cut_w == width:
        raise ValueError(f"an image of {height}×{width} has no side of a multiple of base={base} to keep")
    return (cut_h // 2, cut_w // 2, height - cut_h, width - cut_w)


def crop_flip(image: torch.Tensor, box: Sequence[int] | torch.Tensor, flip: Sequence[bool] | torch.Tensor,
              padding: str = "reflect") -> torch.Tensor:
    """Cut ``box = (y, x, h, w)`` out of ``image (..., C, H, W)`` and apply ``flip = (horizontal, vertical)``;
    a box past the bottom/right edge pads the image with ``padding``. Shorthand for ``CropFlip(...).apply``."""
    y, x, h, w = (int(v) for v in box)
    horizontal, vertical = (bool(v) for v in flip)
    return CropFlip(y, x, h, w, hflip=horizontal, vflip=vertical, padding=padding).apply(image)
