"""Medium-quality images by K-fold cross-validation (docs/method.md §1.2), for any restorer.

For each fold k a fresh restorer from ``factory()`` is trained with L1 on the pairs of the *other* folds
and renders the degraded images of fold k (whole images, tiled, reflect-padded to a multiple of 8,
clamped). No restorer ever sees the content it renders, so its output is a genuinely "medium" image.
Authors' recipe: a Restormer-style net, 128² crops, batch 4, AdamW lr 2e-4, cosine to 1e-6, bf16,
20,000 iterations; tiles of 512 with 32 overlap.

Everything is resumable: a fold restorer checkpoints while it trains, a finished one is saved
(safetensors) and reused, and images already rendered are skipped. The result is a triplet manifest (JSON
Lines, relative paths, task, fold, file hashes).

Reuse is by content, never by name (``fingerprints``): a fold model records the fingerprint of the pairs it
trained on, a medium image records its degraded file's hash and the weights of the model that rendered it,
and a stored result that does not match is refused with an error naming it — or replaced when asked
(``build_triplets(rebuild=True)``, ``render_medium(overwrite=True)``).
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

from ..ops.checkpoint import atomic_write, load_state, save_state, state_sha256
from ..ops.io import read_image, read_png_text, write_image
from ..ops.tiling import pad_to_multiple, tiled_apply
from ..ops.validation import check_positive_int
from .data import PairImages
from .fingerprints import file_sha256, rows_fingerprint, with_file_digests
from .folds import assign_folds
from .manifest import read_jsonl, write_jsonl

logger = logging.getLogger(__name__)

MEDIUM_KEY = "perceive-components:medium"  # PNG text chunk: what a medium image was rendered from
FOLD_KEY = "perceive-components:fold"  # safetensors metadata: what a fold model was trained on
REBUILD_HINT = "rebuild=True (perceive-ir stage1 render --rebuild) retrains and re-renders; or use a new output folder"


def _random_crops(pairs: PairImages, indices: list[int], size: int,
                  generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Aligned random crops of (degraded, clean) with random horizontal and vertical flips (as the authors)."""
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
        flips = torch.rand(2, generator=generator) < 0.5
        if flips[0]:
            both = both.flip(-1)
        if flips[1]:
            both = both.flip(-2)
        degraded.append(both[0])
        clean.append(both[1])
    return torch.stack(degraded), torch.stack(clean)


