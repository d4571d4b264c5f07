"""Render cache: proxy restorers rendered once over a data set, read back aligned with each crop.

Running up to five proxy restorers at every training step costs more than the network being trained.
When the degraded inputs are fixed files, render each proxy once, whole images, tiled
(``ops.tiling.tiled_apply``: 512² tiles, 32 overlap, reflect-pad to a multiple of 8), and read the
negatives back with the same ``CropFlip`` as the input (resize or padding of small images included).

Layout (``root/``)::

    cache.json                    {"format": …, "version": 2, "file_format": "png" | "npy"}
    <slot>/slot.json              {"tasks": [...] | null, "fingerprints": [...], "tile": …, …}
    <slot>/inputs.jsonl           {"key": …, "input": <fingerprint of the input's pixels>} per rendered entry
    <slot>/<key>.<png|npy>        one 8-bit RGB image per input; key = input path relative to its root

A *slot* is one negative (one k of the ``(B, K, …)`` tensor). Several models may render into the same
slot for disjoint images, e.g. the stage-1 fold restorers, each on the fold it never saw. A slot covers
a set of tasks (names of the cache's ``TaskVocabulary``); for a sample whose task it does not cover,
``read`` returns zeros and ``valid = False`` without touching the disk. Rendering is resumable: entries
already rendered from the same input pixels are skipped, every file is written atomically. Entries whose
input changed (another data set with the same file names) are refused unless ``overwrite=True``, and
``verify(items)`` checks a data set against the cache before training. ``npy`` entries are uint8
``(H, W, 3)`` arrays read through a memory map (only the crop is read: fastest); ``png`` is the compact default.
"""
from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ..data.crops import CropFlip
from ..data.tasks import TaskLike, TaskVocabulary, as_vocabulary
from ..ops.checkpoint import atomic_write
from ..ops.frozen import module_device
from ..ops.io import read_image, to_uint8
from ..ops.tiling import tiled_apply
from .fingerprints import append_inputs_log, image_fingerprint, model_fingerprint, read_inputs_log
from .items import CacheItem
from .proxies import resolve_autocast

logger = logging.getLogger(__name__)

CACHE_FORMAT = "perceive-components/proxy-render-cache"
CACHE_VERSION = 2  # 2: per-entry input fingerprints (inputs.jsonl)
CACHE_CONFIG = "cache.json"
SLOT_CONFIG = "slot.json"
FILE_FORMATS = ("png", "npy")
_SLOT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_SHOWN = 3  # keys named per problem in an error message
ReadInput = Callable[[CacheItem], torch.Tensor]


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"{path} is not a readable render-cache file: {error}") from error


def _write_json(path: Path, value: dict) -> None:
    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps(value, indent=2, sort_keys=True), encoding="utf-8")


def _read_item(item: CacheItem) -> torch.Tensor:
    return read_image(item.path)


def _first(keys: Sequence[str]) -> str:
    return ", ".join(keys[:_SHOWN]) + (", …" if len(keys) > _SHOWN else "")


