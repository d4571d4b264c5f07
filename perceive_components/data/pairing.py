"""Finding (degraded, clean) image pairs in the standard folder layouts (docs/method.md §4, docs/data.md).

Every task keeps its images under ``<split>/<task>/<degraded folder>`` and ``<split>/<task>/<clean
folder>`` (noise has clean images only: its degraded inputs are synthesised). A degraded image is paired
with the clean image of the same relative path (suffix ignored), or by the naming rule of its data set:

- RESIDE (OTS/SOTS): ``[part1/]0001_0.8_0.2.jpg`` → ``[part1/]0001.*``  (the id before the first ``_``;
  the clean folder may also be flat)
- Rain100L:          ``rain-001.png``     → ``norain-001.*``

Anything missing is collected and reported at once in a ``LayoutError`` that lists every problem.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Callable

from ..ops.io import list_images

DOCS_HINT = "see docs/data.md for the expected folders and how to prepare them"


class LayoutError(ValueError):
    """A data folder does not follow the expected layout; the message lists everything that is missing."""


def _same_stem(stem: PurePosixPath) -> list[PurePosixPath]:
    return [stem]


def _reside_stem(stem: PurePosixPath) -> list[PurePosixPath]:
    """Same path, then the id in the same subfolder, then the id at the top (OTS: part1/0001_… → 0001)."""
    scene = stem.name.split("_")[0]
    return [stem, stem.with_name(scene), PurePosixPath(scene)]


def _rain100l_stem(stem: PurePosixPath) -> list[PurePosixPath]:
    candidates = [stem]
    if stem.name.startswith("rain"):
        candidates += [stem.with_name("no" + stem.name), PurePosixPath("no" + stem.name)]
    return candidates


@dataclass(frozen=True)
class TaskFolders:
    """Where one task's images live inside a split folder, and what data set is expected there."""

    task: str
    degraded: str | None  # relative folder of degraded images; None = synthesised from the clean images
    clean: str
    train_source: str
    test_source: str
    candidates: Callable[[PurePosixPath], list[PurePosixPath]] = _same_stem


TASK_FOLDERS: dict[str, TaskFolders] = {
    "noise": TaskFolders("noise", None, "noise/clean", "BSD400 + WED clean images", "CBSD68 clean images"),
    "haze": TaskFolders("haze", "haze/hazy", "haze/clean", "RESIDE OTS", "RESIDE SOTS-outdoor", _reside_stem),
    "rain": TaskFolders("rain", "rain/rainy", "rain/clean", "Rain100L (train)", "Rain100L (test)", _rain100l_stem),
    "blur": TaskFolders("blur", "blur/blurry", "blur/sharp", "GoPro (train)", "GoPro (test)"),
    "lowlight": TaskFolders("lowlight", "lowlight/low", "lowlight/high", "LOL-v1 our485", "LOL-v1 eval15"),
}


@dataclass(frozen=True)
class ImagePair:
    """One training/test image: ``degraded`` is ``None`` for synthesised noise. ``key`` is the degraded
    image's path relative to the split folder (for noise: the clean image's), POSIX style."""

    task: str
    clean: Path
    degraded: Path | None
    key: str


def _relative_stem(path: Path, folder: Path) -> PurePosixPath:
    return PurePosixPath(path.relative_to(folder).with_suffix("").as_posix())


def _list_folder(split_root: Path, relative: str, what: str, problems: list[str], task: str) -> list[Path]:
    folder = split_root / relative
    if not folder.is_dir():
        problems.append(f"{task}: missing folder {relative}/ ({what})")
        return []
    images = list_images(folder)
    if not images:
        problems.append(f"{task}: folder {relative}/ holds no images ({what})")
    return images


def _pair_task(split_root: Path, folders: TaskFolders, source: str, problems: list[str]) -> list[ImagePair]:
    task = folders.task
    if folders.degraded is None:
        clean_images = _list_folder(split_root, folders.clean, f"{source}", problems, task)
        return [ImagePair(task, path, None, path.relative_to(split_root).as_posix()) for path in clean_images]
    degraded_images = _list_folder(split_root, folders.degraded, f"{source}, degraded images", problems, task)
    clean_images = _list_folder(split_root, folders.clean, f"{source}, clean images", problems, task)
    clean_root = split_root / folders.clean
    by_stem = {}
    for path in clean_images:
        by_stem.setdefault(_relative_stem(path, clean_root), path)
    pairs, unpaired = [], []
    for path in degraded_images:
        stem = _relative_stem(path, split_root / folders.degraded)
        match = next((by_stem[c] for c in folders.candidates(stem) if c in by_stem), None)
        if match is None:
            unpaired.append(path.relative_to(split_root / folders.degraded).as_posix())
        else:
            pairs.append(ImagePair(task, match, path, path.relative_to(split_root).as_posix()))
    if unpaired and clean_images:
        shown = ", ".join(unpaired[:5]) + (", ..." if len(unpaired) > 5 else "")
        problems.append(f"{task}: {len(unpaired)} of {len(degraded_images)} images in {folders.degraded}/ have no "
                        f"clean partner in {folders.clean}/: {shown}")
    return pairs


def find_pairs(split_root: str | os.PathLike, tasks: tuple[str, ...], split: str = "train") -> dict[str, list[ImagePair]]:
    """Pair the images of ``tasks`` under ``split_root``; raise ``LayoutError`` listing every problem."""
    split_root = Path(split_root)
    unknown = [t for t in tasks if t not in TASK_FOLDERS]
    if unknown:
        raise ValueError(f"tasks must be among {list(TASK_FOLDERS)}, got {unknown}")
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    problems: list[str] = []
    if not split_root.is_dir():
        problems.append(f"the folder {split_root} does not exist")
    pairs = {}
    for task in tasks:
        folders = TASK_FOLDERS[task]
        source = folders.train_source if split == "train" else folders.test_source
        pairs[task] = _pair_task(split_root, folders, source, problems)
    if problems:
        lines = "\n".join(f"  - {p}" for p in problems)
        expected = ", ".join(f"{task}: {_describe(TASK_FOLDERS[task])}" for task in tasks)
        raise LayoutError(f"{split} data under {str(split_root)!r} is incomplete ({len(problems)} problem(s)):\n{lines}\n"
                          f"expected folders: {expected}; {DOCS_HINT}")
    return pairs


def _describe(folders: TaskFolders) -> str:
    if folders.degraded is None:
        return f"{folders.clean}/"
    return f"{folders.degraded}/ + {folders.clean}/"
