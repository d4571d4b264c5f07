"""Check every image of a data set before training starts: one error listing every bad file.

A corrupt file otherwise surfaces when it is first drawn, possibly hours into a run. ``scan_images`` opens
each file, verifies its structure (``PIL.Image.verify``: headers and chunk checksums) and decodes it
completely with ``read_image``, the reader the data sets use. Files are checked in parallel threads
(Pillow releases the GIL while it decodes). Files that passed are remembered in a small JSON cache keyed
by absolute path, size and modification time, so the next run decodes only new or changed files.
"""
from __future__ import annotations

import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from tqdm.auto import tqdm

from ..ops.checkpoint import atomic_write
from ..ops.io import read_image
from ..ops.validation import check_positive_int

logger = logging.getLogger(__name__)

CACHE_FORMAT = "perceive-components/image-scan/1"
FileSignature = tuple[int, int]  # (size in bytes, modification time in ns)


class ImageScanError(ValueError):
    """Raised by :func:`scan_images`; ``problems`` holds ``(path, reason)`` for every file that failed."""

    def __init__(self, problems: list[tuple[str, str]], total: int) -> None:
        self.problems = problems
        listing = "\n".join(f"  - {path}: {reason}" for path, reason in problems)
        super().__init__(f"{len(problems)} of {total} image file(s) cannot be used for training:\n{listing}")


@dataclass(frozen=True)
class ScanResult:
    """What :func:`scan_images` did: ``total`` distinct files, ``decoded`` now, ``cached`` known good."""

    total: int
    decoded: int
    cached: int


def check_image_file(path: str | os.PathLike) -> None:
    """Raise if ``path`` is not an image that decodes completely (structure and checksums, then pixels)."""
    from PIL import Image

    with Image.open(path) as image:
        image.verify()
    read_image(path)


def _reason(error: BaseException) -> str:
    cause = error.__cause__ if isinstance(error, ValueError) and error.__cause__ is not None else error
    return str(cause) or type(cause).__name__


def _check(path: str, known_good: dict[str, FileSignature]) -> tuple[FileSignature | None, str | None, bool]:
    """``(signature, problem, decoded)`` of one file; a file whose signature is known good is not opened."""
    try:
        stat = os.stat(path)
    except OSError as error:
        return None, "file not found" if isinstance(error, FileNotFoundError) else _reason(error), False
    signature = (stat.st_size, stat.st_mtime_ns)
    if known_good.get(path) == signature:
        return signature, None, False
    try:
        check_image_file(path)
    except MemoryError:
        raise
    except Exception as error:  # a scan reports every way a file can fail
        return signature, _reason(error), True
    return signature, None, True


def _read_cache(cache: Path | None) -> dict[str, FileSignature]:
    if cache is None or not cache.is_file():
        return {}
    try:
        content = json.loads(cache.read_text(encoding="utf-8"))
        if content.get("format") != CACHE_FORMAT:
            raise ValueError(f"format {content.get('format')!r}")
        return {path: (int(size), int(mtime)) for path, (size, mtime) in content["good"].items()}
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        logger.warning("ignoring the unreadable image-scan cache %s (%s); it will be rewritten", cache, error)
        return {}


def scan_images(
    paths: Iterable[str | os.PathLike],
    *,
    workers: int | None = None,
    cache: str | os.PathLike | None = None,
    progress: bool = False,
) -> ScanResult:
    """Check that every file of ``paths`` is a complete, decodable image, before a run starts.

    Args:
        paths: image files (duplicates are checked once).
        workers: threads (default: the number of CPUs, at most 32).
        cache: JSON file remembering good files by absolute path, size and modification time; created or
            updated (atomically), shared by any number of data sets. Bad files are never remembered.
        progress: show a tqdm bar.

    Raises ``ImageScanError`` (a ``ValueError``) listing every missing or bad file with its reason.
    """
    workers = check_positive_int(workers, "workers") if workers is not None else min(32, os.cpu_count() or 1)
    keys = list(dict.fromkeys(os.path.abspath(os.fspath(path)) for path in paths))
    cache_path = Path(cache) if cache is not None else None
    known_good = _read_cache(cache_path)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = list(tqdm(pool.map(lambda key: _check(key, known_good), keys), total=len(keys),
                            desc="scan images", disable=not progress, dynamic_ncols=True))
    good = dict(known_good)
    problems = []
    for key, (signature, problem, _) in zip(keys, results):
        if problem is None:
            good[key] = signature
        else:
            good.pop(key, None)
            problems.append((key, problem))
    if cache_path is not None and good != known_good:
        with atomic_write(cache_path) as tmp:
            tmp.write_text(json.dumps({"format": CACHE_FORMAT, "good": {k: list(v) for k, v in good.items()}}),
                           encoding="utf-8")
    decoded = sum(1 for _, _, was_decoded in results if was_decoded)
    if problems:
        raise ImageScanError(problems, len(keys))
    return ScanResult(total=len(keys), decoded=decoded, cached=len(keys) - decoded)
