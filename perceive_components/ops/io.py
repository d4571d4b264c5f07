"""Reading and writing images as float tensors in [0, 1] (RGB, ``(3, H, W)``)."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from .checkpoint import atomic_write

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


def read_image(path: str | os.PathLike) -> torch.Tensor:
    """Load an image file as RGB float32 ``(3, H, W)`` in [0, 1]; raises ``ValueError`` if unreadable."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            array = np.asarray(image.convert("RGB"), dtype=np.uint8)
    except FileNotFoundError:
        raise
    except (UnidentifiedImageError, OSError, ValueError) as error:
        raise ValueError(f"cannot read image {str(path)!r}: {error}") from error
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(255.0)


def to_uint8(image: torch.Tensor) -> np.ndarray:
    """``(3, H, W)`` float in [0, 1] → ``(H, W, 3)`` uint8 (rounded, clamped)."""
    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"image must have shape (3, H, W), got {tuple(image.shape)}")
    return (image.detach().float().clamp(0, 1) * 255.0).round().byte().permute(1, 2, 0).cpu().numpy()


def write_image(path: str | os.PathLike, image: torch.Tensor) -> Path:
    """Save ``(3, H, W)`` in [0, 1] as an 8-bit file (format from the suffix), atomically."""
    from PIL import Image

    path = Path(path)
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        raise ValueError(f"unsupported image suffix {path.suffix!r} for {str(path)!r}; use one of {IMAGE_SUFFIXES}")
    with atomic_write(path) as tmp:
        Image.fromarray(to_uint8(image)).save(tmp, format=Image.registered_extensions()[path.suffix.lower()])
    return path


def list_images(folder: str | os.PathLike) -> list[Path]:
    """Image files under ``folder`` (recursive), sorted by relative path."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder {str(folder)!r} does not exist")
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
