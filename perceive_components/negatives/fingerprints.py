"""Fingerprints of what a render cache was made from: the proxy weights and every input image.

- ``model_fingerprint``: the state dict's SHA-256 (names, dtypes, shapes, bytes), 16 hex digits.
- ``image_fingerprint``: sha1 of the input's *decoded 8-bit pixels* (size + RGB bytes). Chosen over the file
  bytes because it names exactly what the proxy saw: it does not change when a file is re-encoded losslessly,
  moved or reached through a symlink, and a data set can compute it for inputs it synthesises in memory
  (fixed-seed noise has no file in the training set) to check them against the cache. Cost: one decode per
  input, which rendering does anyway; verifying a data set decodes each input once.

Each slot keeps ``inputs.jsonl``, an append-only log of ``{"key": …, "input": <image fingerprint>}``; the
last line of a key wins. A line is appended *before* its entry is renamed into place, so every entry on disk
has its fingerprint; a line cut short by a crash is skipped when the log is read.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from torch import nn

from ..ops.checkpoint import state_sha256
from ..ops.io import to_uint8

INPUTS_LOG = "inputs.jsonl"


def model_fingerprint(model: nn.Module) -> str:
    """The first 16 hex digits of the state dict's SHA-256 (``ops.checkpoint.state_sha256``, the hash stage 1
    records too): tells renders of different weights apart."""
    return state_sha256(model)[:16]


def image_fingerprint(image: torch.Tensor) -> str:
    """sha1 of ``image (3, H, W)`` in [0, 1] as 8-bit RGB (rounded as files are written), with its size."""
    pixels = to_uint8(image)
    digest = hashlib.sha1(f"{pixels.shape[0]}x{pixels.shape[1]}:".encode())
    digest.update(pixels.tobytes())
    return digest.hexdigest()[:20]


def read_inputs_log(slot_folder: Path) -> dict[str, str]:
    """{key: input fingerprint} of a slot (empty if it has no log); malformed lines are skipped."""
    path = slot_folder / INPUTS_LOG
    if not path.is_file():
        return {}
    fingerprints = {}
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            try:
                row = json.loads(line)
                fingerprints[row["key"]] = row["input"]
            except (json.JSONDecodeError, KeyError, TypeError):
                continue
    return fingerprints


def append_inputs_log(slot_folder: Path, key: str, fingerprint: str) -> None:
    """Append one ``{"key", "input"}`` line (after a newline if a crash left the last line unfinished)."""
    path = slot_folder / INPUTS_LOG
    line = json.dumps({"key": key, "input": fingerprint}) + "\n"
    with open(path, "a+b") as handle:
        if handle.tell() > 0:
            handle.seek(-1, os.SEEK_END)
            if handle.read(1) != b"\n":
                line = "\n" + line
        handle.write(line.encode("utf-8"))
        handle.flush()
        os.fsync(handle.fileno())
