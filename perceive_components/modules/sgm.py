"""SGM: semantic guidance from a frozen DINOv2 (docs/method.md §3.1).

    x   = normalize_imagenet( bicubic_resize(I, 224×224) )        I: the degraded image, any H × W
    t_b = output tokens of ViT block b (before the final norm)      b ∈ blocks = (1, 4, 8, 12)
    F_i = t_{b_i}[CLS]                                              (B, D), D = 768 for ViT-B/14

``F_1`` (block 1) guides the finest decoder level, the last one (block 12) the bottleneck. No gradients
flow; the network is held with ``FrozenHolder.hold_frozen`` (not in ``state_dict()``/``parameters()``,
follows ``.to()``). Optionally the patch tokens of the same blocks come back as maps ``(B, D, h, w)``
resized to sizes the caller asks for (e.g. each decoder level's resolution).

Default network: timm ``vit_base_patch14_dinov2.lvd142m`` (= ``facebook/dinov2-base``). Its position
embedding was trained on a 37 × 37 patch grid (518 px); SGM resamples it once to the grid of the fixed input
size (16 × 16 at 224 px), in one of two ways (``position_embedding``):

    "timm"  bicubic with antialias: what timm does when it loads the weights at img_size=224 (default)
    "hf"    bicubic without antialias, in float32, to the target size: what Hugging Face transformers'
            ``Dinov2Model`` does on every forward (``Dinov2Embeddings.interpolate_pos_encoding``, version
            4.57.6, the one the authors pin), so the authors' network sees its training priors

The input size never changes, so resampling once equals resampling per forward.
"""
from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.frozen import FrozenHolder
from ..ops.validation import check_choice, check_positive_int


DEFAULT_DINOV2 = "vit_base_patch14_dinov2.lvd142m"
POSITION_EMBEDDINGS = ("timm", "hf")
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


def create_dinov2(name: str, pretrained: bool, image_size: int | None, cache_dir: str | None,
                  **kwargs: Any) -> nn.Module:
    """Build a timm ViT by name at ``img_size=image_size`` (None: the model's own, pretrained input size);
    a failed download raises ``RuntimeError``."""
    import timm

    if image_size is not None:
        kwargs["img_size"] = image_size
    try:
        return timm.create_model(name, pretrained=pretrained, num_classes=0, cache_dir=cache_dir, **kwargs)
    except (RuntimeError, OSError, ValueError) as error:
        raise RuntimeError(
            f"could not build DINOv2 {name!r} (pretrained={pretrained}): {error}. Download the weights once with "
            "network access (HF_HUB_OFFLINE unset), point HF_HOME at a cache that holds them, or build the model "
            "yourself (timm.create_model(..., img_size=224)) and pass it as model=…"
        ) from error


def resample_position_embedding(
    pos_embed: torch.Tensor, old_grid: tuple[int, int], new_grid: tuple[int, int], num_prefix: int, how: str
) -> torch.Tensor:
    """Resample a ViT position embedding ``(1, P + h·w, D) -> (1, P + h'·w', D)``; the P prefix rows (CLS) stay.

    The grid is read row-major as ``(h, w, D)`` and interpolated bicubically (align_corners=False):
    ``how="timm"`` with antialias (timm's ``resample_abs_pos_embed``), ``how="hf"`` without, computed in
    float32 and cast back, as transformers' ``Dinov2Embeddings.interpolate_pos_encoding`` (4.57.6).
    """
    check_choice(how, "position_embedding", POSITION_EMBEDDINGS)
    if tuple(old_grid) == tuple(new_grid):
        return pos_embed
    if how == "timm":
        from timm.layers import resample_abs_pos_embed

        return resample_abs_pos_embed(pos_embed, new_size=list(new_grid), old_size=list(old_grid),
                                      num_prefix_tokens=num_prefix)
    prefix, grid = pos_embed[:, :num_prefix], pos_embed[:, num_prefix:]
    grid = grid.reshape(1, *old_grid, -1).permute(0, 3, 1, 2)  # (1, D, h, w)
    grid = F.interpolate(grid.float(), size=tuple(new_grid), mode="bicubic", align_corners=False).to(pos_embed.dtype)
    return torch.cat([prefix, grid.permute(0, 2, 3, 1).reshape(1, new_grid[0] * new_grid[1], -1)], dim=1)