def sample_weights(tasks: Sequence[str], task_repeats: dict[str, float] | None) -> torch.Tensor:
    """Per-sample draw weights: the task's repeat factor (1 for tasks not named), e.g. rain 120 vs haze 1."""
    repeats = task_repeats or {}
    unknown = sorted(set(repeats) - set(tasks))
    if unknown:
        raise ValueError(f"task_repeats names tasks not in the data: {unknown} (tasks: {sorted(set(tasks))})")
    bad = {task: value for task, value in repeats.items() if not value > 0}
    if bad:
        raise ValueError(f"task_repeats must be positive, got {bad}")
    return torch.tensor([float(repeats.get(task, 1.0)) for task in tasks], dtype=torch.float64)


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
    task_repeats: dict[str, float] | None = None,
    checkpoint: str | os.PathLike | None = None,
    checkpoint_every: int = 1000,
    progress: bool = True,
) -> nn.Module:
    """Train ``factory()`` with L1 on random crops of ``pairs``; returns the model in eval mode.

    ``task_repeats`` weights how often each task's pairs are drawn (the authors repeat small sets such
    as Rain100L). With ``checkpoint=`` the model, optimiser, scheduler, sampler state and step are saved
    atomically every ``checkpoint_every`` steps and an interrupted run continues exactly where it stopped.
    """
    for value, name in ((steps, "steps"), (crop_size, "crop_size"), (batch_size, "batch_size"),
                        (checkpoint_every, "checkpoint_every")):
        check_positive_int(value, name)
    if len(pairs) == 0:
        raise ValueError("pairs is empty: a fold restorer needs training images from the other folds")
    weights = sample_weights([str(row.get("task", "all")) for row in pairs.rows], task_repeats)
    device = torch.device(device)
    torch.manual_seed(seed)
    model = factory().to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps, eta_min=min_lr)
    generator = torch.Generator().manual_seed(seed)
    signature = {"steps": steps, "crop_size": crop_size, "batch_size": batch_size, "lr": lr, "min_lr": min_lr,
                 "seed": seed, "pairs": len(pairs), "task_repeats": sorted((task_repeats or {}).items())}
    if checkpoint is not None:  # a checkpoint of the same settings on other images is not resumed
        signature["data"] = rows_fingerprint(with_file_digests(pairs.rows, pairs.data_root))
    start = 0
    if checkpoint is not None and Path(checkpoint).is_file():
        state = load_state(checkpoint)
        if state.get("signature") != signature:
            changed = sorted(key for key in set(signature) | set(state.get("signature", {}))
                             if signature.get(key) != state.get("signature", {}).get(key))
            raise ValueError(f"checkpoint {str(checkpoint)!r} belongs to another fold-restorer run (differs in "
                             f"{', '.join(changed)}; 'data' means other image contents); delete it or use the same "
                             "settings and images")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        generator.set_state(state["generator"])
        start = int(state["step"])
    bar = tqdm(range(start, steps), total=steps, initial=start, desc="fold restorer", disable=not progress,
               dynamic_ncols=True)
    for step in bar:
        indices = torch.multinomial(weights, batch_size, replacement=True, generator=generator).tolist()
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
        if checkpoint is not None and ((step + 1) % checkpoint_every == 0 or step + 1 == steps):
            save_state({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(), "generator": generator.get_state(),
                        "step": step + 1, "signature": signature}, checkpoint)
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

    Outputs go to ``out_dir/medium/<degraded path>`` as PNG, each with a text chunk recording its degraded
    file's SHA-256, the restorer's weights (``state_sha256``) and the render settings. An existing file is kept
    when its record matches; any that does not (other images, another model, other settings, or no record)
    is a ``ValueError`` listing them, raised before anything is rendered, unless ``overwrite`` (then every
    row is rendered again). Returned rows gain ``medium``, ``degraded_sha256`` and ``restorer_sha256``.
    """
    device = torch.device(device)
    restorer = restorer.to(device).eval()
    out_dir, data_root = Path(out_dir), Path(data_root)
    weights = state_sha256(restorer)
    render = {"tile": tile, "overlap": overlap, "multiple": multiple}
    triplets, stale = [], []
    for row in rows:
        medium = (Path("medium") / row["degraded"]).with_suffix(".png")
        record = {"degraded_sha256": file_sha256(data_root / row["degraded"]), "restorer_sha256": weights,
                  "render": render}
        target = out_dir / medium
        if not overwrite and target.is_file() and _medium_record(target) != record:
            stale.append(medium.as_posix())
        triplets.append(({**row, "medium": medium.as_posix(), "degraded_sha256": record["degraded_sha256"],
                          "restorer_sha256": weights}, target, record))
    if stale:
        raise ValueError(
            f"{out_dir} holds {len(stale)} medium image(s) rendered from other inputs (another degraded file, fold "
            f"model or render settings, or no record), e.g. {', '.join(stale[:3])}; overwrite=True re-renders "
            f"them, or use a new output folder")
    for row, target, record in tqdm(triplets, desc="render", disable=not progress, dynamic_ncols=True):
        if overwrite or not target.is_file():
            degraded = read_image(data_root / row["degraded"])[None].to(device)
            restored = tiled_apply(restorer, degraded, tile=tile, overlap=overlap, multiple=multiple,
                                   pad_mode="reflect")
            write_image(target, restored[0].clamp(0, 1).cpu(), text={MEDIUM_KEY: json.dumps(record, sort_keys=True)})
    return [row for row, _, _ in triplets]


def _medium_record(path: Path) -> dict | None:
    """What a stored medium image says it was rendered from (None without a readable record)."""
    try:
        return json.loads(read_png_text(path)[MEDIUM_KEY])
    except (KeyError, ValueError, OSError):
        return None


def _changed_files(out_dir: Path, rows: list[dict]) -> str:
    """Which pair files differ in content from the stored ``pairs.jsonl`` (for the error message)."""
    path = out_dir / "pairs.jsonl"
    stored = {row["degraded"]: row for row in read_jsonl(path)} if path.is_file() else {}
    changed = sorted({row[key] for row in rows if row["degraded"] in stored for key in ("degraded", "clean")
                      if stored[row["degraded"]].get(f"{key}_sha256") != row[f"{key}_sha256"]})
    if not changed:
        return "the image contents differ from those the fold models were trained on"
    return f"{len(changed)} image file(s) changed content, e.g. {', '.join(changed[:3])}"


def _check_settings(path: Path, settings: dict, rows: list[dict]) -> None:
    """Refuse to resume fold models that were trained on other data or with other settings."""
    if path.is_file():
        previous = json.loads(path.read_text(encoding="utf-8"))
        if previous != settings:
            changed = []
            for key in sorted(set(settings) | set(previous)):
                old, new = previous.get(key), settings.get(key)
                if key == "data":  # the same names with other contents (other names are listed as such)
                    if old != new and previous.get("pairs") == settings["pairs"]:
                        changed.append(f"data: {_changed_files(path.parent.parent, rows)}")
                elif isinstance(old, dict) and isinstance(new, dict):
                    changed += [f"{key}.{name}: {old.get(name)} -> {new.get(name)}"
                                for name in sorted(set(old) | set(new)) if old.get(name) != new.get(name)]
                elif old != new:
                    changed.append(f"{key} changed" if isinstance(new, list) else f"{key}: {old} -> {new}")
            raise ValueError(f"{path.parent} holds fold models trained with other settings ({'; '.join(changed)}); "
                             f"{REBUILD_HINT}")
        return
    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps(settings, indent=1), encoding="utf-8")


def _stored_fold_record(path: Path) -> str | None:
    """The training record in a fold model's safetensors metadata (None if absent or unreadable)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            return (handle.metadata() or {}).get(FOLD_KEY)
    except Exception:  # safetensors raises its own error type for a damaged file: treat it as unverifiable
        return None


