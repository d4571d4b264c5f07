"""The noisy test images of the paper's evaluation, bit for bit as the authors make them (docs/method.md §4).

Both protocols add Gaussian noise to the 8-bit clean image and **truncate** to uint8 (no rounding):

- ``"3task"`` (AdaIR's order): the clean images are first centre-cropped to multiples of 16 (``crop_to_multiple``);
  one ``numpy.random.RandomState(0)`` draws ``randn(H, W, 3)`` per image, over the sorted images at σ 15, then
  again over them at σ 25, then at σ 50: ``uint8(clip(x + σ·n, 0, 255))``.
- ``"5task"`` (σ 25 only in the paper's table): no crop; image ``i`` of the sorted list gets
  ``torch.randn(3, H, W, generator=Generator().manual_seed(3407 + i))``: ``uint8(clamp(255·(x/255) + σ·n, 0, 255))``
  in float32.

``write_noisy_test_sets`` writes them as lossless PNG (``<root>/CBSD68-sigma<σ>/{degraded,target}/<name>.png``, the
layout ``examples/evaluate.py`` reads), so the files hold exactly the authors' inputs.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..ops.io import IMAGE_SUFFIXES
from .crops import centre_crop_to_multiple

PROTOCOL_SIGMAS = {"3task": (15, 25, 50), "5task": (25,)}
FIVE_TASK_SEED = 3407


def crop_to_multiple(image: np.ndarray, base: int = 16) -> np.ndarray:
    """Centre-crop an ``(H, W, C)`` array to multiples of ``base`` (the box of ``centre_crop_to_multiple``)."""
    top, left, height, width = centre_crop_to_multiple(*image.shape[:2], base=base)
    return image[top: top + height, left: left + width]


def noisy_test_images(clean: Sequence[np.ndarray], protocol: str = "3task",
                      sigmas: Sequence[int] | None = None) -> dict[int, tuple[list[np.ndarray], list[np.ndarray]]]:
    """``{σ: (targets, noisy)}`` for ``clean`` uint8 ``(H, W, 3)`` images **in sorted order** (the order fixes the
    noise), as the authors' evaluation makes them; targets are the cropped clean images of the 3-task protocol."""
    if protocol not in PROTOCOL_SIGMAS:
        raise ValueError(f"protocol must be one of {list(PROTOCOL_SIGMAS)}, got {protocol!r}")
    sigmas = tuple(PROTOCOL_SIGMAS[protocol] if sigmas is None else sigmas)
    for index, image in enumerate(clean):
        if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            got = f"{image.dtype} {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
            raise ValueError(f"clean[{index}] must be a uint8 (H, W, 3) array, got {got}")
    result = {}
    if protocol == "3task":
        targets = [crop_to_multiple(image, 16) for image in clean]
        rng = np.random.RandomState(0)
        for sigma in sigmas:  # one generator, advanced σ after σ over the sorted images
            noisy = [np.clip(t + rng.randn(*t.shape) * sigma, 0, 255).astype(np.uint8) for t in targets]
            result[sigma] = (targets, noisy)
        return result
    for sigma in sigmas:
        noisy = []
        for index, image in enumerate(clean):
            generator = torch.Generator().manual_seed(FIVE_TASK_SEED + index)
            target = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().div_(255.0)
            n = torch.randn(target.shape, generator=generator)  # the float round trip x/255·255 is theirs too
            noisy.append((target * 255.0 + n * sigma).clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy())
        result[sigma] = (list(clean), noisy)
    return result


def write_noisy_test_sets(clean_dir: str | os.PathLike, root: str | os.PathLike, protocol: str = "3task",
                          sigmas: Sequence[int] | None = None, name: str = "CBSD68") -> list[Path]:
    """Read every image of ``clean_dir`` (sorted by file name), make ``noisy_test_images`` and write
    ``<root>/<name>-sigma<σ>/{degraded,target}/<stem>.png``; returns the set folders."""
    from PIL import Image

    paths = sorted(p for p in Path(clean_dir).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise FileNotFoundError(f"no images in {str(clean_dir)!r}")
    clean = []
    for path in paths:
        with Image.open(path) as image:
            clean.append(np.asarray(image.convert("RGB")))
    folders = []
    for sigma, (targets, noisy) in noisy_test_images(clean, protocol, sigmas).items():
        folder = Path(root) / f"{name}-sigma{sigma}"
        for kind, images in (("target", targets), ("degraded", noisy)):
            (folder / kind).mkdir(parents=True, exist_ok=True)
            for path, image in zip(paths, images):
                Image.fromarray(image).save(folder / kind / f"{path.stem}.png")
        folders.append(folder)
    return folders
