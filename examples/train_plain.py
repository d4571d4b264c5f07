"""Train a bare backbone with L1 on the standard all-in-one data, with the shared loop (docs/training.md).

The baseline the Perceive-IR recipes are compared with, and the smallest example of the loop:

    python examples/train_plain.py --data data/allinone --layout 3task --backbone tiny --steps 2000
    torchrun --nproc_per_node 4 examples/train_plain.py --data data/allinone --backbone restormer --bf16

``--backbone tiny`` is a built-in 3 K-parameter residual CNN (CPU smoke runs); any other name is looked
up in the example backbone registry (``examples/backbones``: ``create_backbone(name)``).
"""
from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from common import Trainer, add_train_args, config_from_args, parse_repeats
from perceive_components.data.layouts import LAYOUTS, AllInOneTrainSet, standard_test_sets


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
    from backbones import create_backbone  # examples/backbones registry

    return create_backbone(name)


def l1_step(model: nn.Module, batch: dict) -> torch.Tensor:
    """L1(R, G) on one batch: the bare-backbone objective."""
    return F.l1_loss(model(batch["degraded"]).float(), batch["target"])


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


def main(argv: list[str] | None = None) -> dict[str, float]:
    args = build_parser().parse_args(argv)
    main_process = int(os.environ.get("RANK", "0")) == 0
    logging.basicConfig(level=logging.INFO if main_process else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = config_from_args(args)
    torch.manual_seed(config.seed)  # the same initial weights on every process
    model = build_backbone(args.backbone)
    train_set = AllInOneTrainSet(args.data, args.layout, crop_size=args.crop_size, repeats=parse_repeats(args.repeat),
                                 positive=False)
    validate = (Path(args.data) / "test").is_dir() if args.val is None else args.val
    val_sets = standard_test_sets(args.data, args.layout) if validate else None
    if main_process:
        logging.info("%s: %d trainable parameters; training items per epoch %s", args.backbone,
                     sum(p.numel() for p in model.parameters() if p.requires_grad), train_set.counts())
    return Trainer(model, train_set, l1_step, config, val_sets=val_sets).fit()


if __name__ == "__main__":
    main()
