"""The authors' stage-2 optimisation (docs/method.md §4) as the example trainer's defaults: AdamW lr 2e-4,
weight decay 1e-4, betas (0.9, 0.999), cosine to 1e-6 over 500,000 steps, global batch 8 — in the config and
in the optimiser and schedule the training run builds from it."""
from __future__ import annotations

import math

import torch
from torch import nn

from examples.train_support import DistEnv, TrainConfig, TrainingRun


def test_stage2_defaults_reach_the_optimiser_and_the_schedule(tmp_path):
    config = TrainConfig(out_dir=str(tmp_path / "run"), workers=0, device="cpu", tensorboard=False)
    assert (config.lr, config.weight_decay, config.betas, config.min_lr) == (2e-4, 1e-4, (0.9, 0.999), 1e-6)
    assert (config.steps, config.batch_size) == (500_000, 8)
    with TrainingRun(nn.Conv2d(3, 3, 1), config, DistEnv(0, 1, 0, torch.device("cpu")), steps_per_epoch=2) as run:
        group = run.optimizer.param_groups[0]
        assert isinstance(run.optimizer, torch.optim.AdamW)
        assert (group["lr"], group["weight_decay"], group["betas"]) == (2e-4, 1e-4, (0.9, 0.999))
        assert run.schedule.segments == [(0, 2e-4, 500_000)] and run.schedule.min_lr == 1e-6
        assert run.schedule.lr_at(250_000) == 1e-6 + (2e-4 - 1e-6) * 0.5 * (1 + math.cos(math.pi / 2))
