"""Frozen VGG feature taps for the difficulty-adaptive perceptual loss (docs/method.md §2.2).

    x̂      = (clamp01(x) − μ_ImageNet) / σ_ImageNet
    taps   = [relu1_2(x̂), relu2_2(x̂), relu3_1(x̂), relu3_3(x̂)]       (default, authors' effective taps)

The VGG ``features`` stack is cut right after the deepest tap (relu3_3 = ``features.15`` of VGG-16:
1,735,488 parameters instead of 138 M), so nothing past it ever runs. ReLU layers are named by block
(a block ends at each max-pool) and by position inside the block: ``relu{block}_{index}``. The VGG
ReLUs are in place, so the taps are taken at ReLU *outputs*: the layer after a ReLU is a conv or a
pool, which never writes into its input.

Images of any floating dtype are computed in the VGG's dtype (a float64 ``restored`` runs through the float32
VGG; its gradient flows back in float64); under autocast the convolutions then cast as usual.
"""
from __future__ import annotations

import copy
import logging
from typing import Sequence

import torch
from torch import nn

from ..ops.validation import as_parameter_dtype

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_VGG = "vgg16.tv_in1k"
DEFAULT_TAPS = ("relu1_2", "relu2_2", "relu3_1", "relu3_3")


def relu_names(features: nn.Sequential) -> dict[str, int]:
    """Map ``relu{block}_{index}`` → position in ``features`` (blocks are separated by max-pools)."""
    names, block, index = {}, 1, 0
    for position, layer in enumerate(features):
        if isinstance(layer, nn.ReLU):
            index += 1
            names[f"relu{block}_{index}"] = position
        elif isinstance(layer, (nn.MaxPool2d, nn.AvgPool2d)):
            block, index = block + 1, 0
    return names


def _features_of(vgg: nn.Module) -> nn.Sequential:
    features = getattr(vgg, "features", vgg)
    if not isinstance(features, nn.Sequential):
        raise TypeError(
            "vgg must be a timm/torchvision VGG (with a .features nn.Sequential), an nn.Sequential of VGG layers "
            f"or a VGGFeatures, got {type(vgg).__name__}"
        )
    return features


class VGGFeatures(nn.Module):
    """``forward(images (B, 3, H, W) in [0, 1]) -> [taps (B, C_l, H_l, W_l)]`` of a truncated VGG.

    Args:
        vgg: a timm model name (default ``vgg16.tv_in1k``, built with ``pretrained``), a built VGG with
            a ``.features`` stack, or such a stack itself (tiny stand-ins in tests).
        taps: ReLU names, shallow to deep.
        pretrained: load ImageNet weights when ``vgg`` is a name (the default for users; tests pass
            ``False`` or an instance).
    """

    def __init__(self, vgg: str | nn.Module = DEFAULT_VGG, taps: Sequence[str] = DEFAULT_TAPS,
                 pretrained: bool = True) -> None:
        super().__init__()
        if isinstance(vgg, str):
            vgg = _create_vgg(vgg, pretrained)
        available = relu_names(_features_of(vgg))
        taps = tuple(taps)
        unknown = [name for name in taps if name not in available]
        if not taps or unknown:
            raise ValueError(f"taps must be ReLU names of the VGG, one of {list(available)}; "
                             f"got unknown {unknown or taps}")
        positions = [available[name] for name in taps]
        if positions != sorted(set(positions)):
            raise ValueError(f"taps must be distinct and ordered shallow to deep, got {taps}")
        self.taps = taps
        self.tap_positions = tuple(positions)
        self.features = copy.deepcopy(_features_of(vgg)[: positions[-1] + 1])  # truncated after the last tap
        # float64 constants, cast to the input's dtype at use (exact in float64 checks)
        for name, value in (("mean", IMAGENET_MEAN), ("std", IMAGENET_STD)):
            self.register_buffer(name, torch.tensor(value, dtype=torch.float64).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        images = as_parameter_dtype(images, self.features)
        x = (images - self.mean.to(images.dtype)) / self.std.to(images.dtype)
        wanted, outputs = set(self.tap_positions), []
        for position, layer in enumerate(self.features):
            x = layer(x)
            if position in wanted:
                outputs.append(x)
        return outputs


def _create_vgg(name: str, pretrained: bool) -> nn.Module:
    import timm

    try:
        return timm.create_model(name, pretrained=pretrained)
    except (RuntimeError, OSError) as error:  # offline / no network / missing cache
        raise RuntimeError(
            f"could not build VGG {name!r} with pretrained={pretrained}: {error}. Download the weights once with "
            "network access (HF_HUB_OFFLINE unset), point HF_HOME at a cache that holds them, or build the VGG "
            "yourself and pass it as vgg=…"
        ) from error


def as_vgg_features(vgg: str | nn.Module, taps: Sequence[str] = DEFAULT_TAPS, pretrained: bool = True) -> VGGFeatures:
    """Return ``vgg`` if it already is a ``VGGFeatures``, else build one from the name or model."""
    if isinstance(vgg, VGGFeatures):
        if tuple(taps) != vgg.taps:
            raise ValueError(f"the given VGGFeatures taps {vgg.taps} differ from taps={tuple(taps)}")
        return vgg
    return VGGFeatures(vgg, taps, pretrained)
