"""Stage-2 data: proxy negatives read from a render cache, aligned with each training crop; probe crops.

**Cache keys.** A training item's ``path`` (relative to ``<data>/train``) names the whole degraded image
it was cut from; a render cache (``perceive_components.negatives.RenderCache``) holds each proxy's output of
that image under the same key. Synthetic noise has no file: with a fixed ``noise_seed`` every (image, σ)
has one realisation, which ``examples/prepare_proxy_inputs.py`` writes losslessly as PNG (``cache_key``:
``noise/sigma25/x.png`` stays, ``noise/sigma25/x.jpg`` becomes ``noise/sigma25/x.jpg.png``) so that
``perceive-ir cache render`` can render it.

**Alignment.** An item records its crop geometry (``crop``: ``CropFlip.as_tensor()``), resize or padding of
images smaller than the crop included; the cache reads the negatives with that same ``CropFlip`` (for ``npy``
caches a box inside the image is read alone from disk).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Sequence

import torch
from torch.utils.data import Dataset

from perceive_components.data.layouts import TASK_LABELS, AllInOneTrainSet
from perceive_components.negatives import CacheItem, CropFlip, RenderCache

logger = logging.getLogger(__name__)

NOISE_PREFIX = "noise/sigma"
INPUTS_FOLDER = "inputs"  # <cache>/inputs/: what prepare_proxy_inputs.py writes (inputs, manifest, settings)
TASK_NAMES = {label: task for task, label in TASK_LABELS.items()}


def cache_key(path: str) -> str:
    """Render-cache key of a training item's ``path``: itself, or a PNG name for synthesised noise."""
    if path.startswith(NOISE_PREFIX) and not path.lower().endswith(".png"):
        return f"{path}.png"
    return path


def task_of_key(path: str) -> str:
    """``'haze/hazy/0001_0.8_0.2.jpg'`` → ``'haze'`` (every key starts with its task folder)."""
    return path.partition("/")[0]


class CachedNegatives(Dataset):
    """Items of ``train_set`` plus ``negatives (K, 3, h, w)`` and ``negative_mask (K,)`` from ``cache``.

    ``slots``: the cache slots to read, in this order (one negative each). A slot that does not cover an
    item's task gives zeros and ``False`` without touching the disk.
    """

    def __init__(self, train_set: AllInOneTrainSet, cache: RenderCache, slots: Sequence[str]) -> None:
        self.train_set, self.cache, self.slots = train_set, cache, list(slots)

    def __len__(self) -> int:
        return len(self.train_set)

    def __getitem__(self, index: int) -> dict[str, Any]:
        seed = int(torch.randint(2**62, (1,)).item())
        return self.sample(index, torch.Generator().manual_seed(seed))

    def sample(self, index: int, generator: torch.Generator) -> dict[str, Any]:
        item = self.train_set.sample(index, generator)
        item["negatives"], item["negative_mask"] = self.cache.read(
            cache_key(item["path"]), TASK_NAMES[item["task"]], CropFlip.from_tensor(item["crop"]), slots=self.slots)
        return item


def cache_noise_seed(root: str | Path) -> int | None:
    """The noise seed the cache's inputs were written with (``<cache>/inputs/settings.json``), if recorded."""
    path = Path(root) / INPUTS_FOLDER / "settings.json"
    if not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8")).get("noise_seed")


def open_proxy_cache(root: str | Path, train_set: AllInOneTrainSet, slots: Sequence[str] | None = None
                     ) -> tuple[RenderCache, list[str]]:
    """Open the render cache at ``root`` and check that it holds every training input its slots cover.

    Raises ``FileNotFoundError`` when there is no cache, ``ValueError`` when slots are unknown or missing
    entries, or when a slot covers noise but the noise is drawn fresh at every step (no fixed input).
    """
    cache = RenderCache(root)
    names = list(slots) if slots else cache.slots
    unknown = sorted(set(names) - set(cache.slots))
    if not names or unknown:
        raise ValueError(f"render cache {str(root)!r} has slots {cache.slots}; asked for {unknown or 'none'}. Render "
                         "proxies into it first (docs/training.md, 'Proxy negatives')")
    if "noise" in train_set.tasks and train_set.noise_seed is None:
        covering = [slot for slot in names if cache.covers(slot, "noise")]
        if covering:
            raise ValueError(f"slot(s) {covering} of {str(root)!r} cover noise, but noise is synthesised afresh at "
                             "every draw (no --noise-seed), so no cached render can match it; pass --noise-seed with "
                             "the seed the noisy inputs were written with (examples/prepare_proxy_inputs.py)")
    keys = train_set.cache_keys()
    items = [CacheItem(cache_key(key), Path(key), task_of_key(key)) for key in keys]
    missing = {slot: keys_ for slot, keys_ in cache.missing(items).items() if slot in names and keys_}
    if missing:
        lines = [f"  - slot {slot!r}: {len(keys_)} of the training inputs it covers have no render, e.g. "
                 f"{', '.join(keys_[:3])}" for slot, keys_ in missing.items()]
        raise ValueError(f"render cache {str(root)!r} is incomplete for the training data under "
                         f"{str(train_set.root)!r}:\n" + "\n".join(lines) +
                         f"\nrender the missing inputs (re-running `perceive-ir cache render` skips what exists) or "
                         f"check --data/--layout/--noise-seed; `perceive-ir cache inspect --cache {root} "
                         f"--input-root {Path(root) / INPUTS_FOLDER} --manifest "
                         f"{Path(root) / INPUTS_FOLDER / 'manifest.jsonl'}` lists them")
    source_key = {cache_key(key): key for key in keys}  # rendered from the same pixels the training set draws?
    cache.verify(items, slots=names, read=lambda item: train_set.degraded_image(source_key[item.key]))
    return cache, names


def probe_crops(train_set: AllInOneTrainSet, per_task: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A fixed probe set for the "probe" difficulty rule: ``per_task`` training crops of every task,
    ``(degraded, target)`` each ``(3, crop, crop)``, evenly spread over the task's items, seeded draws."""
    crops, start = [], 0
    for task_index, task in enumerate(train_set.tasks):
        items = train_set.counts()[task][1]
        for i in range(per_task):
            index = start + (i * items) // per_task
            generator = torch.Generator().manual_seed(seed * 1_000_003 + task_index * 1_009 + i)
            item = train_set.sample(index, generator)
            crops.append((item["degraded"], item["target"]))
        start += items
    return crops
