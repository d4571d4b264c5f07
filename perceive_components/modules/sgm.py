"""SGM: semantic guidance from a frozen DINOv2 (SPEC.md §3.1).

    x   = normalize_imagenet( bicubic_resize(I, 224×224) )        I: the degraded image, any H × W
    t_b = output tokens of ViT block b (before the final norm)      b ∈ blocks = (1, 4, 8, 12)
    F_i = t_{b_i}[CLS]                                              (B, D), D = 768 for ViT-B/14

``F_1`` (block 1) guides the finest decoder level, the last one (block 12) the bottleneck. No gradients
flow; the network is held with ``FrozenHolder.hold_frozen`` (not in ``state_dict()``/``parameters()``,
follows ``.to()``). Optionally the patch tokens of the same blocks come back as maps ``(B, D, h, w)``
resized to sizes the caller asks for (e.g. each decoder level's resolution).

Default network: timm ``vit_base_patch14_dinov2.lvd142m`` (= ``facebook/dinov2-base``), built at
``img_size=224`` so timm resamples the 518-px position embedding once at load time.
"""
from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.frozen import FrozenHolder
from ..ops.validation import check_positive_int


DEFAULT_DINOV2 = "vit_base_patch14_dinov2.lvd142m"
DEFAULT_BLOCKS = (1, 4, 8, 12)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class SemanticPriors(NamedTuple):
    """``cls``: one ``(B, D)`` tensor per block; ``maps``: ``(B, D, h, w)`` each, or None.

    Both come in float32 (float64 if the SGM was moved to float64), also under bf16 autocast.
    """

    cls: list[torch.Tensor]
    maps: list[torch.Tensor] | None


def spread_blocks(depth: int, count: int) -> tuple[int, ...]:
    """Default 1-based blocks for ``count`` levels: (1, 4, 8, 12) for 4 of 12, else evenly spaced."""
    if depth == 12 and count == 4:
        return DEFAULT_BLOCKS
    if count == 1:
        return (depth,)
    return tuple(int(round(1 + i * (depth - 1) / (count - 1))) for i in range(count))


def create_dinov2(name: str, pretrained: bool, image_size: int, cache_dir: str | None, **kwargs: Any) -> nn.Module:
    """Build a timm ViT by name at ``img_size=image_size``; a failed download raises ``RuntimeError``."""
    import timm

    try:
        return timm.create_model(name, pretrained=pretrained, img_size=image_size, num_classes=0,
                                 cache_dir=cache_dir, **kwargs)
    except (RuntimeError, OSError, ValueError) as error:
        raise RuntimeError(
            f"could not build DINOv2 {name!r} (pretrained={pretrained}): {error}. Download the weights once with "
            "network access (HF_HUB_OFFLINE unset), point HF_HOME at a cache that holds them, or build the model "
            "yourself (timm.create_model(..., img_size=224)) and pass it as model=…"
        ) from error


