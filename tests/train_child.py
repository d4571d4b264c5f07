"""Child process of tests/test_trainer.py: runs examples/train_plain.py and, if asked, freezes at a chosen
point so that the test can SIGKILL it there.

FREEZE_IN_SAVE_AT=k    freeze in the middle of writing the checkpoint of step k: half of its bytes are on
                       disk (in the temporary file) when the process is killed
READY_FILE=path        written once the child is frozen
"""
from __future__ import annotations

import io
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

import torch  # noqa: E402

import train_plain  # noqa: E402


def freeze() -> None:
    Path(os.environ["READY_FILE"]).write_text("frozen")
    time.sleep(600)


if "FREEZE_IN_SAVE_AT" in os.environ:
    save_step = int(os.environ["FREEZE_IN_SAVE_AT"])
    real_save = torch.save

    def half_save(obj, f, *args, **kwargs):
        if isinstance(obj, dict) and obj.get("step") == save_step:
            buffer = io.BytesIO()
            real_save(obj, buffer, *args, **kwargs)
            data = buffer.getvalue()
            with open(f, "wb") as handle:
                handle.write(data[: len(data) // 2])
                handle.flush()
                os.fsync(handle.fileno())
            freeze()
        return real_save(obj, f, *args, **kwargs)

    torch.save = half_save

if __name__ == "__main__":
    train_plain.main(sys.argv[1:])
