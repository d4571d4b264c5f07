"""Reading and writing images as float tensors in [0, 1] (RGB, ``(3, H, W)``).

``read_image`` returns what a photo viewer shows, at the file's full precision:

=============================================  ==============================================================
file                                           values
=============================================  ==============================================================
8-bit grey / RGB (``1``, ``L``, ``RGB``)       v / 255; grey is repeated into the three channels
16-bit grey (``I;16``: PNG, TIFF)              v / 65535
16-bit RGB / RGBA / grey+alpha (PNG)           v / 65535 (Pillow alone keeps only the high byte of each value)
palette (``P``, ``PA``)                        the palette colours; a ``tRNS`` transparency becomes alpha
CMYK, YCbCr, other colour spaces               Pillow's conversion to RGB (no ICC profile): (1 − C)(1 − K) …
alpha (``LA``, ``RGBA``, transparency keys)    composited over white: rgb · a + (1 − a)
EXIF orientation                               applied (``ImageOps.exif_transpose``), as a viewer does
32-bit integer / float (``I``, ``F``)          ``ValueError``: such files have no fixed value range
=============================================  ==============================================================

Alpha policy: the colour stored under a transparent pixel is undefined (encoders often keep black or
leftovers there), so dropping alpha would feed arbitrary values to training. Compositing over white gives
every pixel a defined colour, the one a viewer shows on a white page; a fully opaque alpha channel (the
usual case: photos saved as RGBA) changes nothing.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Mapping

import numpy as np
import torch

from .checkpoint import atomic_write

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
_WIDE_COLOUR_RAWMODES = {f"{mode};16{order}" for mode in ("RGB", "RGBA") for order in "BLN"}
_GREY_ALPHA_16 = "LA;16B"  # 16-bit grey + alpha PNG: Pillow opens it as 8-bit RGBA
_EIGHT_BIT_MODES = {"L": "L", "LA": "LA", "RGB": "RGB", "RGBA": "RGBA", "1": "L", "La": "LA", "RGBa": "RGBA",
                    "PA": "RGBA"}  # anything else (CMYK, YCbCr, LAB, HSV, RGBX) converts to RGB


def read_image(path: str | os.PathLike) -> torch.Tensor:
    """Load an image file as RGB float32 ``(3, H, W)`` in [0, 1] (see the module docstring for each kind).

    Raises ``FileNotFoundError`` for a missing file and ``ValueError`` naming the file for anything that
    cannot be decoded (not an image, truncated, corrupt, unsupported mode).
    """
    from PIL import Image

    try:
        with Image.open(path) as image:
            values = _decode(image, path)
    except (FileNotFoundError, MemoryError):
        raise
    except Exception as error:  # Pillow's decoders raise OSError, SyntaxError, zlib/struct errors, ...
        raise ValueError(f"cannot read image {str(path)!r}: {error}") from error
    return torch.from_numpy(_composite_over_white(values).astype(np.float32)).permute(2, 0, 1).contiguous()


def _rawmode(tile) -> str:
    return tile.args[0] if isinstance(tile.args, tuple) else tile.args


def _with_rawmode(tile, rawmode: str):
    args = (rawmode, *tile.args[1:]) if isinstance(tile.args, tuple) else rawmode
    return tile._replace(args=args)


def _other_byte_order(rawmode: str) -> str:
    order = rawmode[-1] if rawmode[-1] != "N" else ("L" if sys.byteorder == "little" else "B")
    return rawmode[:-1] + ("B" if order == "L" else "L")


def _oriented(image) -> np.ndarray:
    from PIL import ImageOps

    return np.asarray(ImageOps.exif_transpose(image), dtype=np.float64)


def _decode(image, path: str | os.PathLike) -> np.ndarray:
    """``(H, W, C)`` float64 in [0, 1], orientation applied; C = 1 grey, 2 grey+alpha, 3 RGB, 4 RGBA."""
    from PIL import Image

    rawmodes = {_rawmode(tile) for tile in image.tile}
    if rawmodes and rawmodes <= _WIDE_COLOUR_RAWMODES:
        # Pillow unpacks 16-bit colour to its high bytes. The same decode with the opposite byte order
        # yields the low bytes (the un-filtering does not depend on the byte order): v = 256·high + low.
        high = _oriented(image)
        with Image.open(path) as again:
            again.tile = [_with_rawmode(tile, _other_byte_order(_rawmode(tile))) for tile in again.tile]
            low = _oriented(again)
        return (high * 256.0 + low) / 65535.0
    if rawmodes == {_GREY_ALPHA_16}:  # read the four bytes of each pixel as they are: L_hi, L_lo, A_hi, A_lo
        image.tile = [_with_rawmode(tile, "RGBA") for tile in image.tile]
        raw = _oriented(image)
        return np.stack([raw[..., 0] * 256 + raw[..., 1], raw[..., 2] * 256 + raw[..., 3]], axis=-1) / 65535.0

    transparency = image.info.get("transparency")
    mode = image.mode
    if mode.startswith("I;16") or (mode == "I" and rawmodes and all(r.startswith("I;16") for r in rawmodes)):
        grey = _oriented(image)[..., None]
        if isinstance(transparency, int):  # one grey level marked transparent
            return np.concatenate([grey / 65535.0, (grey != transparency).astype(np.float64)], axis=-1)
        return grey / 65535.0
    if mode in ("I", "F"):
        raise ValueError(f"mode {mode!r} (32-bit integer or float pixels) has no fixed value range; "
                         "save the image as 8- or 16-bit")
    if mode == "P":
        target = "RGBA" if transparency is not None else "RGB"
    elif transparency is not None and mode in ("L", "RGB"):  # a transparent colour key
        target = "RGBA"
    else:
        target = _EIGHT_BIT_MODES.get(mode, "RGB")
    values = _oriented(image if mode == target else image.convert(target))
    return (values if values.ndim == 3 else values[..., None]) / 255.0


def _composite_over_white(values: np.ndarray) -> np.ndarray:
    """``(H, W, 1|2|3|4)`` → ``(H, W, 3)``: grey repeated, alpha a composited over white (rgb·a + 1 − a)."""
    channels = values.shape[-1]
    if channels in (2, 4):
        alpha = values[..., -1:]
        values = values[..., :-1] * alpha + (1.0 - alpha)
    return np.repeat(values, 3, axis=-1) if values.shape[-1] == 1 else values


def to_uint8(image: torch.Tensor) -> np.ndarray:
    """``(3, H, W)`` float in [0, 1] → ``(H, W, 3)`` uint8 (rounded, clamped)."""
    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"image must have shape (3, H, W), got {tuple(image.shape)}")
    return (image.detach().float().clamp(0, 1) * 255.0).round().byte().permute(1, 2, 0).cpu().numpy()


def write_image(path: str | os.PathLike, image: torch.Tensor, *, text: Mapping[str, str] | None = None) -> Path:
    """Save ``(3, H, W)`` in [0, 1] as an 8-bit file (format from the suffix), atomically.

    ``text``: PNG text chunks (``tEXt``) to store with the pixels, e.g. where the image came from
    (read back with ``read_png_text``); PNG only.
    """
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    path = Path(path)
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        raise ValueError(f"unsupported image suffix {path.suffix!r} for {str(path)!r}; use one of {IMAGE_SUFFIXES}")
    options = {}
    if text:
        if path.suffix.lower() != ".png":
            raise ValueError(f"text metadata needs a .png file, got {str(path)!r}")
        options["pnginfo"] = PngInfo()
        for key, value in text.items():
            options["pnginfo"].add_text(key, value)
    with atomic_write(path) as tmp:
        Image.fromarray(to_uint8(image)).save(tmp, format=Image.registered_extensions()[path.suffix.lower()],
                                              **options)
    return path


def read_png_text(path: str | os.PathLike) -> dict[str, str]:
    """The text chunks stored before a PNG's pixels (as ``write_image`` writes them), read without decoding
    the pixels; ``{}`` for a file without any."""
    from PIL import Image

    with Image.open(path) as image:
        return {key: value for key, value in image.info.items() if isinstance(value, str)}


def list_images(folder: str | os.PathLike) -> list[Path]:
    """Image files under ``folder`` (recursive), sorted by relative path."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder {str(folder)!r} does not exist")
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
