"""PromptIR + Perceive-IR: the backbone wrapped in PerceiveAdapter (CFE, SGM on a frozen DINOv2-B, one PGM
per decoder level: latent, decoder_level3, decoder_level2, decoder_level1; ``--pgca`` adds PGCA), trained
with L1 + 0.1·L_cl + 0.05·L_clip + 0.1·L_dpl and proxy negatives from a render cache (SPEC.md §2-§4).

    python examples/train_promptir_perceive.py --data /data/allinone --perceiver runs/stage1/perceiver \\
        --proxy-cache runs/proxy-cache --out-dir runs/promptir-3task
    torchrun --standalone --nproc_per_node 4 examples/train_promptir_perceive.py (same flags)

PromptIR builds six 1x1 convolutions its forward never calls (``chnl_reduce1-3``,
``reduce_noise_channel_1-3``, as upstream; they are in its checkpoints). The recipe freezes them
(``requires_grad=False``: no gradient, no optimiser state, still saved; ``UNUSED_PARAMETERS``), so DDP runs
without ``find_unused_parameters``. Start from the released weights with ``--init-backbone model.ckpt``.
Everything else: docs/training.md, "Stage 2: the Perceive-IR recipe".
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Sequence

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from examples.common.perceive_recipe import Recipe, command_line, run  # noqa: E402

RECIPE = Recipe(backbone="promptir", description=__doc__)


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    return run(RECIPE, argv)


if __name__ == "__main__":
    command_line(main)