def _check_stored_folds(out_dir: Path, rows: list[dict], records: list[str]) -> None:
    """Before any training: every stored fold model must match its record, and medium images may exist only
    for folds whose model is stored (otherwise nothing can vouch for them)."""
    problems = []
    for fold, record in enumerate(records):
        weights = out_dir / "folds" / f"fold{fold}.safetensors"
        if weights.is_file():
            if _stored_fold_record(weights) != record:
                problems.append(f"folds/{weights.name} was trained on other pairs or settings (or carries no record)")
        elif any((out_dir / "medium" / row["degraded"]).with_suffix(".png").is_file()
                 for row in rows if row["fold"] == fold):
            problems.append(f"medium images of fold {fold} exist but its model does not, so they cannot be verified")
    if problems:
        raise ValueError(f"{out_dir}: {'; '.join(problems)}; {REBUILD_HINT}")


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
    seed: int = 0,
    rebuild: bool = False,
    progress: bool = True,
) -> Path:
    """Whole K-fold pipeline: split, train K fold restorers, render, write ``out_dir/triplets.jsonl``.

    ``pairs`` are dicts with relative ``degraded``, ``clean`` and ``task`` (see ``manifest.scan_pairs``);
    folds come from the clean path. Every pair file is hashed (SHA-256, in ``pairs.jsonl``). Fold models are
    saved as ``out_dir/folds/fold<k>.safetensors`` with the fingerprint of their training pairs and settings
    and reused when it matches; a fold interrupted mid-training resumes from ``fold<k>.ckpt``; medium images
    are kept when their record (degraded file, fold model weights, render settings) matches.
    ``out_dir/folds/settings.json`` records the pairs, their content, K and the training settings. Anything
    stored that was made from other images or settings is refused with a ``ValueError`` naming it, before
    any training, unless ``rebuild=True``: then stored fold models and checkpoints are discarded, every fold
    model is trained again and every medium image rendered again.
    """
    from safetensors.torch import load_file, save_file

    check_positive_int(k, "k")
    if k < 2:
        raise ValueError("k must be at least 2: each fold is rendered by a model trained on the others")
    out_dir = Path(out_dir)
    rows = with_file_digests(assign_folds(list(pairs), k), data_root)
    train_kwargs = dict(train_kwargs or {})
    task_repeats = train_kwargs.pop("task_repeats", None) or {}
    sample_weights([str(row.get("task", "all")) for row in rows], task_repeats)  # validates against all pairs
    settings = {
        "k": k, "seed": seed, "pairs": sorted(row["degraded"] for row in rows), "data": rows_fingerprint(rows),
        "train": {key: str(value) for key, value in sorted({**train_kwargs, "task_repeats": task_repeats}.items())},
    }
    records = [json.dumps({"fold": fold, "k": k, "seed": seed, "train": settings["train"],
                           "train_data": rows_fingerprint([row for row in rows if row["fold"] != fold])},
                          sort_keys=True) for fold in range(k)]
    folds_dir = out_dir / "folds"
    if rebuild:
        for stale in (folds_dir / "settings.json", *folds_dir.glob("fold*.safetensors"), *folds_dir.glob("fold*.ckpt")):
            stale.unlink(missing_ok=True)
    _check_settings(folds_dir / "settings.json", settings, rows)
    if not rebuild:  # a rebuild re-renders every medium image
        _check_stored_folds(out_dir, rows, records)
    write_jsonl(out_dir / "pairs.jsonl", rows)
    triplets = []
    for fold in range(k):
        weights = folds_dir / f"fold{fold}.safetensors"
        if weights.is_file():
            model = factory()
            model.load_state_dict(load_file(str(weights)), strict=True)
            logger.info("fold %d: reusing %s", fold, weights)
        else:
            train_rows = [row for row in rows if row["fold"] != fold]
            present = {str(row.get("task", "all")) for row in train_rows}
            missing = sorted(set(task for task in (str(r.get("task", "all")) for r in rows)) - present)
            if missing:
                logger.warning("fold %d: the model never trains on %s (all of its images hash to fold %d)",
                               fold, missing, fold)
            resume = weights.with_suffix(".ckpt")
            model = train_fold_restorer(
                factory, PairImages(train_rows, data_root), device=device, seed=seed + fold, checkpoint=resume,
                progress=progress, task_repeats={t: v for t, v in task_repeats.items() if t in present},
                **train_kwargs)
            state = {name: t.detach().cpu().contiguous() for name, t in model.state_dict().items()}
            with atomic_write(weights) as tmp:
                save_file(state, str(tmp), metadata={FOLD_KEY: records[fold]})
            resume.unlink(missing_ok=True)  # the finished weights replace the mid-training state
        triplets += render_medium(model, [row for row in rows if row["fold"] == fold], data_root, out_dir,
                                  device=device, progress=progress, overwrite=rebuild, **(render_kwargs or {}))
    triplets.sort(key=lambda row: row["degraded"])
    return write_jsonl(out_dir / "triplets.jsonl", triplets)
