"""CFE: compact feature extractor giving the degradation embedding Z (docs/method.md §2.3).

Code form (authors' code, default), input = the raw degraded image (B, 3, H, W), any H, W:

    h = GELU(Conv3×3_s2 3→32) → GELU(Conv3×3_s2 32→64) → GELU(Conv3×3_s2 64→96) → GELU(Conv3×3_s2 96→128)
    Z = normalize( Linear_{128→128}( GlobalAvgPool(h) ) )                       (B, 128), ‖Z‖₂ = 1

    parameters: 896 + 18,496 + 55,392 + 110,720 + 16,512 = 202,016

Figure form (``form="figure"``, our reading of the paper's figure): Conv3×3_s2 3→64 → ResBlock
[Conv3×3, LeakyReLU(0.1), Conv3×3] + skip → GlobalAvgPool → Linear 64→128 → LeakyReLU(0.1) → Linear 128→E
→ normalize. The stride-2 stem is ours (it keeps the cost near the code form's).

The contrastive loss L_cl needs a positive view: another random crop of the *same* degraded image with
its own flips (``make_positive_view``). Z is returned in at least float32 (also under autocast) because
the loss divides similarities by τ = 0.1.

Inputs: floating images in [0, 1] of any floating dtype (computed in the module's dtype: a float64 batch
runs through a float32 CFE); an integer tensor is a ``TypeError``. NaN/Inf or out-of-range values are a
``ValueError``. That value check adds no host sync inside an enclosing ``deferred_value_checks`` block (the
adapter's), and one, after the encoder's work is queued, for a call on its own; ``validate_inputs=False``
skips it, and it is skipped while ``torch.compile`` traces.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.validation import (
    as_parameter_dtype, check_choice, check_images, check_positive_int, compiling, deferred_value_checks,
)

CFE_FORMS = ("code", "figure")
CODE_WIDTHS = (32, 64, 96, 128)


class _ResBlock(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1), nn.LeakyReLU(0.1), nn.Conv2d(channels, channels, 3, padding=1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class CFE(nn.Module):
    """Degradation encoder ``images (B, 3, H, W) -> Z (B, embed_dim)``, L2-normalised.

    Z is float32 under bf16/fp16 autocast (float64 if the module is float64).

    Args:
        embed_dim: width of Z (128). form: ``"code"`` (default) or ``"figure"``.
        validate_inputs: check the images' values (finite, in [0, 1]); see the module docstring.
    """

    def __init__(self, embed_dim: int = 128, form: str = "code", validate_inputs: bool = True) -> None:
        super().__init__()
        self.embed_dim = check_positive_int(embed_dim, "embed_dim")
        self.validate_inputs = bool(validate_inputs)
        self.form = check_choice(form, "form", CFE_FORMS)
        if form == "code":
            layers: list[nn.Module] = []
            for c_in, c_out in zip((3,) + CODE_WIDTHS[:-1], CODE_WIDTHS):
                layers += [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1), nn.GELU()]
            self.encoder = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(1))
            self.projection = nn.Linear(CODE_WIDTHS[-1], embed_dim)
        else:
            self.encoder = nn.Sequential(
                nn.Conv2d(3, 64, 3, stride=2, padding=1), _ResBlock(64), nn.AdaptiveAvgPool2d(1), nn.Flatten(1)
            )
            self.projection = nn.Sequential(nn.Linear(64, 128), nn.LeakyReLU(0.1), nn.Linear(128, embed_dim))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """``images (B, 3, H, W)`` floating, in [0, 1] → ``Z (B, embed_dim)``, unit L2 norm."""
        if not self.validate_inputs or compiling():
            _check_layout(images)
            return self._embed(images)
        with deferred_value_checks():  # the value check is read once the encoder's work is queued
            check_images(images, "images")
            return self._embed(images)

    def _embed(self, images: torch.Tensor) -> torch.Tensor:
        z = self.projection(self.encoder(as_parameter_dtype(images, self)))
        return F.normalize(z.to(torch.promote_types(z.dtype, torch.float32)), dim=-1)


def _check_layout(images: object) -> None:
    """Rank, channels and a floating dtype: the checks that need no host sync."""
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must have shape (B, 3, H, W), got {getattr(images, 'shape', type(images))}")
    if not images.is_floating_point():
        raise TypeError(f"images must be a floating-point tensor with values in [0, 1], got dtype {images.dtype}"
                        " (convert uint8 images with .float() / 255)")


def make_positive_view(
    images: torch.Tensor | Sequence[torch.Tensor],
    crop_size: int | tuple[int, int],
    *,
    flips: bool = True,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """A positive view for L_cl: per image, a random ``crop_size`` window with its own random flips.

    Args:
        images: the *whole* degraded images (not the training crop), as ``(B, 3, H, W)``, ``(3, H, W)``
            or a list of ``(3, H_i, W_i)`` of different sizes. Crop from the same degraded tensor as the
            anchor so that, e.g., synthetic noise keeps its realisation.
        crop_size: ``s`` or ``(h, w)``; use the anchor crop's size so both views run as one CFE batch.
        flips: independent random horizontal and vertical flips (p = 0.5 each).
        generator: optional ``torch.Generator`` (CPU) for reproducible views.

    Returns:
        ``(B, 3, h, w)``, or ``(3, h, w)`` for a single ``(3, H, W)`` input.
    """
    single = isinstance(images, torch.Tensor) and images.ndim == 3
    batch = [images] if single else list(images)
    if not batch:
        raise ValueError("images is empty")
    size = (crop_size, crop_size) if isinstance(crop_size, int) else tuple(crop_size)
    if len(size) != 2:
        raise ValueError(f"crop_size must be an int or (h, w), got {crop_size!r}")
    crop_h, crop_w = (check_positive_int(v, "crop_size") for v in size)
    views = []
    for index, image in enumerate(batch):
        if not isinstance(image, torch.Tensor) or image.ndim != 3:
            raise ValueError(f"images[{index}] must be a (C, H, W) tensor, got {getattr(image, 'shape', type(image))}")
        height, width = image.shape[-2:]
        if crop_h > height or crop_w > width:
            raise ValueError(f"crop_size {(crop_h, crop_w)} exceeds images[{index}] size {(height, width)}")
        top = int(torch.randint(0, height - crop_h + 1, (1,), generator=generator))
        left = int(torch.randint(0, width - crop_w + 1, (1,), generator=generator))
        view = image[:, top : top + crop_h, left : left + crop_w]
        if flips:
            flip_h, flip_v = torch.rand(2, generator=generator).lt(0.5).tolist()
            dims = [d for d, flip in ((-1, flip_h), (-2, flip_v)) if flip]
            if dims:
                view = view.flip(dims)
        views.append(view)
    return views[0] if single else torch.stack(views)
