"""Holding frozen pretrained networks outside ``state_dict()`` and ``parameters()``.

A component that uses a frozen CLIP, DINOv2, VGG or proxy restorer keeps it as a *hidden* attribute:
it follows the owner through ``.to()``, ``.cuda()``, ``.half()`` and ``.train()``/``.eval()``, is always
in eval mode with ``requires_grad=False``, yet is not a registered submodule. Checkpoints therefore stay
small, DDP sees only trainable parameters and never needs ``find_unused_parameters``.
"""
from __future__ import annotations

from typing import Iterator

import torch
from torch import nn


def freeze(module: nn.Module) -> nn.Module:
    """Set ``requires_grad=False`` on every parameter and switch to eval mode, in place."""
    module.requires_grad_(False)
    module.eval()
    return module


class FrozenHolder(nn.Module):
    """Base class for modules that own frozen networks kept out of ``state_dict`` and ``parameters``.

    Use ``self.hold_frozen("name", net)``; afterwards ``self.name`` returns the network.
    """

    def __init__(self) -> None:
        super().__init__()
        object.__setattr__(self, "_frozen_nets", {})

    def hold_frozen(self, name: str, module: nn.Module | None) -> None:
        if module is None:
            self._frozen_nets.pop(name, None)
            return
        if not isinstance(module, nn.Module):
            raise TypeError(f"{name} must be an nn.Module, got {type(module).__name__}")
        self._frozen_nets[name] = freeze(module)

    def frozen_modules(self) -> Iterator[tuple[str, nn.Module]]:
        """``(name, module)`` for each held frozen network, including those of child holders."""
        for prefix, child in self.named_modules():
            if isinstance(child, FrozenHolder):
                for name, net in child._frozen_nets.items():
                    yield (f"{prefix}.{name}" if prefix else name), net

    def __getattr__(self, name: str):
        frozen = self.__dict__.get("_frozen_nets")
        if frozen is not None and name in frozen:
            return frozen[name]
        return super().__getattr__(name)

    def _apply(self, fn, recurse: bool = True):  # .to(), .cuda(), .half(), .float() ...
        for net in self._frozen_nets.values():
            net._apply(fn)
        return super()._apply(fn, recurse)

    def train(self, mode: bool = True):
        super().train(mode)
        for net in self._frozen_nets.values():
            net.eval()  # frozen networks never leave eval mode (BatchNorm/Dropout stay fixed)
        return self


def module_device(module: nn.Module) -> torch.device:
    """Device of the first parameter or buffer of ``module`` (CPU when it has none)."""
    for tensor in module.parameters():
        return tensor.device
    for tensor in module.buffers():
        return tensor.device
    return torch.device("cpu")


def _output_sum(output: object) -> torch.Tensor | None:
    """Sum of every floating tensor in a (nested) output, or None if it holds none."""
    if isinstance(output, torch.Tensor):
        return output.float().sum() if output.is_floating_point() else None
    values = output.values() if isinstance(output, dict) else output if isinstance(output, (list, tuple)) else ()
    parts = [part for part in map(_output_sum, values) if part is not None]
    return torch.stack(parts).sum() if parts else None


def unused_parameters(module: nn.Module, example_input: torch.Tensor | None = None, *, size: int = 64) -> list[str]:
    """Names of the trainable parameters of ``module`` that get no gradient from one forward and backward of
    ``module(example_input)`` (default: a seeded ``1×3×size×size`` image). Gradients already accumulated and
    the global RNG state are left as they were."""
    from ..level_discovery import default_example

    example = default_example(module, size) if example_input is None else example_input
    trainable = {name: p for name, p in module.named_parameters() if p.requires_grad}
    saved = {name: p.grad for name, p in trainable.items()}
    devices = [example.device.index or 0] if example.device.type == "cuda" else []
    try:
        for p in trainable.values():
            p.grad = None
        with torch.random.fork_rng(devices=devices), torch.enable_grad():
            total = _output_sum(module(example))
            if total is None or not total.requires_grad:
                raise ValueError(f"{type(module).__name__}'s output does not depend on any trainable parameter")
            total.backward()
        return [name for name, p in trainable.items() if p.grad is None]
    finally:
        for name, p in trainable.items():
            p.grad = saved[name]


def freeze_unused_parameters(module: nn.Module, example_input: torch.Tensor | None = None, *,
                             size: int = 64) -> list[str]:
    """``requires_grad_(False)`` on every parameter that ``module``'s forward never uses (``unused_parameters``),
    so that ``DistributedDataParallel`` needs no ``find_unused_parameters=True``; returns their names.

    Some upstream backbones register layers their forward never calls (PromptIR's ``chnl_reduce*``,
    ``reduce_noise_channel_*``): frozen, they get no optimiser state and keep their values in checkpoints,
    which therefore still load into upstream code. Call it before building the optimiser.
    """
    names = unused_parameters(module, example_input, size=size)
    named = dict(module.named_parameters())
    for name in names:
        named[name].requires_grad_(False)
    return names
