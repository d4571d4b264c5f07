"""Sanity gates on medium images, per task (docs/method.md §1.2): are the three tiers well separated?

For each triplet:  improved = PSNR(I_m, I_g) > PSNR(I_d, I_g)
                   r        = 1 − MSE(I_m, I_g) / MSE(I_d, I_g)    (progress from degraded to clean)
The authors ask for improved ≥ 90% of images and r mostly in [0.25, 0.85] (medium sits roughly halfway);
"mostly" is taken here as at least half the triplets (``min_in_band``).
"""
from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch
from torch.utils.data import Dataset

from .data import check_triplet

BAND = (0.25, 0.85)


def _summary(rows: list[dict], band: tuple[float, float], min_improved: float, min_in_band: float) -> dict[str, Any]:
    r = torch.tensor([row["r"] for row in rows], dtype=torch.float64)
    improved = sum(row["improved"] for row in rows) / len(rows)
    in_band = float(((r >= band[0]) & (r <= band[1])).double().mean())
    quantiles = torch.quantile(r, torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)).tolist()
    return {
        "n": len(rows), "psnr_improved_rate": improved, "r_in_band_rate": in_band,
        "r_p10": quantiles[0], "r_median": quantiles[1], "r_p90": quantiles[2],
        "mean_psnr_gain_db": sum(row["gain_db"] for row in rows) / len(rows),
        "passed": improved >= min_improved and in_band >= min_in_band,
    }


@torch.no_grad()
def medium_gates(
    triplets: Dataset,
    *,
    band: tuple[float, float] = BAND,
    min_improved: float = 0.90,
    min_in_band: float = 0.50,
) -> dict[str, Any]:
    """Per-task and overall PSNR-improved rate and progress-r distribution of the medium images."""
    rows, skipped = [], 0
    for index in range(len(triplets)):
        item = check_triplet(triplets[index], index)
        low, medium, high = (item[k].double() for k in ("low", "medium", "high"))
        mse_low, mse_medium = (low - high).pow(2).mean(), (medium - high).pow(2).mean()
        if mse_low == 0:  # an undegraded input has no progress to measure
            skipped += 1
            continue
        gain = 10 * torch.log10(mse_low / mse_medium.clamp_min(1e-12))
        rows.append({"task": str(item.get("task", "all")), "improved": bool(mse_medium < mse_low),
                     "r": float(1 - mse_medium / mse_low), "gain_db": float(gain)})
    if not rows:
        raise ValueError("no triplet with a degraded image different from its clean image")
    by_task: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        by_task[row["task"]].append(row)
    per_task = {task: _summary(task_rows, band, min_improved, min_in_band) for task, task_rows in sorted(by_task.items())}
    return {"overall": _summary(rows, band, min_improved, min_in_band), "per_task": per_task,
            "skipped_identical": skipped, "band": list(band)}
