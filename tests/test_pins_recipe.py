"""The authors' stage-2 optimisation (docs/method.md §4) as the example trainer's defaults: AdamW lr 2e-4,
weight decay 1e-4, betas (0.9, 0.999), cosine to 1e-6 over 500,000 steps, global batch 8 — in the config and
in the optimiser and schedule the trainer builds from it."""
from __future__ import annotations

import torch
from torch import nn

from examples.common import DistEnv, TrainConfig, Trainer


class Pairs(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 16

    def __getitem__(self, index: int) -> dict:
        return {"degraded": torch.zeros(3, 4, 4), "target": torch.zeros(3, 4, 4)}


def test_stage2_defaults_reach_the_optimiser_and_the_schedule(tmp_path):
    config = TrainConfig(out_dir=str(tmp_path / "run"), workers=0, device="cpu")
    assert (config.lr, config.weight_decay, config.betas, config.min_lr) == (2e-4, 1e-4, (0.9, 0.999), 1e-6)
    assert (config.steps, config.batch_size) == (500_000, 8)
    trainer = Trainer(nn.Conv2d(3, 3, 1), Pairs(), lambda model, batch: model(batch["degraded"]).mean(), config)
    trainer.setup(DistEnv(0, 1, 0, torch.device("cpu")))
    group = trainer.optimizer.param_groups[0]
    assert isinstance(trainer.optimizer, torch.optim.AdamW)
    assert (group["lr"], group["weight_decay"], group["betas"]) == (2e-4, 1e-4, (0.9, 0.999))
    schedule = trainer.scheduler
    assert isinstance(schedule, torch.optim.lr_scheduler.CosineAnnealingLR)
    assert (schedule.T_max, schedule.eta_min) == (500_000, 1e-6)