class RenderCache:
    """A folder of proxy renders. ``RenderCache(root)`` opens one; ``create=True`` makes it if missing.

    ``vocabulary``: the ``TaskVocabulary`` that task names, aliases and integer ids are resolved with (default
    ``STANDARD_TASKS``: noise, haze, rain, blur, lowlight), the same one the losses and ``ProxyNegatives`` use.
    """

    def __init__(self, root: str | os.PathLike, *, create: bool = False, file_format: str = "png",
                 vocabulary: TaskVocabulary | Sequence[str] | None = None) -> None:
        self.root = Path(root)
        self.vocabulary = as_vocabulary(vocabulary, "vocabulary")
        config_path = self.root / CACHE_CONFIG
        if not config_path.is_file():
            if not create:
                raise FileNotFoundError(
                    f"no render cache at {str(self.root)!r} (missing {CACHE_CONFIG}); create it with "
                    f"`perceive-ir cache render --cache {self.root} …` or RenderCache(root, create=True).render(…)"
                )
            if file_format not in FILE_FORMATS:
                raise ValueError(f"file_format must be one of {list(FILE_FORMATS)}, got {file_format!r}")
            _write_json(config_path, {"format": CACHE_FORMAT, "version": CACHE_VERSION, "file_format": file_format})
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

    def covers(self, slot: str, task: TaskLike | None) -> bool:
        """Whether ``slot`` holds negatives for ``task`` (a name, alias or id of ``self.vocabulary``)."""
        tasks = self.slot_config(slot)["tasks"]
        return tasks is None or (task is not None and self.vocabulary.name(task) in tasks)

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
        tasks: Sequence[TaskLike] | None = None,
        tile: int | None = 512,
        overlap: int = 32,
        multiple: int = 8,
        autocast_dtype: torch.dtype | str | None = "auto",
        overwrite: bool = False,
        progress: bool = True,
    ) -> dict[str, int]:
        """Render ``model`` (on its own device) over ``items`` into ``slot``; returns counts of
        ``rendered``, ``skipped`` (already rendered from the same input pixels) and ``not_covered``.

        ``tasks``: the tasks this slot covers (``None``: all). A slot keeps the coverage it was created with.
        Existing entries whose input pixels changed since they were rendered (or that carry no input
        fingerprint) raise ``ValueError`` before anything is rendered; ``overwrite=True`` re-renders every entry.
        """
        if not isinstance(slot, str) or not _SLOT_NAME.match(slot):
            raise ValueError(f"slot must be a simple name (letters, digits, '_', '-', '.'), got {slot!r}")
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module restorer, got {type(model).__name__}")
        coverage = None if tasks is None else sorted({self.vocabulary.name(task) for task in tasks})
        config = self._open_slot(slot, coverage, model_fingerprint(model), tile, overlap, multiple)
        items = list(items)
        covered = [item for item in items if config["tasks"] is None or self._item_task(item) in config["tasks"]]
        counts = {"rendered": 0, "skipped": 0, "not_covered": len(items) - len(covered)}
        unchanged = set() if overwrite else self._unchanged_entries(slot, covered, progress)

        device = module_device(model)
        dtype = resolve_autocast(autocast_dtype, device)
        was_training = model.training
        model.eval()

        def restore(x: torch.Tensor) -> torch.Tensor:
            with torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
                return model(x).float().clamp(0, 1)

        try:
            for item in tqdm(covered, desc=f"render {slot}", disable=not progress):
                if item.key in unchanged:
                    counts["skipped"] += 1
                    continue
                image = read_image(item.path)
                output = tiled_apply(restore, image[None].to(device), tile=tile, overlap=overlap, multiple=multiple,
                                     out_device="cpu")
                if tuple(output.shape[1:]) != tuple(image.shape):
                    raise ValueError(f"slot {slot!r}: the model turned {item.key!r} {tuple(image.shape)} into "
                                     f"{tuple(output.shape[1:])}; a proxy must keep the image size")
                self._write(slot, item.key, output[0], image_fingerprint(image))
                counts["rendered"] += 1
        finally:
            model.train(was_training)
        logger.info("render cache %s, slot %r: %s", self.root, slot, counts)
        return counts

    def _item_task(self, item: CacheItem) -> str | None:
        return None if item.task is None else self.vocabulary.name(item.task)

    def _open_slot(self, slot: str, coverage: list[str] | None, fingerprint: str, tile: int | None, overlap: int,
                   multiple: int) -> dict:
        config_path = self.root / slot / SLOT_CONFIG
        if config_path.is_file():
            config = _read_json(config_path)
            if coverage is not None and config["tasks"] != coverage:
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
        return config

    def _unchanged_entries(self, slot: str, items: list[CacheItem], progress: bool) -> set[str]:
        """Keys whose entry exists and was rendered from the current input pixels; raises for changed ones."""
        existing = [item for item in items if self.entry_path(slot, item.key).is_file()]
        if not existing:
            return set()
        recorded = read_inputs_log(self.root / slot)
        changed = [item.key for item in tqdm(existing, desc=f"check {slot}", disable=not progress)
                   if recorded.get(item.key) != image_fingerprint(read_image(item.path))]
        if changed:
            raise ValueError(
                f"render cache {str(self.root)!r}, slot {slot!r}: {len(changed)} existing entries were rendered from "
                f"other input pixels than the files given now (another data set with the same file names, or "
                f"changed inputs), or before input fingerprints were recorded: {_first(changed)}. Nothing was "
                "rendered; re-render them with overwrite=True (`perceive-ir cache render … --overwrite`) or use "
                "another cache folder")
        return {item.key for item in existing}

    def _write(self, slot: str, key: str, image: torch.Tensor, input_fingerprint: str) -> None:
        target = self.entry_path(slot, key)
        with atomic_write(target) as tmp:
            if self.file_format == "png":
                from PIL import Image

                Image.fromarray(to_uint8(image)).save(tmp, format="PNG")
            else:
                with open(tmp, "wb") as handle:
                    np.save(handle, to_uint8(image))
            append_inputs_log(self.root / slot, key, input_fingerprint)  # before the rename: no entry without one

    # ------------------------------------------------------------------ reading
    def read(self, key: str, task: TaskLike | None, crop: CropFlip | None = None, *,
             slots: Sequence[str] | None = None, image_size: tuple[int, int] | None = None,
             size: tuple[int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Negatives of input ``key`` cut with ``crop``: ``(K, 3, h, w)`` float32 in [0, 1] and ``valid (K,)``
        bool (False, with zeros, where the slot does not cover ``task``).

        ``crop`` is the sample's ``CropFlip`` (its resize or padding of a small image is applied to the entry the
        same way). For a sample no slot covers, ``crop`` may be left out and ``size = (h, w)`` given instead.
        ``image_size`` (H, W) of the input, when given, is checked against each entry (stale caches), as is
        ``crop.image_size``. Raises ``FileNotFoundError`` for a covered entry that was never rendered.
        """
        names = self._default_slots() if slots is None else list(slots)
        if crop is None:
            if size is None:
                raise ValueError("read needs the sample's crop (CropFlip), or size=(h, w) for a sample no slot covers")
            covering = [slot for slot in names if self.covers(slot, task)]
            if covering:
                raise ValueError(f"slot(s) {covering} cover task {task!r} of {key!r}: pass the sample's crop to "
                                 "read its negatives")
            height, width = (int(v) for v in size)
        else:
            height, width = crop.output_size()
            if size is not None and tuple(size) != (height, width):
                raise ValueError(f"size {tuple(size)} differs from the crop's output size {(height, width)}")
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

    def read_batch(self, keys: Sequence[str], tasks: Sequence[TaskLike | None] | torch.Tensor,
                   crops: Sequence[CropFlip] | torch.Tensor, *, slots: Sequence[str] | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, K, 3, h, w)`` negatives and ``(B, K)`` mask for a batch (all crops of one output size).

        ``tasks``: names, aliases or ids (e.g. the collated ``(B,)`` task tensor); ``crops``: ``CropFlip`` values
        or the collated ``(B, 12)`` tensor of ``CropFlip.as_tensor()``."""
        if isinstance(tasks, torch.Tensor):
            tasks = tasks.tolist()
        if isinstance(crops, torch.Tensor):
            crops = CropFlip.from_tensor(crops)
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
            if crop.inside(size):
                box = torch.from_numpy(np.array(crop.crop_array(array))).permute(2, 0, 1)  # copies only the box
                return crop.transform(box.float().div_(255.0))
            full = torch.from_numpy(np.array(array)).permute(2, 0, 1).float().div_(255.0)
        return crop.apply(full)

    # ------------------------------------------------------------------ checking a data set against the cache
    def problems(self, items: Iterable[CacheItem], *, slots: Sequence[str] | None = None,
                 read: ReadInput | None = None, progress: bool = False) -> dict[str, dict[str, list[str]]]:
        """Per slot, the keys of covered items that are ``missing`` (never rendered), ``stale`` (rendered from
        other input pixels) or ``unverified`` (rendered before input fingerprints were recorded).

        ``read(item) -> (3, H, W)`` gives each input's pixels (default: the file at ``item.path``); a data set that
        synthesises its inputs passes its own (e.g. ``lambda item: dataset.degraded_image(key_of[item.key])``).
        Each input is decoded once, for all slots."""
        names = self.slots if slots is None else list(slots)
        read = read or _read_item
        logs = {slot: read_inputs_log(self.root / slot) for slot in names}
        found = {slot: {"missing": [], "stale": [], "unverified": []} for slot in names}
        for item in tqdm(list(items), desc="verify cache inputs", disable=not progress):
            fingerprint = None
            for slot in names:
                if not self.covers(slot, item.task):
                    continue
                if not self.entry_path(slot, item.key).is_file():
                    found[slot]["missing"].append(item.key)
                elif item.key not in logs[slot]:
                    found[slot]["unverified"].append(item.key)
                else:
                    fingerprint = fingerprint or image_fingerprint(read(item))
                    if logs[slot][item.key] != fingerprint:
                        found[slot]["stale"].append(item.key)
        return found

    def verify(self, items: Iterable[CacheItem], *, slots: Sequence[str] | None = None,
               read: ReadInput | None = None, progress: bool = False) -> None:
        """Raise ``ValueError`` unless every covered item has an entry rendered from its current input pixels
        (see ``problems``). Call it when a cache is opened for training data."""
        lines = [f"  - slot {slot!r}: {len(keys)} {kind}: {_first(keys)}"
                 for slot, kinds in self.problems(items, slots=slots, read=read, progress=progress).items()
                 for kind, keys in kinds.items() if keys]
        if lines:
            raise ValueError(
                f"render cache {str(self.root)!r} does not match these inputs:\n" + "\n".join(lines) + "\n"
                "missing: render them (re-running `perceive-ir cache render` skips what exists); stale (rendered "
                "from other pixels, e.g. another data set with the same file names) or unverified (an older cache): "
                "re-render with `--overwrite` (overwrite=True) or use another cache folder")

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
