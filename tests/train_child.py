"""Child process of tests/test_trainer.py and tests/test_train_perceive.py: runs an example training script with
``sys.argv[1:]`` and, if asked, misbehaves at a chosen point.

CHILD_SCRIPT=plain|perceive  examples/train_plain.py (default) or examples/train_restormer_perceive.py
FREEZE_IN_SAVE_AT=k    freeze in the middle of writing the checkpoint of step k: half of its bytes are on disk (in
                       the temporary file) when the test kills the process
READY_FILE=path        written once the child is frozen
NAN_ON_RANK=r          (perceive) the network's output is NaN on rank r at training step NAN_AT_STEP (1-based)
WEIGHTS_SUM_FILE=path  (perceive) each rank writes the sum of its final trainable weights to <path>.<rank>
"""
from __future__ import annotations

import io
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from examples import train_plain, train_restormer_perceive  # noqa: E402


def freeze() -> None:
    Path(os.environ["READY_FILE"]).write_text("frozen")
    time.sleep(600)


def half_save_at(save_step: int):
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

    return half_save


def nan_on_one_rank(build, rank: int, step: int, built: list):
    """``build_network`` whose network returns NaN on ``rank`` at its ``step``-th training forward (batches of
    more than one image: the unused-parameter probe runs on a single image)."""
    def build_network(spec):
        net = build(spec)
        calls = [0]

        def poison(module, args, output):
            if not (torch.is_grad_enabled() and args[0].shape[0] > 1):
                return output
            calls[0] += 1
            return output * float("nan") if calls[0] == step and int(os.environ["RANK"]) == rank else output

        net.register_forward_hook(poison)
        built.append(net)
        return net

    return build_network


if __name__ == "__main__":
    if "FREEZE_IN_SAVE_AT" in os.environ:
        torch.save = half_save_at(int(os.environ["FREEZE_IN_SAVE_AT"]))
    if os.environ.get("CHILD_SCRIPT", "plain") == "plain":
        train_plain.main(sys.argv[1:])
    else:
        built: list = []
        if "NAN_ON_RANK" in os.environ:
            train_restormer_perceive.build_network = nan_on_one_rank(
                train_restormer_perceive.build_network, int(os.environ["NAN_ON_RANK"]),
                int(os.environ["NAN_AT_STEP"]), built)
        train_restormer_perceive.main(sys.argv[1:])
        if "WEIGHTS_SUM_FILE" in os.environ:
            total = sum(p.detach().double().sum().item() for p in built[0].parameters() if p.requires_grad)
            Path(f"{os.environ['WEIGHTS_SUM_FILE']}.{os.environ.get('RANK', '0')}").write_text(repr(total))
