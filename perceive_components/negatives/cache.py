"""Render cache: proxy restorers rendered once over a data set, read back aligned with each crop.

Running up to five proxy restorers at every training step costs more than the network being trained
(DESIGN.md §5). When the degraded inputs are fixed files, render each proxy once, whole images, tiled
(``ops.tiling.tiled_apply``: 512² tiles, 32 overlap, reflect-pad to a multiple of 8), and read the
negatives back with the same ``CropFlip`` as the input.

Layout (``root/``)::

    cache.json                    {"format": …, "version": 1, "file_format": "png" | "npy"}
    <slot>/slot.json              {"tasks": [...] | null, "fingerprints": [...], "tile": …, …}
    <slot>/<key>.<png|npy>        one 8-bit RGB image per input; key = input path relative to its root

A *slot* is one negative (one k of the ``(B, K, …)`` tensor). Several models may render into the same
slot for disjoint images, e.g. the stage-1 fold restorers, each on the fold it never saw. A slot covers
a set of tasks; for a sample whose task it does not cover, ``read`` returns zeros and ``valid = False``
without touching the disk. Rendering is resumable: files already written are skipped, every file is
written atomically, so an interrupted run leaves no partial file. ``npy`` entries are uint8 ``(H, W, 3)``
arrays read through a memory map (only the crop is read: fastest); ``png`` is the compact default.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ..ops.checkpoint import atomic_write
from ..ops.frozen import module_device
from ..ops.io import list_images, read_image, to_uint8, write_image
from ..ops.tiling import tiled_apply
from ..data.crops import CropFlip
from .proxies import resolve_autocast

logger = logging.getLogger(__name__)

CACHE_FORMAT = "perceive-components/proxy-render-cache"
CACHE_CONFIG = "cache.json"
SLOT_CONFIG = "slot.json"
FILE_FORMATS = ("png", "npy")
_SLOT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass(frozen=True)
class CacheItem:
    """One degraded input: ``key`` (its path relative to the data root, '/'-separated), file, task name."""

    key: str
    path: Path
    task: str | None = None
    fold: int | None = None


def items_from_folder(root: str | os.PathLike, task: str | None = None) -> list[CacheItem]:
    """Every image under ``root`` (recursive), keyed by its relative path, all of one ``task``."""
    root = Path(root)
    return [CacheItem(path.relative_to(root).as_posix(), path, task) for path in list_images(root)]


def items_from_manifest(manifest: str | os.PathLike, root: str | os.PathLike) -> list[CacheItem]:
    """JSONL rows ``{"input": "<path relative to root>", "task": "<name>", "fold": <int>}`` (task, fold optional)."""
    items, root = [], Path(root)
    with open(manifest, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                key = Path(row["input"]).as_posix()
            except (json.JSONDecodeError, KeyError, TypeError) as error:
                raise ValueError(f"{manifest}:{number}: expected a JSON object with an 'input' path, "
                                 f"got {line.strip()!r}") from error
            fold = row.get("fold")
            items.append(CacheItem(key, root / key, row.get("task"), None if fold is None else int(fold)))
    return items


def model_fingerprint(model: nn.Module) -> str:
    """sha1 of the state_dict (names, shapes, bytes): tells renders of different weights apart."""
    digest = hashlib.sha1()
    for name, tensor in model.state_dict().items():
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"{path} is not a readable render-cache file: {error}") from error


def _write_json(path: Path, value: dict) -> None:
    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps(value, indent=2, sort_keys=True), encoding="utf-8")


class RenderCache:
    """A folder of proxy renders. ``RenderCache(root)`` opens one; ``create=True`` makes it if missing."""

    def __init__(self, root: str | os.PathLike, *, create: bool = False, file_format: str = "png") -> None:
        self.root = Path(root)
        config_path = self.root / CACHE_CONFIG
        if not config_path.is_file():
            if not create:
                raise FileNotFoundError(
                    f"no render cache at {str(self.root)!r} (missing {CACHE_CONFIG}); create it with "
                    f"`perceive-ir cache render --cache {self.root} …` or RenderCache(root, create=True).render(…)"
                )
            if file_format not in FILE_FORMATS:
                raise ValueError(f"file_format must be one of {list(FILE_FORMATS)}, got {file_format!r}")
            _write_json(config_path, {"format": CACHE_FORMAT, "version": 1, "file_format": file_format})
        config = _read_json(config_path)
        if config.get("format") != CACHE_FORMAT:
            raise ValueError(f"{config_path} is not a perceive-components render cache")
        self.file_format = config["file_format"]
        self._configs: dict[str, dict] = {}  # slot configs, read once (reads happen at every training step)
        self._slot_names: list[str] | None = None

    # ------------------------------------------------------------------ slots
    @property
    def slots(self) -> list[str]:
        """Slot names, sorted (the order of k in ``read``)."""
        return sorted(set(self._configs) | {p.parent.name for p in self.root.glob(f"*/{SLOT_CONFIG}")})

    def slot_config(self, slot: str) -> dict:
        if slot not in self._configs:
            path = self.root / slot / SLOT_CONFIG
            if not path.is_file():
                raise FileNotFoundError(f"render cache {str(self.root)!r} has no slot {slot!r}; slots: {self.slots}")
            self._configs[slot] = _read_json(path)
        return self._configs[slot]

    def covers(self, slot: str, task: str | None) -> bool:
        tasks = self.slot_config(slot)["tasks"]
        return tasks is None or task in tasks

    def entry_path(self, slot: str, key: str) -> Path:
        return self.root / slot / f"{key}.{self.file_format}"

    # ------------------------------------------------------------------ rendering
    @torch.no_grad()
    def render(
        self,
        slot: str,
        model: nn.Module,
        items: Iterable[CacheItem],
        *,
        tasks: Sequence[str] | None = None,
        tile: int | None = 512,
        overlap: int = 32,
        multiple: int = 8,
        autocast_dtype: torch.dtype | str | None = "auto",
        overwrite: bool = False,
        progress: bool = True,
    ) -> dict[str, int]:
        """Render ``model`` (on its own device) over ``items`` into ``slot``; returns counts of
        ``rendered``, ``skipped`` (already there) and ``not_covered`` (task outside ``tasks``).

        ``tasks``: the task names this slot covers (``None``: all). A slot keeps the coverage it was
        created with; rendering into it again (e.g. another fold model) must not change it.
        """
        if not isinstance(slot, str) or not _SLOT_NAME.match(slot):
            raise ValueError(f"slot must be a simple name (letters, digits, '_', '-', '.'), got {slot!r}")
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module restorer, got {type(model).__name__}")
        coverage = None if tasks is None else sorted(set(tasks))
        fingerprint = model_fingerprint(model)
        config_path = self.root / slot / SLOT_CONFIG
        if config_path.is_file():
            config = _read_json(config_path)
            if tasks is not None and config["tasks"] != coverage:
                raise ValueError(f"slot {slot!r} covers tasks {config['tasks']}, not {coverage}; "
                                 "use another slot name or delete the slot folder")
            if fingerprint not in config["fingerprints"]:
                logger.info("slot %r: adding renders of new weights %s (existing files are kept)", slot, fingerprint)
                config["fingerprints"].append(fingerprint)
        else:
            config = {"tasks": coverage, "fingerprints": [fingerprint], "tile": tile, "overlap": overlap,
                      "multiple": multiple}
        _write_json(config_path, config)
        self._configs[slot], self._slot_names = config, None

        device = module_device(model)
        dtype = resolve_autocast(autocast_dtype, device)
        was_training = model.training
        model.eval()

        def restore(x: torch.Tensor) -> torch.Tensor:
            with torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
                return model(x).float().clamp(0, 1)

        counts = {"rendered": 0, "skipped": 0, "not_covered": 0}
        try:
            for item in tqdm(list(items), desc=f"render {slot}", disable=not progress):
                if config["tasks"] is not None and item.task not in config["tasks"]:
                    counts["not_covered"] += 1
                    continue
                target = self.entry_path(slot, item.key)
                if target.is_file() and not overwrite:
                    counts["skipped"] += 1
                    continue
                image = read_image(item.path)[None].to(device)
                output = tiled_apply(restore, image, tile=tile, overlap=overlap, multiple=multiple, out_device="cpu")
                if tuple(output.shape) != tuple(image.shape):
                    raise ValueError(f"slot {slot!r}: the model turned {item.key!r} {tuple(image.shape)} into "
                                     f"{tuple(output.shape)}; a proxy must keep the image size")
                self._write(target, output[0])
                counts["rendered"] += 1
        finally:
            model.train(was_training)
        logger.info("render cache %s, slot %r: %s", self.root, slot, counts)
        return counts

    def _write(self, target: Path, image: torch.Tensor) -> None:
        if self.file_format == "png":
            write_image(target, image)
            return
        with atomic_write(target) as tmp, open(tmp, "wb") as handle:
            np.save(handle, to_uint8(image))

    # ------------------------------------------------------------------ reading
    def read(self, key: str, task: str | None, crop: CropFlip, *, slots: Sequence[str] | None = None,
             image_size: tuple[int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Negatives of input ``key`` cut with ``crop``: ``(K, 3, h, w)`` float32 in [0, 1] and
        ``valid (K,)`` bool (False, with zeros, where the slot does not cover ``task``).

        ``image_size`` (H, W) of the input, when given, is checked against each entry (stale caches).
        Raises ``FileNotFoundError`` for a covered entry that was never rendered.
        """
        names = self._default_slots() if slots is None else list(slots)
        height, width = crop.output_size()
        negatives = torch.zeros(len(names), 3, height, width)
        valid = torch.zeros(len(names), dtype=torch.bool)
        for k, slot in enumerate(names):
            if not self.covers(slot, task):
                continue
            negatives[k] = self._load(slot, key, crop, image_size)
            valid[k] = True
        return negatives, valid

    def _default_slots(self) -> list[str]:
        if self._slot_names is None:
            self._slot_names = self.slots
        return self._slot_names

    def read_batch(self, keys: Sequence[str], tasks: Sequence[str | None], crops: Sequence[CropFlip], *,
                   slots: Sequence[str] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, K, 3, h, w)`` negatives and ``(B, K)`` mask for a batch (all crops of one output size)."""
        pairs = [self.read(key, task, crop, slots=slots) for key, task, crop in zip(keys, tasks, crops, strict=True)]
        return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])

    def _load(self, slot: str, key: str, crop: CropFlip, image_size: tuple[int, int] | None) -> torch.Tensor:
        path = self.entry_path(slot, key)
        if not path.is_file():
            raise FileNotFoundError(
                f"render cache {str(self.root)!r}: slot {slot!r} has no entry for {key!r} (expected {path}); "
                f"render it with `perceive-ir cache render --cache {self.root} --slot {slot} …`"
            )
        if self.file_format == "npy":
            array = np.load(path, mmap_mode="r")
            size = array.shape[:2]
        else:
            full = read_image(path)
            size = tuple(full.shape[-2:])
        if image_size is not None and tuple(size) != tuple(image_size):
            raise ValueError(f"render cache entry {path} is {size[0]}×{size[1]} but the input is "
                             f"{image_size[0]}×{image_size[1]}: stale cache or wrong key")
        crop.check(tuple(size), f"cache entry {path}")
        if self.file_format == "npy":
            box = torch.from_numpy(np.array(crop.crop_array(array))).permute(2, 0, 1)  # copies only the box
            return crop.transform(box.float().div_(255.0))
        return crop.apply(full)

    # ------------------------------------------------------------------ inspection
    def missing(self, items: Iterable[CacheItem]) -> dict[str, list[str]]:
        """Per slot, the keys of covered items that have no entry yet."""
        items = list(items)
        return {slot: [item.key for item in items if self.covers(slot, item.task)
                       and not self.entry_path(slot, item.key).is_file()] for slot in self.slots}

    def summary(self) -> dict:
        slots = {}
        for slot in self.slots:
            config = self.slot_config(slot)
            entries = sum(1 for _ in (self.root / slot).rglob(f"*.{self.file_format}"))
            slots[slot] = {"tasks": config["tasks"], "entries": entries, "fingerprints": config["fingerprints"]}
        return {"root": str(self.root), "file_format": self.file_format, "slots": slots}
