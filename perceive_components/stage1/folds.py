"""K-fold split by a stable hash of the path relative to the data root (docs/method.md §1.2).

The authors hash the absolute path, so folds change when data moves. Here the key is the *clean*
image's POSIX path relative to the data root: moving the root keeps every fold, and all degraded versions
of one clean image (e.g. σ = 15/25/50 noise) fall in the same fold, so no fold restorer ever saw the
content it renders.

    fold(path) = int(sha256(salt + "|" + relative_posix_path)[:16], 16) mod K
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path, PurePosixPath

from ..ops.validation import check_positive_int

DEFAULT_SALT = "perceive-ir-stage1"


def relative_key(path: str | os.PathLike, root: str | os.PathLike | None = None) -> str:
    """POSIX path of ``path`` relative to ``root`` (``path`` itself when relative already)."""
    path = Path(path)
    if root is not None and path.is_absolute():
        try:
            path = path.resolve().relative_to(Path(root).resolve())
        except ValueError as error:
            raise ValueError(f"path {str(path)!r} is not under the data root {str(root)!r}") from error
    if path.is_absolute():
        raise ValueError(f"path {str(path)!r} must be relative to the data root (or pass root=)")
    return PurePosixPath(*path.parts).as_posix()


def fold_of(path: str | os.PathLike, k: int = 2, *, root: str | os.PathLike | None = None,
            salt: str = DEFAULT_SALT) -> int:
    """Fold index in ``[0, k)`` of one image, stable across machines, runs and data moves."""
    check_positive_int(k, "k")
    digest = hashlib.sha256(f"{salt}|{relative_key(path, root)}".encode("utf-8")).hexdigest()
    return int(digest[:16], 16) % k


def assign_folds(entries: list[dict], k: int = 2, *, key: str = "clean", salt: str = DEFAULT_SALT) -> list[dict]:
    """Return copies of ``entries`` (dicts with relative paths) with a ``"fold"`` field from ``entry[key]``.

    Raises ``ValueError`` if a fold ends up empty (too few images for ``k`` folds).
    """
    check_positive_int(k, "k")
    out = [{**entry, "fold": fold_of(entry[key], k, salt=salt)} for entry in entries]
    sizes = [sum(1 for e in out if e["fold"] == f) for f in range(k)]
    if k > 1 and min(sizes) == 0:
        raise ValueError(f"k={k} folds over {len(out)} images left a fold empty (sizes {sizes}); use fewer folds or more images")
    return out
