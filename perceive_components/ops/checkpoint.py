"""Atomic file writes and resumable training state: nothing a user wrote is ever half-overwritten.

``atomic_write`` writes to a temporary file in the same folder, fsyncs it and ``os.replace``s it over the
target, so a crash (even SIGKILL) leaves either the old file or the new one, never a truncated one.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import random
import tempfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path to write; on success it replaces ``path`` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp creates 0600; give the file normal permissions
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def _read_umask() -> int:
    mask = os.umask(0)  # the only portable way to read it; done once, at import
    os.umask(mask)
    return mask


_UMASK = _read_umask()


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def save_state(state: dict[str, Any], path: str | os.PathLike) -> None:
    """``torch.save`` a training state atomically (tensors, numbers, strings, lists and dicts only)."""
    with atomic_write(path) as tmp:
        torch.save(state, tmp)


ZIP_MAGIC = b"PK\x03\x04"  # torch.save writes a zip archive; anything else is not a state of ours


def load_state(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a state written by ``save_state`` with ``weights_only=True`` (no arbitrary unpickling).

    A file that is not a torch zip archive is refused before ``torch.load`` sees it (torch would try it as a
    legacy pickle and, for arbitrary bytes, warn about an unknown pickle protocol).
    """
    with open(path, "rb") as handle:
        if handle.read(len(ZIP_MAGIC)) != ZIP_MAGIC:
            raise ValueError(f"{path} is not a readable checkpoint (not a torch zip archive, so not written by "
                             "save_state)")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as error:  # truncated/garbage files raise anything from EOFError to IndexError
        raise ValueError(f"{path} is not a readable checkpoint (truncated or not written by this library): {error}") from error


def rng_state() -> dict[str, Any]:
    """The Python, NumPy and torch (CPU and CUDA) random states, in a weights_only-loadable form."""
    np_state = np.random.get_state()
    state = {
        "python": _encode_python_rng(random.getstate()),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(_decode_python_rng(state["python"]))
    np_state = state["numpy"]
    np.random.set_state(("MT19937", np_state["keys"].numpy().astype(np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _encode_python_rng(state: tuple) -> dict[str, Any]:
    version, internal, gauss = state
    return {"version": version, "internal": torch.tensor(internal, dtype=torch.int64), "gauss": gauss}


def _decode_python_rng(state: dict[str, Any]) -> tuple:
    return (state["version"], tuple(int(v) for v in state["internal"].tolist()), state["gauss"])


def state_sha256(module: torch.nn.Module) -> str:
    """SHA-256 of a module's state dict: names, dtypes, shapes and raw bytes, in state-dict order (0-dim tensors
    such as BatchNorm's ``num_batches_tracked`` included)."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        tensor = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode("utf-8"))
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
