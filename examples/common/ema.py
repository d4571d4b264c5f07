"""Exponential moving average of a model's weights.

After every optimiser step:  θ_ema ← decay · θ_ema + (1 − decay) · θ   (floating-point parameters and
buffers of ``state_dict``; integer buffers are copied). ``swapped_in(model)`` runs a block with the EMA
weights loaded into the model and restores the training weights bit for bit afterwards.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn


class ModelEMA:
    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"ema decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.shadow = {name: value.detach().clone() for name, value in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        current = model.state_dict()
        floats = [name for name, value in self.shadow.items() if value.is_floating_point()]
        torch._foreach_lerp_([self.shadow[n] for n in floats], [current[n].detach() for n in floats], 1.0 - self.decay)
        for name, value in self.shadow.items():
            if not value.is_floating_point():
                value.copy_(current[name])

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.shadow

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if state.keys() != self.shadow.keys():
            raise ValueError("the checkpoint's EMA weights do not match the model's state_dict keys")
        for name, value in state.items():
            self.shadow[name].copy_(value)

    @contextlib.contextmanager
    def swapped_in(self, model: nn.Module) -> Iterator[nn.Module]:
        backup = {name: value.detach().clone() for name, value in model.state_dict().items()}
        model.load_state_dict(self.shadow)
        try:
            yield model
        finally:
            model.load_state_dict(backup)
