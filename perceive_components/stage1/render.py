"""Medium-quality images by K-fold cross-validation (SPEC.md §1.2), for any restorer.

For each fold k a fresh restorer from ``factory()`` is trained with L1 on the pairs of the *other* folds
and renders the degraded images of fold k (whole images, tiled, reflect-padded to a multiple of 8,
clamped). No restorer ever sees the content it renders, so its output is a genuinely "medium" image.
Authors' recipe: a Restormer-style net, 128² crops, batch 4, AdamW lr 2e-4, cosine to 1e-6, bf16,
20,000 iterations; tiles of 512 with 32 overlap.

Everything is resumable: a finished fold model is saved (safetensors) and reused, and images already
rendered are skipped. The result is a triplet manifest (JSON Lines, relative paths, task, fold).
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..ops.checkpoint import atomic_write
from ..ops.io import read_image, write_image
from ..ops.tiling import pad_to_multiple, tiled_apply
from ..ops.validation import check_positive_int
from .data import PairImages
from .folds import assign_folds
from .manifest import write_jsonl

logger = logging.getLogger(__name__)


def _random_crops(pairs: PairImages, indices: list[int], size: int,
                  generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    degraded, clean = [], []
    for index in indices:
        item = pairs[index]
        both = torch.stack([item["degraded"], item["clean"]])
        if min(both.shape[-2:]) < size:  # small images: reflect-pad up to the crop
            both, _ = pad_to_multiple(both, size, "reflect")
        height, width = both.shape[-2:]
        top = int(torch.randint(0, height - size + 1, (1,), generator=generator))
        left = int(torch.randint(0, width - size + 1, (1,), generator=generator))
        both = both[..., top : top + size, left : left + size]
        if torch.rand((), generator=generator) < 0.5:
            both = both.flip(-1)
        degraded.append(both[0])
        clean.append(both[1])
    return torch.stack(degraded), torch.stack(clean)


def train_fold_restorer(
    factory: Callable[[], nn.Module],
    pairs: PairImages,
    *,
    steps: int = 20_000,
    crop_size: int = 128,
    batch_size: int = 4,
    lr: float = 2e-4,
    min_lr: float = 1e-6,
    amp_dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    seed: int = 0,
    progress: bool = True,
) -> nn.Module:
    """Train ``factory()`` with L1 on random crops of ``pairs``; returns the model in eval mode."""
    for value, name in ((steps, "steps"), (crop_size, "crop_size"), (batch_size, "batch_size")):
        check_positive_int(value, name)
    if len(pairs) == 0:
        raise ValueError("pairs is empty: a fold restorer needs training images from the other folds")
    device = torch.device(device)
    torch.manual_seed(seed)
    model = factory().to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps, eta_min=min_lr)
    generator = torch.Generator().manual_seed(seed)
    bar = tqdm(range(steps), desc="fold restorer", disable=not progress, dynamic_ncols=True)
    for _ in bar:
        indices = torch.randint(0, len(pairs), (batch_size,), generator=generator).tolist()
        degraded, clean = _random_crops(pairs, indices, crop_size, generator)
        degraded, clean = degraded.to(device), clean.to(device)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            restored = model(degraded)
        loss = F.l1_loss(restored.float(), clean)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        bar.set_postfix(l1=f"{float(loss.detach()):.4f}")
    return model.eval()


@torch.no_grad()
def render_medium(
    restorer: nn.Module,
    rows: Sequence[dict],
    data_root: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    tile: int | None = 512,
    overlap: int = 32,
    multiple: int = 8,
    device: str | torch.device = "cpu",
    overwrite: bool = False,
    progress: bool = True,
) -> list[dict]:
    """Render ``rows`` (pair dicts) through ``restorer``; returns triplet rows with a ``medium`` path.

    Outputs go to ``out_dir/medium/<degraded path>`` as PNG; existing files are kept unless ``overwrite``.
    """
    device = torch.device(device)
    restorer = restorer.to(device).eval()
    out_dir, data_root = Path(out_dir), Path(data_root)
    triplets = []
    for row in tqdm(rows, desc="render", disable=not progress, dynamic_ncols=True):
        medium = (Path("medium") / row["degraded"]).with_suffix(".png")
        target = out_dir / medium
        if overwrite or not target.is_file():
            degraded = read_image(data_root / row["degraded"])[None].to(device)
            restored = tiled_apply(restorer, degraded, tile=tile, overlap=overlap, multiple=multiple,
                                   pad_mode="reflect")
            write_image(target, restored[0].clamp(0, 1).cpu())
        triplets.append({**row, "medium": medium.as_posix()})
    return triplets


def _check_settings(path: Path, settings: dict) -> None:
    """Refuse to resume fold models that were trained on other data or with other settings."""
    if path.is_file():
        previous = json.loads(path.read_text(encoding="utf-8"))
        if previous != settings:
            changed = sorted(key for key in settings if previous.get(key) != settings[key])
            raise ValueError(
                f"{path.parent} holds fold models trained with other settings ({', '.join(changed)} changed); "
                "use a new output folder, or delete that folder to retrain"
            )
        return
    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps(settings, indent=1), encoding="utf-8")


def build_triplets(
    factory: Callable[[], nn.Module],
    pairs: Sequence[dict],
    data_root: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    k: int = 2,
    train_kwargs: dict | None = None,
    render_kwargs: dict | None = None,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> Path:
    """Whole K-fold pipeline: split, train K fold restorers, render, write ``out_dir/triplets.jsonl``.

    ``pairs`` are dicts with relative ``degraded``, ``clean`` and ``task`` (see ``manifest.scan_pairs``);
    folds come from the clean path. Fold models are saved as ``out_dir/folds/fold<k>.safetensors`` and
    reused when present (resume); ``out_dir/folds/settings.json`` records the pairs, K and training
    settings, and a run with different ones is refused instead of silently reusing stale models.
    """
    from safetensors.torch import load_file, save_file

    check_positive_int(k, "k")
    if k < 2:
        raise ValueError("k must be at least 2: each fold is rendered by a model trained on the others")
    out_dir = Path(out_dir)
    rows = assign_folds(list(pairs), k)
    _check_settings(out_dir / "folds" / "settings.json", {
        "k": k, "pairs": sorted(row["degraded"] for row in rows),
        "train": {key: str(value) for key, value in sorted((train_kwargs or {}).items())},
    })
    write_jsonl(out_dir / "pairs.jsonl", rows)
    triplets = []
    for fold in range(k):
        weights = out_dir / "folds" / f"fold{fold}.safetensors"
        if weights.is_file():
            model = factory()
            model.load_state_dict(load_file(str(weights)), strict=True)
            logger.info("fold %d: reusing %s", fold, weights)
        else:
            train_rows = [row for row in rows if row["fold"] != fold]
            model = train_fold_restorer(factory, PairImages(train_rows, data_root), device=device,
                                        seed=fold, progress=progress, **(train_kwargs or {}))
            state = {name: t.detach().cpu().contiguous() for name, t in model.state_dict().items()}
            with atomic_write(weights) as tmp:
                save_file(state, str(tmp))
        triplets += render_medium(model, [row for row in rows if row["fold"] == fold], data_root, out_dir,
                                  device=device, progress=progress, **(render_kwargs or {}))
    triplets.sort(key=lambda row: row["degraded"])
    return write_jsonl(out_dir / "triplets.jsonl", triplets)
