"""The Perceive-IR paper's own network (SPEC.md §3.4: Restormer-style, ETB + PGM on the bottleneck and the
three decoder levels, CFE and a frozen DINOv2-B inside; 33,901,111 trainable parameters), trained with
L1 + 0.1·L_cl + 0.05·L_clip + 0.1·L_dpl and proxy negatives from a render cache (SPEC.md §2, §4). It
computes its own guidance, so it is not wrapped in PerceiveAdapter.

    python examples/train_perceive_ir_net.py --data /data/allinone --perceiver runs/stage1/perceiver \\
        --proxy-cache runs/proxy-cache --out-dir runs/perceive-ir-3task
    torchrun --standalone --nproc_per_node 4 examples/train_perceive_ir_net.py (same flags)

Start from the authors' released weights with ``--init-backbone model.pth``. Everything else:
docs/training.md, "Stage 2: the Perceive-IR recipe".
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Sequence

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from examples.common.perceive_recipe import Recipe, command_line, run  # noqa: E402

RECIPE = Recipe(backbone="perceive-ir-net", description=__doc__)


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    return run(RECIPE, argv)


if __name__ == "__main__":
    command_line(main)
