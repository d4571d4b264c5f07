"""Stage-1 manifests: JSON Lines of relative paths, one image pair or triplet per line (docs/method.md §1.2).

Pair lines:    {"degraded": "noise/degraded/a.png", "clean": "noise/clean/a.png", "task": "noise", "fold": 0}
Triplet lines: the same plus "medium": "medium/noise/a.png".
Paths are relative to the data root (and the render folder for "medium"), so a manifest survives moves.
A folder layout ``ROOT/<task>/degraded/<name>`` + ``ROOT/<task>/clean/<name>`` can be scanned into pairs.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from ..ops.checkpoint import atomic_write
from ..ops.io import IMAGE_SUFFIXES


def write_jsonl(path: str | os.PathLike, rows: list[dict]) -> Path:
    """Write rows as JSON Lines, atomically."""
    path = Path(path)
    with atomic_write(path) as tmp:
        tmp.write_text("".join(json.dumps(row, sort_keys=True) + "\n" for row in rows), encoding="utf-8")
    return path


def read_jsonl(path: str | os.PathLike, required: tuple[str, ...] = ()) -> list[dict]:
    """Read JSON Lines; raises ``ValueError`` naming the line for bad JSON or a missing field."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"manifest {str(path)!r} does not exist")
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}:{number}: not valid JSON: {error}") from error
        missing = [key for key in required if key not in row]
        if missing:
            raise ValueError(f"{path}:{number}: missing field(s) {missing}")
        rows.append(row)
    if not rows:
        raise ValueError(f"manifest {str(path)!r} is empty")
    return rows


def scan_pairs(root: str | os.PathLike) -> list[dict]:
    """Pairs from the layout ``ROOT/<task>/degraded/<name>`` ↔ ``ROOT/<task>/clean/<name>``.

    Several degraded files may share one clean image by prefix: ``a_s25.png`` pairs with ``a.png`` when
    ``a_s25.png`` itself has no clean twin (the part before the last ``_`` is tried).
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"data root {str(root)!r} does not exist")
    pairs, problems = [], []
    tasks = sorted(p for p in root.iterdir() if p.is_dir())
    for task_dir in tasks:
        degraded_dir, clean_dir = task_dir / "degraded", task_dir / "clean"
        if not degraded_dir.is_dir() or not clean_dir.is_dir():
            problems.append(f"{task_dir.name}/ needs both degraded/ and clean/ folders")
            continue
        clean = {p.stem: p for p in clean_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES}
        for degraded in sorted(p for p in degraded_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
            match = clean.get(degraded.stem) or clean.get(degraded.stem.rsplit("_", 1)[0])
            if match is None:
                problems.append(f"{task_dir.name}/degraded/{degraded.name} has no clean twin in {task_dir.name}/clean/")
                continue
            pairs.append({"degraded": degraded.relative_to(root).as_posix(),
                          "clean": match.relative_to(root).as_posix(), "task": task_dir.name})
    if problems:
        raise ValueError(f"data root {str(root)!r} does not fit the layout <task>/degraded, <task>/clean:\n  "
                         + "\n  ".join(problems))
    if not pairs:
        raise ValueError(f"data root {str(root)!r} holds no <task>/degraded + <task>/clean image pairs")
    return pairs