class SGM(FrozenHolder):
    """Frozen DINOv2 semantic priors: ``images (B, 3, H, W) in [0, 1] -> [F_1 … F_n]``, each ``(B, D)``.

    Args:
        model: a timm ViT name (default DINOv2-B/14) or a built timm ``VisionTransformer``
            (it must accept ``image_size`` inputs: build it with ``img_size=image_size`` or
            ``dynamic_img_size=True``).
        pretrained: load the pretrained weights when building by name (default True).
        blocks: 1-based block indices whose CLS tokens are returned, shallow first (repeats allowed);
            an int n spreads n blocks over the depth; ``None`` = 4: (1, 4, 8, 12) for a 12-block net.
        image_size: square resize before the network (224); a multiple of the patch size.
        antialias: antialiased bicubic resize (off, as in the authors' code).
        model_kwargs: extra ``timm.create_model`` arguments (e.g. a tiny depth for tests).
    """

    def __init__(
        self,
        model: str | nn.Module = DEFAULT_DINOV2,
        pretrained: bool = True,
        blocks: Sequence[int] | int | None = None,
        image_size: int = 224,
        antialias: bool = False,
        cache_dir: str | None = None,
        model_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        check_positive_int(image_size, "image_size")
        if isinstance(model, str):
            self.model_name = model
            net = create_dinov2(model, pretrained, image_size, cache_dir, **(model_kwargs or {}))
        elif isinstance(model, nn.Module):
            self.model_name = type(model).__name__
            net = model
        else:
            raise TypeError(f"model must be a timm model name or an nn.Module, got {type(model).__name__}")
        _check_vit(net, image_size)
        depth = len(net.blocks)
        if blocks is None or (isinstance(blocks, int) and not isinstance(blocks, bool)):
            blocks = spread_blocks(depth, check_positive_int(4 if blocks is None else blocks, "blocks"))
        blocks = tuple(blocks)
        if not blocks or any(isinstance(b, bool) or not isinstance(b, int) or not 1 <= b <= depth for b in blocks):
            raise ValueError(f"blocks must be 1-based indices in [1, {depth}] (the net has {depth} blocks), got {blocks!r}")
        self.blocks = blocks
        self.embed_dim = int(net.embed_dim)
        self.image_size, self.antialias = image_size, antialias
        device = next(net.parameters()).device
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1), persistent=False)
        self.hold_frozen("encoder", net)

    def extra_repr(self) -> str:
        return f"model={self.model_name}, blocks={self.blocks}, image_size={self.image_size}, dim={self.embed_dim}"

    @torch.no_grad()
    def extract(self, images: torch.Tensor, map_sizes: Sequence[tuple[int, int]] | None = None) -> SemanticPriors:
        """CLS priors of ``self.blocks`` and, when ``map_sizes`` (one ``(h, w)`` per block) is given, the
        patch-token maps bilinearly resized to those sizes."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must have shape (B, 3, H, W), got {tuple(images.shape)}")
        if map_sizes is not None and len(map_sizes) != len(self.blocks):
            raise ValueError(f"map_sizes needs one (h, w) per block ({len(self.blocks)}), got {len(map_sizes)}")
        x = images.to(self.mean.dtype)
        if tuple(x.shape[-2:]) != (self.image_size, self.image_size):
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bicubic",
                              align_corners=False, antialias=self.antialias)
        x = (x - self.mean) / self.std
        unique = sorted(set(self.blocks))
        outputs = self.encoder.forward_intermediates(
            x, indices=[b - 1 for b in unique], return_prefix_tokens=True, norm=False, stop_early=True,
            output_fmt="NLC", intermediates_only=True,
        )
        by_block = dict(zip(unique, outputs))
        dtype = torch.promote_types(self.mean.dtype, torch.float32)  # float32 under autocast
        cls = [by_block[b][1][:, 0].to(dtype) for b in self.blocks]
        maps = None
        if map_sizes is not None:
            grid = (self.image_size // self.patch_size, self.image_size // self.patch_size)
            maps = []
            for block, size in zip(self.blocks, map_sizes):
                tokens = by_block[block][0]
                grid_map = tokens.transpose(1, 2).reshape(tokens.shape[0], -1, *grid).to(dtype)
                maps.append(F.interpolate(grid_map, size=tuple(size), mode="bilinear", align_corners=False))
        return SemanticPriors(cls, maps)

    @property
    def patch_size(self) -> int:
        size = self.encoder.patch_embed.patch_size
        return size[0] if isinstance(size, (tuple, list)) else int(size)

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        """CLS priors ``[F_1 … F_n]`` (shallow block first), each ``(B, embed_dim)``, no grad."""
        return self.extract(images).cls


def _check_vit(net: nn.Module, image_size: int) -> None:
    if not (hasattr(net, "forward_intermediates") and hasattr(net, "blocks") and hasattr(net, "patch_embed")):
        raise TypeError(f"model must be a timm VisionTransformer (DINOv2), got {type(net).__name__}")
    if getattr(net, "num_prefix_tokens", 0) < 1 or getattr(net, "cls_token", None) is None:
        raise ValueError("model has no CLS token; SGM needs the CLS token of each block")
    patch = net.patch_embed.patch_size
    patch = patch[0] if isinstance(patch, (tuple, list)) else int(patch)
    if image_size % patch:
        raise ValueError(f"image_size={image_size} must be a multiple of the patch size {patch}")
    fixed = getattr(net.patch_embed, "img_size", None)
    dynamic = getattr(net, "dynamic_img_size", False) or getattr(net.patch_embed, "dynamic_img_pad", False)
    if not dynamic and fixed is not None and tuple(fixed) != (image_size, image_size):
        raise ValueError(
            f"the DINOv2 model expects {tuple(fixed)} inputs but SGM resizes to {image_size}; build it with "
            f"img_size={image_size} or dynamic_img_size=True, or pass image_size={fixed[0]}"
        )
