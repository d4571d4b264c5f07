"""Periodic validation: whole images, fp32, PSNR/SSIM on the clamped float output (docs/method.md §4), grids.

Each validation set is split across processes (image ``i`` goes to rank ``i mod W``); the per-image
sums are all-reduced, so every process gets the same per-set means. Images are replicate-padded to a
multiple of ``pad_multiple`` for the model and cropped back. Rank 0 saves the first ``num_grids``
images of each set as ``grids/step_XXXXXXXX/<set>_<i>.png``: degraded | restored | ground truth.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Mapping

import torch
from torch import nn
from torch.utils.data import Dataset

from perceive_components.ops.io import write_image
from perceive_components.ops.metrics import psnr, ssim
from perceive_components.ops.tiling import pad_to_multiple

from .distributed import DistEnv

PredictFn = Callable[[nn.Module, torch.Tensor], torch.Tensor]


def default_predict(model: nn.Module, degraded: torch.Tensor) -> torch.Tensor:
    """``model(degraded)``: the restored batch ``(B, 3, H, W)``."""
    return model(degraded)


def grid_row(degraded: torch.Tensor, restored: torch.Tensor, target: torch.Tensor, gap: int = 4) -> torch.Tensor:
    """``(3, H, 3W + 2·gap)``: degraded | restored | ground truth, separated by white gaps."""
    spacer = torch.ones(3, degraded.shape[-2], gap, dtype=degraded.dtype, device=degraded.device)
    return torch.cat([degraded, spacer, restored, spacer, target], dim=-1)


@torch.no_grad()
def validate(model: nn.Module, val_sets: Mapping[str, Dataset], env: DistEnv, *, predict: PredictFn = default_predict,
             pad_multiple: int = 8, max_images: int = 0, num_grids: int = 0, grid_dir: Path | None = None,
             ) -> dict[str, float]:
    """Per-set ``<set>/psnr`` and ``<set>/ssim`` means plus ``avg/psnr`` and ``avg/ssim`` over sets."""
    was_training = model.training
    model.eval()
    results: dict[str, float] = {}
    for name, dataset in val_sets.items():
        count = len(dataset) if max_images <= 0 else min(max_images, len(dataset))
        sums = torch.zeros(3, dtype=torch.float64)  # psnr, ssim, images
        for index in range(env.rank, count, env.world_size):
            item = dataset[index]
            degraded = item["degraded"][None].to(env.device)
            target = item["target"][None].to(env.device)
            padded, (height, width) = pad_to_multiple(degraded, pad_multiple, mode="replicate")
            restored = predict(model, padded).float()[..., :height, :width].clamp(0, 1)
            sums += torch.tensor([psnr(restored, target).item(), ssim(restored, target).item(), 1.0],
                                 dtype=torch.float64)
            if env.is_main and grid_dir is not None and index < num_grids * env.world_size:
                write_image(grid_dir / f"{name}_{index}.png", grid_row(degraded[0], restored[0], target[0]).cpu())
        sums = env.all_reduce_sum(sums.to(env.device)).cpu()
        results[f"{name}/psnr"] = float(sums[0] / sums[2])
        results[f"{name}/ssim"] = float(sums[1] / sums[2])
    if val_sets:
        names = list(val_sets)
        results["avg/psnr"] = sum(results[f"{n}/psnr"] for n in names) / len(names)
        results["avg/ssim"] = sum(results[f"{n}/ssim"] for n in names) / len(names)
    model.train(was_training)
    return results
