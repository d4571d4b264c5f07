"""The inputs of a render cache: one ``CacheItem`` per degraded image, keyed as the training data set keys it.

A key is a '/'-separated relative path; the data set computes the same key for each training sample and
reads the cached negatives under it. Three ways to list items:

- ``items_from_folder(root, task)``: every image under one folder, key = path relative to ``root``;
- ``items_from_task_folders({task: folder})``: a folder per task, key = ``task_folder_key(task, relative)``
  = ``"<task>/<path relative to the task's folder>"`` (so ``rain-001.png`` of two tasks never collide);
- ``items_from_manifest(jsonl, root)``: rows ``{"input": …, "task": …, "fold": …}``.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Mapping

from ..ops.io import list_images


@dataclass(frozen=True)
class CacheItem:
    """One degraded input: ``key`` (its path relative to the data root, '/'-separated), file, task, fold."""

    key: str
    path: Path
    task: str | None = None
    fold: int | None = None


def items_from_folder(root: str | os.PathLike, task: str | None = None) -> list[CacheItem]:
    """Every image under ``root`` (recursive), keyed by its relative path, all of one ``task``."""
    root = Path(root)
    return [CacheItem(path.relative_to(root).as_posix(), path, task) for path in list_images(root)]


def task_folder_key(task: str, relative_path: str | os.PathLike) -> str:
    """The cache key of an image of ``task`` at ``relative_path`` inside that task's folder:
    ``"<task>/<relative path, '/'-separated>"``. A data set with a folder per task computes its keys with this
    (``task_folder_key(task, path.relative_to(folders[task]))``) to read what ``items_from_task_folders`` rendered."""
    if not isinstance(task, str) or not task or "/" in task or "\\" in task:
        raise ValueError(f"task must be a non-empty name without '/', got {task!r}")
    relative = PurePath(relative_path).as_posix()
    if relative.startswith(("/", "../")) or relative in ("", "."):
        raise ValueError(f"relative_path must lie inside the task's folder, got {str(relative_path)!r}")
    return f"{task}/{relative}"


def items_from_task_folders(folders: Mapping[str, str | os.PathLike]) -> list[CacheItem]:
    """Every image of a folder-per-task layout ``{task: folder}``, keyed by ``task_folder_key`` (keys never
    collide across tasks, even for the same file names), with the task of its folder."""
    if not isinstance(folders, Mapping) or not folders:
        raise ValueError(f"folders must be a non-empty mapping task -> folder, got {folders!r}")
    items = []
    for task, folder in folders.items():
        folder = Path(folder)
        items += [CacheItem(task_folder_key(task, path.relative_to(folder)), path, task)
                  for path in list_images(folder)]
    return items


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
