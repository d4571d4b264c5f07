"""Example backbones for perceive-components: fresh re-implementations with upstream module names.

>>> from examples.backbones import create_backbone
>>> model = create_backbone("restormer-tiny")
>>> model.decoder_levels()
{'latent': 32, 'decoder_level3': 16, 'decoder_level2': 8, 'decoder_level1': 8}

Registered names (``list_backbones()``):

- ``restormer``: Restormer (CVPR 2022), upstream default config, 26,126,644 parameters
- ``nafnet``: NAFNet (ECCV 2022), SIDD width-32 config, 29,159,715 parameters
- ``promptir``: PromptIR (NeurIPS 2023), released all-in-one config, 35,592,263 parameters
- ``perceive-ir-net``: the Perceive-IR paper's own network (docs/method.md §3.4), 33,901,111 parameters, with its
  CFE and a frozen DINOv2-B (SGM) inside
- ``<name>-tiny``: the same architecture at test size (under 100,000 parameters; ``perceive-ir-net-tiny``:
  0.5 M, 0.2 M of them the fixed-width CFE, with a random 2-block DINOv2), for tests and CPU demos

Official checkpoints: see ``checkpoints.py``. Licences: docs/backbones.md.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .base import RestorationBackbone
from .checkpoints import CheckpointError, load_checkpoint, save_official_checkpoint
from .nafnet import CONFIGS as NAFNET_CONFIGS
from .nafnet import NAFNet
from .perceive_ir_net import CONFIGS as PERCEIVE_IR_NET_CONFIGS
from .perceive_ir_net import PerceiveIRNet
from .promptir import CONFIGS as PROMPTIR_CONFIGS
from .promptir import PromptIR
from .restormer import CONFIGS as RESTORMER_CONFIGS
from .restormer import Restormer

__all__ = [
    "BackboneEntry", "CheckpointError", "NAFNet", "PerceiveIRNet", "PromptIR", "Restormer", "RestorationBackbone",
    "create_backbone", "get_backbone_entry", "list_backbones", "load_checkpoint", "register_backbone",
    "save_official_checkpoint",
]


@dataclass(frozen=True)
class BackboneEntry:
    """A registered backbone: its class, the config it is built with, and notes for users."""

    name: str
    cls: type[RestorationBackbone]
    config: dict[str, Any] = field(default_factory=dict)
    description: str = ""
    upstream_licence: str = ""


_REGISTRY: dict[str, BackboneEntry] = {}


def register_backbone(entry: BackboneEntry) -> None:
    """Add ``entry`` under ``entry.name``; a name can be registered once."""
    if entry.name in _REGISTRY:
        raise ValueError(f"backbone {entry.name!r} is already registered")
    _REGISTRY[entry.name] = entry


def list_backbones() -> list[str]:
    return sorted(_REGISTRY)


def get_backbone_entry(name: str) -> BackboneEntry:
    if name not in _REGISTRY:
        raise ValueError(f"unknown backbone {name!r}; registered backbones: {list_backbones()}")
    return _REGISTRY[name]


def create_backbone(name: str, **overrides: Any) -> RestorationBackbone:
    """Build the registered backbone ``name`` with its config, any key replaced by ``overrides``.

    Weights are random (PyTorch's default initialisation, as upstream); load trained ones with
    ``load_checkpoint(model, path)``. Unknown override keys raise ``ValueError`` listing the valid ones.
    """
    entry = get_backbone_entry(name)
    unknown = sorted(set(overrides) - set(entry.config))
    if unknown:
        raise ValueError(f"unknown config key(s) {unknown} for backbone {name!r}; valid keys: {sorted(entry.config)}")
    return entry.cls(**{**entry.config, **overrides})


_NON_COMMERCIAL = "academic, non-commercial (upstream code and released weights)"
for _name, _cls, _configs, _what, _licence in (
    ("restormer", Restormer, RESTORMER_CONFIGS, "Restormer (CVPR 2022), upstream default config", _NON_COMMERCIAL),
    ("nafnet", NAFNet, NAFNET_CONFIGS, "NAFNet (ECCV 2022), SIDD width-32 config", "MIT"),
    ("promptir", PromptIR, PROMPTIR_CONFIGS, "PromptIR (NeurIPS 2023), released all-in-one config", _NON_COMMERCIAL),
    ("perceive-ir-net", PerceiveIRNet, PERCEIVE_IR_NET_CONFIGS, "Perceive-IR (TIP 2025) network, authors' config",
     "Apache-2.0 (the authors' repository; DINOv2 weights: Apache-2.0)"),
):
    register_backbone(BackboneEntry(_name, _cls, _configs["default"], _what, _licence))
    register_backbone(BackboneEntry(f"{_name}-tiny", _cls, _configs["tiny"], f"{_what} at test size", _licence))
