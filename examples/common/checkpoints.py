"""Training checkpoints that survive a crash at any instant.

``<dir>/step_00001000.pt`` is written with ``save_state`` (temporary file + fsync + rename), and only
then is the pointer file ``<dir>/latest`` — itself replaced atomically — switched to it. A crash before
the rename leaves a stray ``.step_….pt.*.tmp`` (removed at the next start, never read); a crash between
the two renames leaves a complete new file that ``latest`` does not name yet. So ``latest`` always
names a complete checkpoint. The newest ``keep_last`` checkpoints are kept.
"""
from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any

from perceive_components.ops.checkpoint import atomic_write, load_state, save_state

logger = logging.getLogger(__name__)
POINTER = "latest"
_NAME = re.compile(r"^step_(\d+)\.pt$")


class CheckpointManager:
    def __init__(self, directory: str | os.PathLike, keep_last: int = 3) -> None:
        if keep_last < 1:
            raise ValueError(f"keep_last must be >= 1, got {keep_last}")
        self.directory = Path(directory)
        self.keep_last = keep_last

    def checkpoints(self) -> list[Path]:
        """Complete checkpoint files, oldest first."""
        if not self.directory.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.directory.iterdir() if (m := _NAME.match(p.name))]
        return [p for _, p in sorted(found)]

    def latest(self) -> Path | None:
        """The checkpoint ``latest`` names, or ``None`` if no checkpoint was ever completed."""
        pointer = self.directory / POINTER
        if not pointer.is_file():
            return None
        path = self.directory / pointer.read_text().strip()
        if not path.is_file():
            raise ValueError(f"{pointer} names {path.name}, which does not exist; resume from a file with --resume PATH")
        return path

    def clean_up(self, resumed_step: int) -> None:
        """Delete what a crash left behind: temporaries of an unfinished write (never complete) and
        checkpoints newer than the one resumed from (written, but ``latest`` was not switched yet)."""
        if not self.directory.is_dir():
            return
        for stray in self.directory.glob(".*.tmp"):
            stray.unlink(missing_ok=True)
        for path in self.checkpoints():
            if int(_NAME.match(path.name).group(1)) > resumed_step:
                path.unlink(missing_ok=True)

    def save(self, state: dict[str, Any], step: int) -> Path:
        path = self.directory / f"step_{step:08d}.pt"
        save_state(state, path)
        with atomic_write(self.directory / POINTER) as tmp:
            tmp.write_text(path.name + "\n")
        for old in self.checkpoints()[: -self.keep_last]:
            if old != path:
                old.unlink(missing_ok=True)
        logger.info("checkpoint %s written", path)
        return path

    @staticmethod
    def load(path: str | os.PathLike) -> dict[str, Any]:
        return load_state(path)