class SGM(FrozenHolder):
    """Frozen DINOv2 semantic priors: ``images (B, 3, H, W) in [0, 1] -> [F_1 … F_n]``, each ``(B, D)``.

    Args:
        model: a timm ViT name (default DINOv2-B/14) or a built timm ``VisionTransformer`` (with
            ``position_embedding="timm"`` it must accept ``image_size`` inputs: build it with
            ``img_size=image_size`` or ``dynamic_img_size=True``).
        pretrained: load the pretrained weights when building by name (default True).
        blocks: 1-based block indices whose CLS tokens are returned, shallow first (repeats allowed);
            an int n spreads n blocks over the depth; ``None`` = 4: (1, 4, 8, 12) for a 12-block net.
        image_size: square resize before the network (224); a multiple of the patch size.
        antialias: antialiased bicubic resize (off, as in the authors' code).
        model_kwargs: extra ``timm.create_model`` arguments (e.g. a tiny depth for tests).
        position_embedding: how the pretrained position grid is brought to ``image_size / patch``: ``"timm"``
            (antialiased bicubic) or ``"hf"`` (plain bicubic, as transformers' ``Dinov2Model``, which the
            authors' network was trained with). By name, the network is built at its pretrained input size and
            resampled here; a built network is resampled from its own grid, in place, with ``"hf"`` and used as
            it is with ``"timm"``. ``set_position_embedding`` switches later.
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
        position_embedding: str = "timm",
    ) -> None:
        super().__init__()
        check_positive_int(image_size, "image_size")
        check_choice(position_embedding, "position_embedding", POSITION_EMBEDDINGS)
        by_name = isinstance(model, str)
        if by_name:
            self.model_name = model
            net = create_dinov2(model, pretrained, None, cache_dir, **(model_kwargs or {}))
        elif isinstance(model, nn.Module):
            self.model_name = type(model).__name__
            net = model
        else:
            raise TypeError(f"model must be a timm model name or an nn.Module, got {type(model).__name__}")
        _check_vit(net, image_size, fixed_size_ok=by_name or position_embedding == "hf")
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
        # The grid the network came with (pretrained, by name), kept so the resampling can be switched later.
        self.register_buffer("source_pos_embed", net.pos_embed.detach().clone(), persistent=False)
        self.source_grid = tuple(net.patch_embed.grid_size)
        self.position_embedding = "timm"  # how the network's current grid was made (timm built it, or as given)
        self.hold_frozen("encoder", net)
        if by_name or position_embedding == "hf":
            self.set_position_embedding(position_embedding)

    def extra_repr(self) -> str:
        return (f"model={self.model_name}, blocks={self.blocks}, image_size={self.image_size}, dim={self.embed_dim}, "
                f"position_embedding={self.position_embedding}")

    def set_position_embedding(self, how: str) -> "SGM":
        """Resample the network's original position grid to ``image_size / patch`` the ``"timm"`` or ``"hf"`` way.

        Once, in place: the input size is fixed, so this equals resampling on every forward. Returns self.
        """
        net = self.encoder
        target = (self.image_size // self.patch_size,) * 2
        num_prefix = 0 if getattr(net, "no_embed_class", False) else net.num_prefix_tokens
        grid = resample_position_embedding(self.source_pos_embed, self.source_grid, target, num_prefix, how)
        if tuple(net.patch_embed.grid_size) != target:
            net.set_input_size(img_size=(self.image_size, self.image_size))  # timm's size bookkeeping
        net.pos_embed = nn.Parameter(grid.clone(), requires_grad=False)
        self.position_embedding = how
        return self

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


def _check_vit(net: nn.Module, image_size: int, fixed_size_ok: bool) -> None:
    """A timm ViT with a CLS token and an absolute position embedding; unless ``fixed_size_ok`` (SGM resamples
    its grid), it must also accept ``image_size`` inputs."""
    if not (hasattr(net, "forward_intermediates") and hasattr(net, "blocks") and hasattr(net, "patch_embed")
            and hasattr(net, "set_input_size")):
        raise TypeError(f"model must be a timm VisionTransformer (DINOv2), got {type(net).__name__}")
    if getattr(net, "num_prefix_tokens", 0) < 1 or getattr(net, "cls_token", None) is None:
        raise ValueError("model has no CLS token; SGM needs the CLS token of each block")
    if getattr(net, "pos_embed", None) is None:
        raise ValueError("model has no absolute position embedding (pos_embed); SGM expects a DINOv2-style ViT")
    patch = net.patch_embed.patch_size
    patch = patch[0] if isinstance(patch, (tuple, list)) else int(patch)
    if image_size % patch:
        raise ValueError(f"image_size={image_size} must be a multiple of the patch size {patch}")
    fixed = getattr(net.patch_embed, "img_size", None)
    dynamic = getattr(net, "dynamic_img_size", False) or getattr(net.patch_embed, "dynamic_img_pad", False)
    if not fixed_size_ok and not dynamic and fixed is not None and tuple(fixed) != (image_size, image_size):
        raise ValueError(
            f"the DINOv2 model expects {tuple(fixed)} inputs but SGM resizes to {image_size}; build it with "
            f"img_size={image_size} or dynamic_img_size=True, or pass image_size={fixed[0]}"
        )
