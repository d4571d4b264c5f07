"""Training-loop settings: one dataclass, and the command-line flags generated from it.

Defaults are the authors' stage-2 recipe (SPEC.md §4): AdamW lr 2e-4, weight decay 1e-4, betas
(0.9, 0.999), cosine decay to 1e-6 over the whole run, no warm-up, global batch 8.
"""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Sequence


def _opt(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    out_dir: str = _opt("runs/train", "run folder: checkpoints/, logs, tensorboard/, grids/, curves.png")
    steps: int = _opt(500_000, "optimiser steps in the whole run (the cosine schedule spans them)")
    batch_size: int = _opt(8, "GLOBAL batch over all processes (split evenly between them)")
    lr: float = _opt(2e-4, "AdamW learning rate at step 0")
    min_lr: float = _opt(1e-6, "learning rate at the last step (cosine decay, no warm-up)")
    weight_decay: float = _opt(1e-4, "AdamW weight decay")
    betas: tuple[float, float] = _opt((0.9, 0.999), "AdamW betas")
    bf16: bool = _opt(False, "bf16 autocast around step_fn (the authors train in bf16)")
    ema_decay: float = _opt(0.0, "EMA of the weights with this decay, e.g. 0.999 (0 = off; validation then uses EMA)")
    grad_clip: float = _opt(0.0, "clip the global gradient norm to this value (0 = off; the norm is logged anyway)")
    workers: int = _opt(4, "DataLoader worker processes per training process")
    seed: int = _opt(0, "seed of the data order, draws and per-process RNGs")
    log_every: int = _opt(10, "write a CSV/TensorBoard row every N steps")
    val_every: int = _opt(5000, "validate and redraw curves.png every N steps (and at the end; 0 = only at the end)")
    ckpt_every: int = _opt(5000, "write a checkpoint every N steps (and at the end)")
    keep_last: int = _opt(3, "keep the newest N checkpoints")
    resume: str = _opt("auto", "'auto' (from <out_dir>/checkpoints/latest if present), 'never', or a checkpoint path")
    max_nonfinite: int = _opt(5, "stop after this many non-finite steps in a row (each one is skipped)")
    device: str = _opt("auto", "'auto', 'cpu', 'cuda' (torchrun: cuda:LOCAL_RANK)")
    deterministic: bool = _opt(False, "deterministic kernels (bit-exact resume on GPU; slower)")
    tensorboard: bool = _opt(True, "write TensorBoard event files")
    plots: bool = _opt(True, "redraw curves.png (matplotlib) at every validation and at the end")
    val_max_images: int = _opt(0, "validate on at most N images per set (0 = all)")
    num_grids: int = _opt(4, "sample grids saved per validation set")

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "log_every", "ckpt_every", "keep_last", "max_nonfinite"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name in ("workers", "val_every", "val_max_images", "num_grids"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        if not (self.lr > 0 and 0 <= self.min_lr <= self.lr):
            raise ValueError(f"need lr > 0 and 0 <= min_lr <= lr, got lr={self.lr}, min_lr={self.min_lr}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.grad_clip < 0 or self.weight_decay < 0:
            raise ValueError(f"grad_clip and weight_decay must be >= 0, got {self.grad_clip}, {self.weight_decay}")
        self.betas = tuple(float(b) for b in self.betas)  # type: ignore[assignment]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def add_train_args(parser: argparse.ArgumentParser, **defaults: Any) -> argparse.ArgumentParser:
    """Add one ``--flag`` per ``TrainConfig`` field (``out_dir`` → ``--out-dir``); ``defaults`` override."""
    group = parser.add_argument_group("training loop")
    for spec in dataclasses.fields(TrainConfig):
        default = defaults.pop(spec.name, spec.default)
        flag = "--" + spec.name.replace("_", "-")
        help_text = f"{spec.metadata['help']} (default: {default})"
        if isinstance(spec.default, bool):
            group.add_argument(flag, default=default, action=argparse.BooleanOptionalAction, help=spec.metadata["help"])
        elif isinstance(spec.default, tuple):
            group.add_argument(flag, default=default, nargs=len(spec.default), type=float, metavar="B", help=help_text)
        else:
            group.add_argument(flag, default=default, type=type(spec.default), help=help_text)
    if defaults:
        raise ValueError(f"unknown TrainConfig fields in defaults: {sorted(defaults)}")
    return parser


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(**{spec.name: getattr(args, spec.name) for spec in dataclasses.fields(TrainConfig)})


def parse_repeats(items: Sequence[str], flag: str = "--repeat", example: str = "rain=360") -> dict[str, int]:
    """``["rain=360", "noise=12"]`` → ``{"rain": 360, "noise": 12}``; ``ValueError`` naming ``flag`` otherwise."""
    repeats = {}
    for item in items:
        task, sep, factor = item.partition("=")
        if not task or not sep or not factor.isdigit() or int(factor) < 1:
            raise ValueError(f"{flag} takes TASK=N with N >= 1 (e.g. {example}), got {item!r}")
        repeats[task] = int(factor)
    return repeats
