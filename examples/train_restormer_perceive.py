"""Restormer + Perceive-IR: the backbone wrapped in PerceiveAdapter (CFE, SGM on a frozen DINOv2-B, one PGM
per decoder level: latent, decoder_level3, decoder_level2, decoder_level1; ``--pgca`` adds PGCA), trained
with L1 + 0.1·L_cl + 0.05·L_clip + 0.1·L_dpl and proxy negatives from a render cache (SPEC.md §2-§4).

    python examples/train_restormer_perceive.py --data /data/allinone --perceiver runs/stage1/perceiver \\
        --proxy-cache runs/proxy-cache --out-dir runs/restormer-3task
    torchrun --standalone --nproc_per_node 4 examples/train_restormer_perceive.py (same flags)
    python examples/train_restormer_perceive.py --data DIR --tiny --no-proxies --steps 20 --device cpu  # smoke

Start from official weights with ``--init-backbone restormer.pth``. Everything else (defaults, resume,
logs, evaluation): docs/training.md, "Stage 2: the Perceive-IR recipe".
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Sequence

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from examples.common.perceive_recipe import Recipe, command_line, run  # noqa: E402

RECIPE = Recipe(backbone="restormer", description=__doc__)


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    return run(RECIPE, argv)


if __name__ == "__main__":
    command_line(main)
