"""Perceiver audit on triplets (docs/method.md §1.3): does it order degraded < medium < clean?

Per triplet the three images are brought to a common size (top-left crop to the smallest, bicubic
upscale if the short side is below the CLIP input size S) and scored on ``views``: ``"five"`` S×S crops
(four corners + centre, logits averaged — the authors' protocol), ``"center"`` (one crop) or ``"whole"``
(the perceiver's own resize of the full image). Metrics:

- accuracy:  fraction of the 3N images whose argmax tier is their true tier (also per tier);
- strict:    fraction of triplets with all three images right;
- monotonic: fraction of triplets with q(I_d) < q(I_m) < q(I_g), q = Σ c·p_c;
and the same per task, with task macro/minimum, and the authors' pass gate: task-macro accuracy ≥ 0.85,
minimum task accuracy ≥ 0.75, task-macro strict ≥ 0.70, overall monotonic ≥ 0.90, minimum task
monotonic ≥ 0.80.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from ..ops.validation import check_choice
from .data import check_triplet

GATES = {
    "task_macro_accuracy": 0.85,
    "task_min_accuracy": 0.75,
    "task_macro_strict": 0.70,
    "monotonic": 0.90,
    "task_min_monotonic": 0.80,
}
VIEWS = ("five", "center", "whole")


def _views(images: list[torch.Tensor], size: tuple[int, int], views: str) -> torch.Tensor:
    """``(3 · V, 3, S, S)`` crops of the three same-size images (or the images themselves for 'whole')."""
    batch = torch.stack(images)
    if views == "whole":
        return batch
    height, width = batch.shape[-2:]
    crop_h, crop_w = size
    if height < crop_h or width < crop_w:
        scale = max(crop_h / height, crop_w / width)
        batch = F.interpolate(batch, size=(max(crop_h, round(height * scale)), max(crop_w, round(width * scale))),
                              mode="bicubic", align_corners=False).clamp(0, 1)
        height, width = batch.shape[-2:]
    bottom, right = height - crop_h, width - crop_w
    corners = [(bottom // 2, right // 2)]
    if views == "five":
        corners = [(0, 0), (0, right), (bottom, 0), (bottom, right)] + corners
    crops = [batch[..., y : y + crop_h, x : x + crop_w] for y, x in corners]
    return torch.stack(crops, dim=1).flatten(0, 1)  # image-major: (3, V) → 3·V


def _metrics(records: list[dict]) -> dict[str, Any]:
    n = len(records)
    correct = torch.tensor([r["correct"] for r in records], dtype=torch.float64)  # (n, 3)
    return {
        "n_triplets": n,
        "accuracy": float(correct.mean()),
        "accuracy_per_tier": [float(v) for v in correct.mean(0)],
        "strict": float(correct.all(1).double().mean()),
        "monotonic": float(sum(r["monotonic"] for r in records) / n),
        "mean_q": [float(v) for v in torch.tensor([r["q"] for r in records]).mean(0)],
    }


@torch.no_grad()
def audit_perceiver(
    perceiver,
    triplets: Dataset,
    *,
    views: str = "five",
    device: str | torch.device | None = None,
    record: bool = True,
    progress: bool = False,
) -> dict[str, Any]:
    """Audit ``perceiver`` on a triplet dataset; returns overall metrics, ``per_task`` and ``gate``.

    With ``record=True`` the result (without per-triplet details) is stored on ``perceiver.audit_metrics``
    and so ends up in the config and model card written by ``save_pretrained``.
    """
    check_choice(views, "views", VIEWS)
    if len(perceiver.tier_words) != 3:
        raise ValueError(f"perceiver: triplet audits need 3 tiers, this one has {list(perceiver.tier_words)}")
    if len(triplets) == 0:
        raise ValueError("triplets is empty")
    device = torch.device(device) if device is not None else perceiver.prompt_learner.ctx.device
    perceiver.to(device).eval()
    records = []
    for index in tqdm(range(len(triplets)), desc="audit", disable=not progress):
        item = check_triplet(triplets[index], index)
        images = [item["low"], item["medium"], item["high"]]
        batch = _views([im.float() for im in images], perceiver.image_size, views).to(device)
        logits = perceiver(batch)
        logits = logits.view(3, -1, logits.shape[-1]).mean(1)  # average the views of each image
        probs = logits.softmax(-1)
        q = (probs @ perceiver.tier_values).tolist()
        predictions = probs.argmax(-1).tolist()
        records.append({
            "task": str(item.get("task", "all")),
            "correct": [p == t for t, p in enumerate(predictions)],
            "monotonic": q[0] < q[1] < q[2],
            "q": q,
            "probabilities": probs.tolist(),
        })
    result = _metrics(records)
    by_task: dict[str, list[dict]] = defaultdict(list)
    for row in records:
        by_task[row["task"]].append(row)
    per_task = {task: _metrics(rows) for task, rows in sorted(by_task.items())}
    result["per_task"] = per_task
    macro = {key: sum(m[key] for m in per_task.values()) / len(per_task) for key in ("accuracy", "strict", "monotonic")}
    minimum = {key: min(m[key] for m in per_task.values()) for key in ("accuracy", "monotonic")}
    values = {
        "task_macro_accuracy": macro["accuracy"], "task_min_accuracy": minimum["accuracy"],
        "task_macro_strict": macro["strict"], "monotonic": result["monotonic"],
        "task_min_monotonic": minimum["monotonic"],
    }
    result["gate"] = {"passed": all(values[k] >= v for k, v in GATES.items()),
                      **{k: {"value": values[k], "threshold": v} for k, v in GATES.items()}}
    result["views"] = views
    if record:
        perceiver.audit_metrics = dict(result)
    return result
