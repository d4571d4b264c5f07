"""Synthetic stage-1 data for tests: smooth random scenes with mild and heavy degradations."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from perceive_components.data.degradations import degrade
from perceive_components.ops.io import write_image
from perceive_components.stage1 import TensorTriplets


def smooth_images(n: int, size: int, generator: torch.Generator) -> torch.Tensor:
    coarse = torch.rand(n, 3, 6, 6, generator=generator)
    return F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False).clamp(0, 1)


def synthetic_triplets(n: int, seed: int, size: int = 32, tasks=("haze", "lowlight"),
                       mild: float = 0.35, heavy: float = 0.9) -> TensorTriplets:
    """clean / mildly degraded / heavily degraded triplets, tasks in rotation."""
    generator = torch.Generator().manual_seed(seed)
    clean = smooth_images(n, size, generator)
    low, medium, names = [], [], []
    for index in range(n):
        task = tasks[index % len(tasks)]
        low.append(degrade(clean[index : index + 1], task, heavy, generator))
        medium.append(degrade(clean[index : index + 1], task, mild, generator))
        names.append(task)
    return TensorTriplets(torch.cat(low), torch.cat(medium), clean, names)


def write_pair_folder(root, n_per_task: int = 4, size: int = 24, tasks=("noise", "haze"), seed: int = 0) -> None:
    """``root/<task>/{degraded,clean}/img<i>.png`` with synthetic degradations."""
    generator = torch.Generator().manual_seed(seed)
    for task in tasks:
        clean = smooth_images(n_per_task, size, generator)
        degraded = degrade(clean, task, 0.6, generator)
        for index in range(n_per_task):
            write_image(root / task / "clean" / f"img{index}.png", clean[index])
            write_image(root / task / "degraded" / f"img{index}.png", degraded[index])
