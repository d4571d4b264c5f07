"""NAFNet (width 32) + Perceive-IR: the backbone wrapped in PerceiveAdapter (CFE, SGM on a frozen DINOv2-B,
one PGM per decoder level: middle_blks, decoders.0-3, five levels, so DINOv2 blocks 1/4/6/9/12;
``--pgca`` adds PGCA), trained with L1 + 0.1·L_cl + 0.05·L_clip + 0.1·L_dpl and proxy negatives from a
render cache (SPEC.md §2-§4).

    python examples/train_nafnet_perceive.py --data /data/allinone --perceiver runs/stage1/perceiver \\
        --proxy-cache runs/proxy-cache --out-dir runs/nafnet-3task
    torchrun --standalone --nproc_per_node 4 examples/train_nafnet_perceive.py (same flags)

NAFNet needs H and W divisible by 16: the adapter replicate-pads other sizes and crops the output back.
Start from official weights with ``--init-backbone NAFNet-SIDD-width32.pth``. Everything else:
docs/training.md, "Stage 2: the Perceive-IR recipe".
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Sequence

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from examples.common.perceive_recipe import Recipe, command_line, run  # noqa: E402

RECIPE = Recipe(backbone="nafnet", description=__doc__)


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    return run(RECIPE, argv)


if __name__ == "__main__":
    command_line(main)
