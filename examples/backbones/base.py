"""What every example backbone tells the rest of the project about itself.

A restoration backbone maps a degraded image ``(B, 3, H, W)`` to a restored one of the same shape. Besides
``forward`` the examples expose:

- ``size_factor``: H and W must be multiples of it (2^number of downsamplings). Callers pad to it, e.g.
  ``perceive_components.ops.tiling.pad_to_multiple(x, model.size_factor, 'replicate')``.
- ``decoder_levels()``: ``{module name: channels}`` of the decoder-level modules, deepest first
  (docs/method.md §6). These are the modules ``PerceiveAdapter`` hooks; their inputs and outputs have the same
  channel count, so the number is unambiguous.
- ``decoder_strides()``: ``{module name: downscale factor}`` of the same modules (1 = full resolution).
- ``checkpoint_format``: the layout of the upstream release, ``'basicsr'`` (``{'params': state_dict}``) or
  ``'lightning'`` (``{'state_dict': {'net.' + key: tensor}}``) or ``'perceive-ir'`` (the authors'
  ``{'model': state_dict, 'iteration': …}``); see ``checkpoints.py``.
- ``config``: the keyword arguments the model was built with (upstream argument names).
"""
from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn


class RestorationBackbone(nn.Module):
    """Base class of the example backbones (metadata only; subclasses define the network)."""

    family: ClassVar[str]  # human-readable name used in messages, e.g. "Restormer"
    checkpoint_format: ClassVar[str]  # 'basicsr', 'lightning' or 'perceive-ir'

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__()
        self.config = dict(config)

    @property
    def size_factor(self) -> int:
        raise NotImplementedError

    def decoder_levels(self) -> dict[str, int]:
        raise NotImplementedError

    def decoder_strides(self) -> dict[str, int]:
        raise NotImplementedError

    def check_input_size(self, images: torch.Tensor) -> None:
        """Raise ``ValueError`` unless ``images`` is ``(B, C, H, W)`` with H, W multiples of ``size_factor``."""
        if images.ndim != 4:
            raise ValueError(f"{self.family} expects images of shape (B, C, H, W), got {tuple(images.shape)}")
        height, width = images.shape[-2:]
        if height % self.size_factor or width % self.size_factor:
            raise ValueError(
                f"{self.family} needs H and W to be multiples of {self.size_factor}, got {height}x{width}; pad first,"
                f" e.g. perceive_components.ops.tiling.pad_to_multiple(x, {self.size_factor}, 'replicate')"
            )

    def extra_repr(self) -> str:
        return ", ".join(f"{key}={value!r}" for key, value in self.config.items())
