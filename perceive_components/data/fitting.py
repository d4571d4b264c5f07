"""Images smaller than the training crop: resize them up (the authors' rule) or pad them at the bottom/right.

Two families of rules, both applied to the *whole* image before the crop is cut:

- ``"resize"`` (default, Perceive-IR's ``PaperFiveDataset._paired_crop``): when a side is shorter than the crop,
  scale the image by s = max(crop_h / H, crop_w / W) (for square crops: crop / min(H, W)) to
  ``(max(crop_h, round(H·s)), max(crop_w, round(W·s)))`` with PIL's bicubic filter. The authors resize 8-bit
  PIL images; ``resize_bicubic_8bit`` does what PIL does to them (a horizontal pass, rounding to 8 bits, a
  vertical pass, rounding again), so on 8-bit inputs it gives PIL's pixels up to one grey level at rare
  pixels (PIL computes in fixed point).
- padding at the bottom/right, as BasicSR/Restormer and most restoration code do:

  ============== =========================== ==============================
  mode           NumPy ``np.pad`` mode       elsewhere
  ============== =========================== ==============================
  ``reflect``    ``reflect``                 torch ``F.pad(mode="reflect")``, cv2 ``BORDER_REFLECT_101``
  ``symmetric``  ``symmetric``               cv2 ``BORDER_REFLECT`` (BasicSR/Restormer ``padding``)
  ``edge``       ``edge``                    torch ``replicate``, cv2 ``BORDER_REPLICATE``
  ``zeros``      ``constant`` (0)            cv2 ``BORDER_CONSTANT``
  ============== =========================== ==============================

  Pads longer than the image repeat the reflection, exactly as NumPy does.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

PADDINGS = ("reflect", "symmetric", "edge", "zeros")
SMALL_IMAGE_RULES = ("resize", *PADDINGS)


def check_padding(padding: object, name: str = "padding") -> str:
    if padding not in PADDINGS:
        raise ValueError(f"{name} must be one of {list(PADDINGS)}, got {padding!r}")
    return padding


def _source_rows(size: int, length: int, mode: str) -> torch.Tensor:
    """Index into an axis of ``size`` pixels for each of ``length`` output positions (padding after the end).

    reflect:   period p = 2(n − 1), i ↦ j = i mod p, then p − j where j ≥ n   (a b c d | c b a b …)
    symmetric: period p = 2n,       i ↦ j = i mod p, then p − 1 − j where j ≥ n (a b c d | d c b a …)
    edge / zeros: i ↦ min(i, n − 1) (zeros are masked afterwards)
    """
    index = torch.arange(length)
    if mode == "reflect":
        if size == 1:
            return torch.zeros_like(index)
        period = 2 * (size - 1)
        index = index % period
        return torch.where(index >= size, period - index, index)
    if mode == "symmetric":
        period = 2 * size
        index = index % period
        return torch.where(index >= size, period - 1 - index, index)
    return index.clamp(max=size - 1)


def pad_to(image: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    """Pad ``image (..., H, W)`` at the bottom and right to ``size = (H', W')`` (each ≥ the image's) with ``mode``."""
    height, width = image.shape[-2:]
    out_h, out_w = size
    if (out_h, out_w) == (height, width):
        return image
    rows = _source_rows(height, out_h, mode).to(image.device)
    cols = _source_rows(width, out_w, mode).to(image.device)
    padded = image.index_select(-2, rows).index_select(-1, cols)
    if mode == "zeros":
        inside = (torch.arange(out_h, device=image.device) < height)[:, None] \
            & (torch.arange(out_w, device=image.device) < width)[None, :]
        padded = padded * inside.to(padded.dtype)
    return padded


def fit_size(image_size: tuple[int, int], crop_size: tuple[int, int]) -> tuple[int, int]:
    """The authors' resize rule: the size ``(H, W)`` is scaled up to hold a ``crop_size`` crop (unchanged if it
    already does). s = max(crop_h / H, crop_w / W); result ``(max(crop_h, round(H·s)), max(crop_w, round(W·s)))``."""
    height, width = image_size
    crop_h, crop_w = crop_size
    if height >= crop_h and width >= crop_w:
        return (height, width)
    scale = max(crop_h / height, crop_w / width)
    return (max(crop_h, round(height * scale)), max(crop_w, round(width * scale)))


def resize_bicubic_8bit(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bicubic resize of ``image (..., C, H, W)`` in [0, 1] to ``size = (H', W')`` as PIL resizes an 8-bit image.

    PIL's bicubic kernel (a = −0.5, the one torch uses with ``antialias=True``), first along the width, then
    along the height, rounding half up to the 8-bit grid and clamping after each pass. Computed in float64;
    returns the input's dtype.
    """
    height, width = image.shape[-2:]
    if (height, width) == tuple(size):
        return image
    flat = image.reshape(-1, *image.shape[-3:]).double() * 255.0

    def one_pass(values: torch.Tensor, out: tuple[int, int]) -> torch.Tensor:
        resized = F.interpolate(values, size=out, mode="bicubic", antialias=True, align_corners=False)
        return torch.floor(resized + 0.5).clamp_(0.0, 255.0)

    wide = one_pass(flat, (height, size[1]))
    resized = one_pass(wide, tuple(size)) / 255.0
    return resized.to(image.dtype).reshape(*image.shape[:-2], *size)


def fit_image(image: torch.Tensor, crop_size: int | tuple[int, int]) -> torch.Tensor:
    """``image (..., C, H, W)`` resized up by the authors' rule to hold a ``crop_size`` crop (``fit_size``).

    Use it on a *clean* image before synthesising noise on it, as the authors do (noise is not resized)."""
    crop = (crop_size, crop_size) if isinstance(crop_size, int) else tuple(crop_size)
    return resize_bicubic_8bit(image, fit_size(tuple(image.shape[-2:]), crop))
