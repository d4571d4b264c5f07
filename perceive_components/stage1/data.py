"""Stage-1 data: image pairs for fold restorers and (low, medium, high) triplets for prompt training.

A *triplet dataset* is any ``Dataset`` whose items are dicts with ``low``, ``medium``, ``high`` (float
tensors ``(3, H, W)`` in [0, 1], all the same size) and optionally ``task`` (a string). Tier labels:
low = 0 (terrible), medium = 1 (mediocre), high = 2 (excellent).
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from ..ops.io import read_image
from ..ops.validation import check_values
from .manifest import read_jsonl

TRIPLET_KEYS = ("low", "medium", "high")


def check_image(value: object, name: str) -> torch.Tensor:
    """Validate one image ``(3, H, W)`` float in [0, 1]; raises ``TypeError``/``ValueError`` naming it."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor (3, H, W), got {type(value).__name__}")
    if not value.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor in [0, 1], got dtype {value.dtype}")
    if value.ndim != 3 or value.shape[0] != 3:
        raise ValueError(f"{name} must have shape (3, H, W), got {tuple(value.shape)}")
    if value.shape[1] == 0 or value.shape[2] == 0:
        raise ValueError(f"{name} has an empty spatial size {tuple(value.shape)}")
    check_values(value, name)
    return value


def check_triplet(item: object, index: int, name: str = "triplets") -> dict:
    """Validate ``triplets[index]``: a dict with same-size ``low``/``medium``/``high`` images."""
    if not isinstance(item, dict):
        raise TypeError(f"{name}[{index}] must be a dict with keys {TRIPLET_KEYS}, got {type(item).__name__}")
    missing = [key for key in TRIPLET_KEYS if key not in item]
    if missing:
        raise ValueError(f"{name}[{index}] is missing {missing}")
    for key in TRIPLET_KEYS:
        check_image(item[key], f"{name}[{index}]['{key}']")
    shapes = {key: tuple(item[key].shape) for key in TRIPLET_KEYS}
    if len(set(shapes.values())) != 1:
        raise ValueError(f"{name}[{index}]: low, medium and high must have the same size, got {shapes}")
    task = item.get("task", "all")
    if not isinstance(task, str):
        raise TypeError(f"{name}[{index}]['task'] must be a string, got {type(task).__name__}")
    return item


def dataset_tasks(triplets: Dataset) -> list[str]:
    """Task of every item, read from a ``tasks`` attribute when the dataset has one (no image loading)."""
    tasks = getattr(triplets, "tasks", None)
    if tasks is None:
        tasks = [triplets[i].get("task", "all") for i in range(len(triplets))]
    return [str(t) for t in tasks]


class TensorTriplets(Dataset):
    """In-memory triplets from three ``(N, 3, H, W)`` tensors and optional task names."""

    def __init__(self, low: torch.Tensor, medium: torch.Tensor, high: torch.Tensor,
                 tasks: Sequence[str] | None = None) -> None:
        if not (low.shape == medium.shape == high.shape) or low.ndim != 4:
            raise ValueError(
                f"low, medium, high must be (N, 3, H, W) of one shape, got {tuple(low.shape)}, "
                f"{tuple(medium.shape)}, {tuple(high.shape)}"
            )
        if tasks is not None and len(tasks) != len(low):
            raise ValueError(f"tasks has {len(tasks)} entries for {len(low)} triplets")
        self.low, self.medium, self.high = low, medium, high
        self.tasks = list(tasks) if tasks is not None else ["all"] * len(low)

    def __len__(self) -> int:
        return len(self.low)

    def __getitem__(self, index: int) -> dict:
        return {"low": self.low[index], "medium": self.medium[index], "high": self.high[index],
                "task": self.tasks[index]}


class TripletImages(Dataset):
    """Triplets listed in a manifest written by :func:`render_medium` (images read from disk).

    ``degraded``/``clean`` paths are relative to ``data_root``; ``medium`` paths to ``medium_root``
    (default: the manifest's folder). ``folds`` keeps only those folds; ``in_memory`` keeps decoded
    images after the first read (small data sets: no PNG decoding per step).
    """

    def __init__(self, manifest: str | os.PathLike, data_root: str | os.PathLike,
                 medium_root: str | os.PathLike | None = None, folds: Sequence[int] | None = None,
                 in_memory: bool = False) -> None:
        rows = read_jsonl(manifest, required=("degraded", "medium", "clean"))
        if folds is not None:
            rows = [row for row in rows if row.get("fold") in set(folds)]
        self.rows = rows
        self.data_root = Path(data_root)
        self.medium_root = Path(medium_root) if medium_root is not None else Path(manifest).parent
        self.tasks = [str(row.get("task", "all")) for row in rows]
        self._cache: dict[int, dict] | None = {} if in_memory else None

    def __len__(self) -> int:
        return len(self.rows)

    def fingerprint(self) -> str:
        """SHA-256 of the manifest rows in use: paths, tasks, folds and, in a manifest written by
        ``build_triplets``, the file hashes and the weights hash of each medium image's fold model."""
        rows = sorted(json.dumps(row, sort_keys=True) for row in self.rows)
        return hashlib.sha256("\n".join(rows).encode("utf-8")).hexdigest()

    def __getitem__(self, index: int) -> dict:
        if self._cache is not None and index in self._cache:
            return self._cache[index]
        row = self.rows[index]
        item = {
            "low": read_image(self.data_root / row["degraded"]),
            "medium": read_image(self.medium_root / row["medium"]),
            "high": read_image(self.data_root / row["clean"]),
            "task": self.tasks[index],
        }
        if self._cache is not None:
            self._cache[index] = item
        return item


class PairImages(Dataset):
    """(degraded, clean) pairs listed as manifest rows, for training fold restorers."""

    def __init__(self, rows: Sequence[dict], data_root: str | os.PathLike) -> None:
        self.rows, self.data_root = list(rows), Path(data_root)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict:
        row = self.rows[index]
        degraded, clean = read_image(self.data_root / row["degraded"]), read_image(self.data_root / row["clean"])
        if degraded.shape != clean.shape:
            raise ValueError(f"pair {row['degraded']} / {row['clean']} differ in size: "
                             f"{tuple(degraded.shape)} vs {tuple(clean.shape)}")
        return {"degraded": degraded, "clean": clean, "task": row.get("task", "all")}


def shared_crop(images: Sequence[torch.Tensor], size: int, generator: torch.Generator) -> list[torch.Tensor]:
    """One random ``size × size`` window and one random horizontal flip applied to every image.

    Images whose short side is below ``size`` are first upscaled (bicubic, aspect kept), as in docs/method.md §1.3.
    """
    height, width = images[0].shape[-2:]
    if min(height, width) < size:
        scale = size / min(height, width)
        new_size = (max(size, round(height * scale)), max(size, round(width * scale)))
        images = [F.interpolate(im[None], size=new_size, mode="bicubic", align_corners=False,
                                antialias=False)[0].clamp(0, 1) for im in images]
        height, width = new_size
    top = int(torch.randint(0, height - size + 1, (1,), generator=generator))
    left = int(torch.randint(0, width - size + 1, (1,), generator=generator))
    flip = bool(torch.rand((), generator=generator) < 0.5)
    out = [im[..., top : top + size, left : left + size] for im in images]
    return [im.flip(-1) for im in out] if flip else out
