"""Content fingerprints of stage-1 inputs, so that no stored result is reused for other data.

Stage 1 resumes by reusing what it finds in its output folder (fold models, medium images). Names alone
cannot tell whether they were made from the images now under those names, so every stored result carries
the SHA-256 of what it was made from:

- ``pairs.jsonl`` / ``triplets.jsonl`` rows: ``degraded_sha256`` and ``clean_sha256`` of the files;
- a fold model (``fold<k>.safetensors`` metadata): the fingerprint of its training pairs and settings;
- a medium image (PNG text chunk): its degraded file's hash, the rendering fold model's weights
  (``ops.checkpoint.state_sha256``) and the render settings;
- a ``run_stage1`` folder (``recipe.json``): the fold models' architecture (``architecture_sha256``).

    file hash      = sha256(file bytes)
    rows hash      = sha256(JSON of the sorted (degraded, clean, task, fold, file hashes) rows)
    weights hash   = sha256(for each state-dict entry in order: name, dtype, shape, raw bytes)
    architecture   = sha256(for each state-dict entry in order: name, dtype, shape)
"""
from __future__ import annotations

import hashlib
import json
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

from torch import nn

ROW_KEYS = ("degraded", "clean", "task", "fold", "degraded_sha256", "clean_sha256")
_memo: dict[tuple[str, int, int], str] = {}  # (absolute path, size, mtime_ns) → sha256, for this process
_memo_lock = threading.Lock()


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes (hex); remembered for this process while its size and mtime stay the same."""
    stat = os.stat(path)
    key = (os.path.abspath(path), stat.st_size, stat.st_mtime_ns)
    with _memo_lock:
        if key in _memo:
            return _memo[key]
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    with _memo_lock:
        _memo[key] = digest.hexdigest()
    return _memo[key]


def with_file_digests(rows: Sequence[dict], data_root: str | os.PathLike, workers: int = 8) -> list[dict]:
    """Copies of pair ``rows`` with ``degraded_sha256`` and ``clean_sha256`` (files hashed in threads)."""
    root = Path(data_root)
    paths = sorted({root / row[key] for row in rows for key in ("degraded", "clean")})
    with ThreadPoolExecutor(max_workers=workers) as pool:
        digests = dict(zip(paths, pool.map(file_sha256, paths)))
    return [{**row, "degraded_sha256": digests[root / row["degraded"]], "clean_sha256": digests[root / row["clean"]]}
            for row in rows]


def rows_fingerprint(rows: Sequence[dict]) -> str:
    """SHA-256 of the rows' paths, tasks, folds and file hashes (order-independent)."""
    records = sorted(json.dumps({key: row.get(key) for key in ROW_KEYS}, sort_keys=True) for row in rows)
    return hashlib.sha256("\n".join(records).encode("utf-8")).hexdigest()


def architecture_sha256(module: nn.Module) -> str:
    """SHA-256 of a module's state-dict layout: names, dtypes and shapes in order (not the values), so two
    models of one architecture and configuration agree whatever their weights."""
    layout = [f"{name}|{tensor.dtype}|{tuple(tensor.shape)}" for name, tensor in module.state_dict().items()]
    return hashlib.sha256("\n".join(layout).encode("utf-8")).hexdigest()
