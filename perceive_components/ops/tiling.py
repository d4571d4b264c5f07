"""Whole-image inference for any restorer: pad to a multiple, or tile with overlap and blend.

Memory stays bounded by one tile batch: tiles of ``tile × tile`` (stride ``tile − overlap``) run through
the model ``tile_batch`` at a time and are blended with weights that are zero in a margin of
``overlap // 4`` at each inner tile edge and ramp linearly across the rest of the overlap, so seams
vanish and a model whose receptive field fits in the margin gives exactly its whole-image result. Images no larger than a tile run whole (after padding to ``multiple``).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from .validation import check_positive_int


def pad_to_multiple(images: torch.Tensor, multiple: int, mode: str = "reflect") -> tuple[torch.Tensor, tuple[int, int]]:
    """Pad bottom/right to a multiple of ``multiple``; returns the padded batch and the original (H, W).

    ``mode`` is ``'reflect'`` (docs/method.md §1.2, stage-1 rendering) or ``'replicate'`` (docs/method.md §4, evaluation);
    reflect falls back to replicate where the image is too small to reflect.
    """
    height, width = images.shape[-2:]
    pad_h, pad_w = (-height) % multiple, (-width) % multiple
    if pad_h or pad_w:
        if mode == "reflect" and (pad_h >= height or pad_w >= width):
            mode = "replicate"
        images = F.pad(images, (0, pad_w, 0, pad_h), mode=mode)
    return images, (height, width)


def _starts(length: int, tile: int, stride: int) -> list[int]:
    if length <= tile:
        return [0]
    starts = list(range(0, length - tile, stride))
    return starts + [length - tile]


def _ramp(length: int, overlap: int, at_start: bool, at_end: bool, device, dtype) -> torch.Tensor:
    """Blend weights along one tile axis: 0 in a margin of overlap/4 at each inner edge, then a linear rise.

    A pixel only takes weight from tiles where it lies at least ``overlap // 4`` pixels from an inner
    tile edge, so a model whose receptive-field radius fits in that margin is reproduced exactly.
    """
    ramp = torch.ones(length, device=device, dtype=dtype)
    if overlap > 0:
        margin = overlap // 4
        rise = ((torch.arange(overlap, device=device, dtype=dtype) - margin + 0.5) / (overlap - 2 * margin)).clamp(0, 1)
        if not at_start:
            ramp[:overlap] = rise
        if not at_end:
            ramp[-overlap:] = torch.minimum(ramp[-overlap:], rise.flip(0))
    return ramp


@torch.no_grad()
def tiled_apply(
    model: Callable[[torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    *,
    tile: int | None = 512,
    overlap: int = 32,
    multiple: int = 8,
    pad_mode: str = "reflect",
    tile_batch: int = 1,
    out_device: torch.device | str | None = None,
) -> torch.Tensor:
    """Run an image-to-image ``model`` over ``images (B, C, H, W)`` and return ``(B, C_out, H, W)``.

    ``tile=None`` runs each image whole. Outputs are assembled on ``out_device`` (default: the input's
    device), so a large image can stay on the CPU while tiles run on the GPU.
    """
    check_positive_int(multiple, "multiple")
    out_device = images.device if out_device is None else torch.device(out_device)
    padded, (height, width) = pad_to_multiple(images, multiple, pad_mode)
    full_h, full_w = padded.shape[-2:]
    if tile is None or (full_h <= tile and full_w <= tile):
        return model(padded)[..., :height, :width].to(out_device)
    check_positive_int(tile, "tile")
    if tile % multiple:
        raise ValueError(f"tile={tile} must be a multiple of multiple={multiple}")
    if not 0 <= overlap < tile:
        raise ValueError(f"overlap must be in [0, tile), got overlap={overlap}, tile={tile}")
    tile_h, tile_w = min(tile, full_h), min(tile, full_w)
    stride_h, stride_w = max(tile_h - overlap, 1), max(tile_w - overlap, 1)
    boxes = [(y, x) for y in _starts(full_h, tile_h, stride_h) for x in _starts(full_w, tile_w, stride_w)]

    output = weight = None
    for first in range(0, len(boxes), tile_batch):
        chunk = boxes[first : first + tile_batch]
        crops = torch.cat([padded[..., y : y + tile_h, x : x + tile_w] for y, x in chunk])
        results = model(crops).to(out_device).float()
        if output is None:
            output = torch.zeros(padded.shape[0], results.shape[1], full_h, full_w, device=out_device)
            weight = torch.zeros(1, 1, full_h, full_w, device=out_device)
        for index, (y, x) in enumerate(chunk):
            ramp_h = _ramp(tile_h, overlap, y == 0, y + tile_h == full_h, out_device, torch.float32)
            ramp_w = _ramp(tile_w, overlap, x == 0, x + tile_w == full_w, out_device, torch.float32)
            mask = ramp_h[:, None] * ramp_w[None, :]
            part = results[index * padded.shape[0] : (index + 1) * padded.shape[0]]
            output[..., y : y + tile_h, x : x + tile_w] += part * mask
            weight[..., y : y + tile_h, x : x + tile_w] += mask
    return (output / weight)[..., :height, :width].to(images.dtype)
