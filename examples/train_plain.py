"""Train a bare backbone with L1 on the standard all-in-one data: the baseline the Perceive-IR runs are compared
with, and the smallest loop on ``train_support`` (docs/training.md).

    python examples/train_plain.py --data data/allinone --layout 3task --backbone tiny --steps 2000
    torchrun --nproc_per_node 4 examples/train_plain.py --data data/allinone --backbone restormer --bf16

``--backbone tiny`` is a built-in 3 K-parameter residual CNN (CPU smoke runs); any other name is looked up in the
example backbone registry (``examples/backbones``: ``create_backbone(name)``).
"""
from __future__ import annotations

import argparse
import logging
import math
import sys
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from examples.train_support import (  # noqa: E402
    ResumableBatchSampler, TrainingRun, add_train_args, config_from_args, distributed_job, move_to, parse_repeats,
    training_loader,
)
from perceive_components.data import LAYOUTS, AllInOneTrainSet, standard_test_sets  # noqa: E402


class TinyRestorer(nn.Module):
    """x + conv(GELU(conv(GELU(conv(x))))): a residual CNN of ``width`` channels for smoke tests."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.GELU(), nn.Conv2d(width, width, 3, padding=1),
                                  nn.GELU(), nn.Conv2d(width, 3, 3, padding=1))

    def forward(self, degraded: torch.Tensor) -> torch.Tensor:
        return degraded + self.body(degraded)


def build_backbone(name: str) -> nn.Module:
    if name == "tiny":
        return TinyRestorer()
    from examples.backbones import create_backbone

    return create_backbone(name)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="data root holding train/ (and test/ for validation)")
    parser.add_argument("--layout", default="3task", choices=sorted(LAYOUTS))
    parser.add_argument("--backbone", default="tiny", help="'tiny' or a name of the examples/backbones registry")
    parser.add_argument("--crop-size", type=int, default=256)
    parser.add_argument("--repeat", nargs="*", default=[], metavar="TASK=N", help="override task repeat factors")
    parser.add_argument("--val", action=argparse.BooleanOptionalAction, default=None,
                        help="validate on <data>/test (default: if that folder exists)")
    return add_train_args(parser)


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    args = build_parser().parse_args(argv)
    config = config_from_args(args)
    with distributed_job(config) as env:  # torchrun's process group (or one process), logs, train.log
        torch.manual_seed(config.seed)  # the same initial weights in every process
        model = build_backbone(args.backbone)
        train_set = AllInOneTrainSet(args.data, args.layout, crop_size=args.crop_size,
                                     repeats=parse_repeats(args.repeat), positive=False)
        validate = (Path(args.data) / "test").is_dir() if args.val is None else args.val
        val_sets = standard_test_sets(args.data, args.layout) if validate else {}
        sampler = ResumableBatchSampler(len(train_set), config.batch_size, rank=env.rank, world_size=env.world_size,
                                        seed=config.seed)
        loader = training_loader(train_set, sampler, config, env)
        logging.info("%s: %d trainable parameters; training items per epoch %s", args.backbone,
                     sum(p.numel() for p in model.parameters()), train_set.counts())
        with TrainingRun(model, config, env, steps_per_epoch=sampler.steps_per_epoch,
                         data_record={"items": len(train_set), "batch": config.batch_size, "seed": config.seed}) as run:
            device_ids = [env.device.index] if env.device.type == "cuda" else None
            ddp = nn.parallel.DistributedDataParallel(model, device_ids=device_ids) if env.distributed else model
            batches = run.batches(loader)
            while run.step < config.steps:
                batch = move_to(next(batches), env.device)
                with torch.autocast(env.device.type, dtype=torch.bfloat16, enabled=config.bf16):
                    loss = F.l1_loss(ddp(batch["degraded"]).float(), batch["target"])
                loss.backward()
                run.update(loss, {}, torch.nn.utils.clip_grad_norm_(run.parameters, config.grad_clip or math.inf))
                if run.due(config.ckpt_every):
                    run.save()
                if run.due(config.val_every):
                    run.validate(val_sets)
            run.export_weights()
        return run.metrics


if __name__ == "__main__":
    main()
