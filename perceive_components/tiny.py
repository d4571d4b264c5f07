"""Tiny random stand-ins for the frozen networks, for smoke tests and CI (nothing is downloaded).

Every builder is seeded on its own generator state (the caller's global RNG is left as it was), so the
same call gives the same weights in every process and on every run:

=====================  ===========================================================  ==============
builder                what it stands in for                                        parameters
=====================  ===========================================================  ==============
``tiny_clip()``        OpenAI CLIP ViT-B/32 (open_clip ``CLIP``, 64² input, width 64)  ≈ 3.5 M
``tiny_perceiver()``   ``QualityPerceiver`` on ``tiny_clip()`` (untrained prompts)      + 3·n_ctx·64
``tiny_dinov2()``      DINOv2 ViT-B/14 (timm ViT, 2 blocks, width 32, 56² input)       ≈ 45 k
``tiny_sgm()``         ``SGM`` on ``tiny_dinov2()``                                    (frozen)
``tiny_vgg()``         VGG-16 ``features`` up to relu3_3 (+1 conv), 4-6 channels        ≈ 1.9 k
=====================  ===========================================================  ==============

A perceiver on the tiny CLIP records ``clip_model="perceive-tiny-clip"``; ``QualityPerceiver.from_pretrained``
and ``create_clip`` rebuild that CLIP by name, so a saved tiny perceiver loads again anywhere.
None of these networks has learned anything: numbers computed with them show that code runs, not what the
method achieves.

    from perceive_components.tiny import tiny_perceiver, tiny_sgm, tiny_vgg
    net = PerceiveAdapter(my_backbone, sgm=tiny_sgm(blocks=4))
    criterion = QualityAwareLoss(tiny_perceiver(), tiny_vgg(), vgg_pretrained=False)
"""
from __future__ import annotations

from typing import Any, Callable, TypeVar

import torch
from torch import nn

TINY_CLIP_NAME = "perceive-tiny-clip"
TINY_CLIP_CONFIG: dict[str, Any] = dict(
    embed_dim=64,
    quick_gelu=True,
    vision_cfg=dict(image_size=64, layers=2, width=96, head_width=32, patch_size=8),
    text_cfg=dict(context_length=77, vocab_size=49408, width=64, heads=2, layers=2),  # the real BPE vocabulary
)
TINY_DINOV2_NAME = "vit_small_patch14_dinov2.lvd142m"  # the architecture family; random weights, made tiny below
TINY_DINOV2_SIZE = 56
# init_values=1: LayerScale at 1 instead of DINOv2's 1e-5, so the two random blocks differ from each other (at 1e-5
# every block is nearly the identity and a test could not tell which block's CLS token reached which level).
TINY_DINOV2_KWARGS: dict[str, Any] = dict(depth=2, embed_dim=32, num_heads=2, init_values=1.0)

T = TypeVar("T")


def _seeded(seed: int, build: Callable[[], T]) -> T:
    """``build()`` with torch's CPU generator seeded to ``seed``, restoring the caller's RNG state after."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def tiny_clip(seed: int = 0) -> nn.Module:
    """A random open_clip ``CLIP`` of ``TINY_CLIP_CONFIG`` (64² images, 64-d text width), in eval mode."""
    import open_clip

    return _seeded(seed, lambda: open_clip.CLIP(**TINY_CLIP_CONFIG)).eval()


def tiny_perceiver(n_ctx: int = 4, seed: int = 0, **kwargs: Any):
    """A ``QualityPerceiver`` with untrained prompts on ``tiny_clip(seed)`` (``clip_model`` = the tiny name)."""
    from .perceiver import QualityPerceiver

    clip = tiny_clip(seed)
    return _seeded(seed, lambda: QualityPerceiver(clip_model=TINY_CLIP_NAME, pretrained=None, n_ctx=n_ctx, clip=clip,
                                                  **kwargs))


def tiny_dinov2(seed: int = 0, **overrides: Any) -> nn.Module:
    """A random timm DINOv2-layout ViT: 2 blocks, width 32, 2 heads, 56² input (any multiple of 14 works)."""
    from .modules.sgm import create_dinov2

    kwargs = {**TINY_DINOV2_KWARGS, "dynamic_img_size": True, **overrides}
    return _seeded(seed, lambda: create_dinov2(TINY_DINOV2_NAME, False, TINY_DINOV2_SIZE, None, **kwargs))


def tiny_sgm(blocks: int | tuple[int, ...] = 4, seed: int = 0, **kwargs: Any):
    """An ``SGM`` on ``tiny_dinov2(seed)`` at 56² input; ``blocks``: one prior per guided level (an int is spread
    over the 2 blocks as ``SGM`` spreads it: 4 → (1, 1, 2, 2))."""
    from .modules.sgm import SGM

    return SGM(tiny_dinov2(seed), blocks=blocks, image_size=TINY_DINOV2_SIZE, **kwargs)


def tiny_vgg(seed: int = 0) -> nn.Sequential:
    """The VGG-16 ``features`` layout up to relu3_3 and one conv beyond, 4-6 channels wide, random weights.

    Same indices as torchvision/timm VGG-16 (relu1_2 = 3, relu2_2 = 8, relu3_1 = 11, relu3_3 = 15), so the
    perceptual loss taps the same layers as on the real network; pass it as ``vgg=`` with ``vgg_pretrained=False``.
    """
    def conv(c_in: int, c_out: int) -> nn.Conv2d:
        return nn.Conv2d(c_in, c_out, 3, padding=1)

    def build() -> nn.Sequential:
        return nn.Sequential(
            conv(3, 4), nn.ReLU(True), conv(4, 4), nn.ReLU(True), nn.MaxPool2d(2),
            conv(4, 5), nn.ReLU(True), conv(5, 5), nn.ReLU(True), nn.MaxPool2d(2),
            conv(5, 6), nn.ReLU(True), conv(6, 6), nn.ReLU(True), conv(6, 6), nn.ReLU(True), nn.MaxPool2d(2),
            conv(6, 6), nn.ReLU(True))

    return _seeded(seed, build)
