"""perceive-components: Perceive-IR (IEEE TIP 2025) components for any image-restoration network.

The public API is re-exported here and imported lazily, so ``import perceive_components`` stays cheap
(open_clip, timm and huggingface_hub load only when a component that needs them is used).
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "QualityPerceiver": "perceive_components.perceiver",
    "PromptLearner": "perceive_components.prompts",
    "CLIPAwareLoss": "perceive_components.losses",
    "DifficultyAdaptivePerceptualLoss": "perceive_components.losses",
    "DegradationContrastiveLoss": "perceive_components.losses",
    "QualityAwareLoss": "perceive_components.losses",
    "CFE": "perceive_components.modules",
    "SGM": "perceive_components.modules",
    "PGM": "perceive_components.modules",
    "PGCA": "perceive_components.modules",
    "ETB": "perceive_components.modules",
    "PerceiveAdapter": "perceive_components.adapter",
    "Guidance": "perceive_components.guidance",
    "load_backbone_weights": "perceive_components.weights",
    "load_weights": "perceive_components.weights",
    "backbone_state_dict": "perceive_components.weights",
    "freeze_unused_parameters": "perceive_components.ops.frozen",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'perceive_components' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
