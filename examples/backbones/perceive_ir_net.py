"""The Perceive-IR paper's own restoration network (docs/method.md §3.4), built from the library's modules.

A Restormer-style U-Net whose bottleneck and decoder levels are ETB stages guided by PGM. Module names at
the top level follow the authors' release (House-yuyu/Perceive-IR ``src/perceiveIR/model.py``); inside
the blocks the library's names are used and ``upstream_key_map()`` renames them, so the authors'
checkpoints load with ``strict=True`` (``examples/backbones/checkpoints.py``). Layout (C = ``dim`` = 48,
``@1/s`` = resolution divided by s; I = the degraded image)::

    guidance = net.guide(I, positive=I⁺)                    the library's Guidance value (as PerceiveAdapter):
    Z          = CFE(I)                                     cfe            (B, 128), ‖Z‖ = 1   (Z⁺ = CFE(I⁺))
    F_1 … F_4  = SGM(I)   DINOv2 CLS tokens of blocks 1/4/8/12 (frozen, no grad)      (B, 768) each
    e1 = Enc1(Conv3x3(I))                                   embed, encoder1          C  @1
    e2 = Enc2(Down(e1));  e3 = Enc3(Down(e2))               down1, encoder2 …       2C @1/2, 4C @1/4
    x4 = Down(e3);        d4 = Latent(x4, PGM_4(x4, F_4, Z))          down3, latent, pgm.3   8C @1/8
    x3 = Conv1x1([Up(d4), e3]);  d3 = Dec3(x3, PGM_3(x3, F_3, Z))     up3, reduce3, decoder3 4C @1/4
    x2 = Conv1x1([Up(d3), e2]);  d2 = Dec2(x2, PGM_2(x2, F_2, Z))     up2, reduce2, decoder2 2C @1/2
    x1 = Conv1x1([Up(d2), e1]);  d1 = Dec1(x1, PGM_1(x1, F_1, Z))     up1, reduce1, decoder1  C @1
    R  = Conv3x3(Refine(d1)) + I                            refinement, output

- Encoder and refinement: plain Restormer blocks ``x ← x + MDTA(LN(x)); x ← x + GDFN(LN(x))``.
- ``PGM_l``: ``Y = X ⊙ (1 + γ) + β`` with ``[γ, β] = MLP([F_l, Z])`` (docs/method.md §3.2, code form). Y is computed
  once per level and shared by every ETB of that level.
- ETB (docs/method.md §3.3, code form): ``c = PGCA(LN(x), LN(Y)); x' = Y + MDTA(LN(c)); x'' = x' + GDFN(LN(x'))``.
- Unlike Restormer: decoder level 1 and the refinement run at C = 48 channels (after a 1x1 reduce, where
  Restormer keeps 96), every convolution has a bias, and the down/up convolutions too.

The default config has 33,901,111 trainable parameters (CFE and the four PGMs included), exactly the
authors' release; the frozen DINOv2 is held by ``SGM`` (a ``FrozenHolder``) and is in neither
``parameters()`` nor ``state_dict()``.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from torch import nn

from perceive_components.guidance import Guidance, check_guidance, compute_guidance
from perceive_components.ops.validation import set_value_checks
from perceive_components.modules import CFE, ETB, GDFN, MDTA, PGCA, PGM, SGM, LayerNorm2d, RestormerBlock
from perceive_components.modules import DEFAULT_DINOV2

from .base import RestorationBackbone

CONFIGS: dict[str, dict[str, Any]] = {
    "default": dict(dim=48, blocks=(4, 6, 6, 8), heads=(1, 2, 4, 8), refinement_blocks=4, ffn_expansion_factor=2.66,
                    semantic_dim=768, embed_dim=128, dinov2=DEFAULT_DINOV2, dinov2_pretrained=True,
                    dinov2_blocks=(1, 4, 8, 12), dinov2_image_size=224, dinov2_kwargs=None,
                    dinov2_position_embedding="timm", etb_form="code", pgm_form="code"),
    # A random 2-block, 32-wide DINOv2 at 56 px: tests and CPU demos, nothing to download.
    "tiny": dict(dim=8, blocks=(1, 1, 1, 1), heads=(1, 1, 2, 2), refinement_blocks=1, ffn_expansion_factor=2.66,
                 semantic_dim=32, embed_dim=128, dinov2="vit_small_patch14_dinov2.lvd142m", dinov2_pretrained=False,
                 dinov2_blocks=(1, 1, 2, 2), dinov2_image_size=56,
                 dinov2_kwargs={"depth": 2, "embed_dim": 32, "num_heads": 2}, dinov2_position_embedding="timm",
                 etb_form="code", pgm_form="code"),
}

# Library child name -> the authors' name, per module class (everything else is named as upstream).
UPSTREAM_CHILD_NAMES: dict[type, dict[str, str]] = {
    RestormerBlock: {"attn": "attention"},
    MDTA: {"qkv_dwconv": "qkv_dw", "project_out": "project"},
    GDFN: {"dwconv": "depthwise"},
    LayerNorm2d: {"weight": "body.weight", "bias": "body.bias"},
    ETB: {"norm_x": "norm1", "norm_guidance": "guidance_norm", "pgca": "attention", "norm_attn": "mdta_norm",
          "norm_ffn": "norm2"},
    PGCA: {"to_q": "q", "to_kv": "kv", "project_out": "project"},
    CFE: {"encoder": "body"},
    PGM: {"mlp": "affine"},
}


class Downsample(nn.Module):
    """``(B, C, H, W) → (B, 2C, H/2, W/2)``: Conv3x3 (with bias) to C/2 channels, then PixelUnshuffle(2)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(channels, channels // 2, 3, padding=1), nn.PixelUnshuffle(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class Upsample(nn.Module):
    """``(B, C, H, W) → (B, C/2, 2H, 2W)``: Conv3x3 (with bias) to 2C channels, then PixelShuffle(2)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(channels, channels * 2, 3, padding=1), nn.PixelShuffle(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class GuidedStage(nn.Module):
    """``depth`` ETBs sharing one guidance: ``(x, Y) (B, C, H, W) each -> (B, C, H, W)``."""

    def __init__(self, channels: int, heads: int, depth: int, expansion: float, form: str) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(ETB(channels, heads, expansion, bias=True, form=form) for _ in range(depth))

    def forward(self, x: torch.Tensor, guidance: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x, guidance)
        return x


def _plain_stage(channels: int, heads: int, depth: int, expansion: float) -> nn.Sequential:
    return nn.Sequential(*(RestormerBlock(channels, heads, expansion, bias=True) for _ in range(depth)))


class PerceiveIRNet(RestorationBackbone):
    """Perceive-IR's network: ``degraded (B, 3, H, W) in [0, 1] -> restored (B, 3, H, W)``, H, W multiples of 8.

    Args:
        dim, blocks, heads, refinement_blocks: as the authors' ``PerceiveIR`` (48, (4,6,6,8), (1,2,4,8), 4).
        ffn_expansion_factor: GDFN expansion (2.66). embed_dim: width of Z (128).
        semantic_dim: width of the DINOv2 priors (768 for ViT-B/14); must equal the SGM's.
        dinov2: a timm DINOv2 name, a built ``SGM`` (4 blocks), or None (then pass a ``guidance`` with priors).
        dinov2_pretrained, dinov2_blocks, dinov2_image_size, dinov2_kwargs, dinov2_position_embedding: how the SGM
            is built from a name (``SGM(name, pretrained, blocks, image_size, model_kwargs=…,
            position_embedding=…)``; ``"hf"`` resamples the position grid as the authors' Hugging Face DINOv2).
        etb_form, pgm_form: ``"code"`` (authors' code, default) or ``"figure"`` (the paper's figure), docs/method.md §3.2-3.3.

    ``guide(degraded, positive=view)`` returns the ``Guidance`` (Z, Z⁺, priors) that ``forward(degraded,
    guidance=…)`` and the contrastive loss take — the same value and code path as ``PerceiveAdapter``.
    """

    family = "Perceive-IR net"
    checkpoint_format = "perceive-ir"

    def __init__(
        self,
        dim: int = 48,
        blocks: Sequence[int] = (4, 6, 6, 8),
        heads: Sequence[int] = (1, 2, 4, 8),
        refinement_blocks: int = 4,
        ffn_expansion_factor: float = 2.66,
        semantic_dim: int = 768,
        embed_dim: int = 128,
        dinov2: str | SGM | None = DEFAULT_DINOV2,
        dinov2_pretrained: bool = True,
        dinov2_blocks: Sequence[int] = (1, 4, 8, 12),
        dinov2_image_size: int = 224,
        dinov2_kwargs: Mapping[str, Any] | None = None,
        dinov2_position_embedding: str = "timm",
        etb_form: str = "code",
        pgm_form: str = "code",
    ) -> None:
        if len(blocks) != 4 or len(heads) != 4:
            raise ValueError(f"blocks and heads need 4 entries (3 levels + latent), got {tuple(blocks)}, "
                             f"{tuple(heads)}")
        sgm = _build_sgm(dinov2, dinov2_pretrained, dinov2_blocks, dinov2_image_size, dinov2_kwargs, semantic_dim,
                         dinov2_position_embedding)
        super().__init__(dict(
            dim=dim, blocks=tuple(blocks), heads=tuple(heads), refinement_blocks=refinement_blocks,
            ffn_expansion_factor=ffn_expansion_factor, semantic_dim=semantic_dim, embed_dim=embed_dim,
            dinov2=dinov2 if not isinstance(dinov2, SGM) else f"SGM({dinov2.model_name})",
            dinov2_pretrained=dinov2_pretrained, dinov2_blocks=tuple(sgm.blocks if sgm else dinov2_blocks),
            dinov2_image_size=dinov2_image_size, dinov2_kwargs=dict(dinov2_kwargs) if dinov2_kwargs else None,
            dinov2_position_embedding=dinov2_position_embedding, etb_form=etb_form, pgm_form=pgm_form,
        ))
        widths = (dim, 2 * dim, 4 * dim, 8 * dim)
        expansion = ffn_expansion_factor
        self.embed = nn.Conv2d(3, dim, 3, padding=1)
        self.encoder1 = _plain_stage(widths[0], heads[0], blocks[0], expansion)
        self.down1 = Downsample(widths[0])
        self.encoder2 = _plain_stage(widths[1], heads[1], blocks[1], expansion)
        self.down2 = Downsample(widths[1])
        self.encoder3 = _plain_stage(widths[2], heads[2], blocks[2], expansion)
        self.down3 = Downsample(widths[2])

        self.cfe = CFE(embed_dim)
        self.pgm = nn.ModuleList(PGM(c, semantic_dim, embed_dim, form=pgm_form) for c in widths)  # finest first
        self.latent = GuidedStage(widths[3], heads[3], blocks[3], expansion, etb_form)

        self.up3 = Upsample(widths[3])
        self.reduce3 = nn.Conv2d(2 * widths[2], widths[2], 1)
        self.decoder3 = GuidedStage(widths[2], heads[2], blocks[2], expansion, etb_form)
        self.up2 = Upsample(widths[2])
        self.reduce2 = nn.Conv2d(2 * widths[1], widths[1], 1)
        self.decoder2 = GuidedStage(widths[1], heads[1], blocks[1], expansion, etb_form)
        self.up1 = Upsample(widths[1])
        self.reduce1 = nn.Conv2d(2 * widths[0], widths[0], 1)
        self.decoder1 = GuidedStage(widths[0], heads[0], blocks[0], expansion, etb_form)
        self.refinement = _plain_stage(widths[0], heads[0], refinement_blocks, expansion)
        self.output = nn.Conv2d(dim, 3, 3, padding=1)

        self.sgm = sgm  # no parameters, no state: the DINOv2 is held frozen inside it
        set_value_checks(self, False)  # internal CFE/PGM inputs are trusted: no reduction or host read per level

    # ------------------------------------------------------------------ metadata
    @property
    def size_factor(self) -> int:
        return 8

    def decoder_levels(self) -> dict[str, int]:
        c = self.config["dim"]
        return {"latent": 8 * c, "decoder3": 4 * c, "decoder2": 2 * c, "decoder1": c}

    def decoder_strides(self) -> dict[str, int]:
        return {"latent": 8, "decoder3": 4, "decoder2": 2, "decoder1": 1}

    def upstream_key_map(self) -> dict[str, str]:
        """``{our state_dict key: the authors' key}`` (a bijection; the tensors are the same)."""
        mapping = {}
        for key in self.state_dict():
            module: Any = self
            parts = []
            for name in key.split("."):
                parts.append(UPSTREAM_CHILD_NAMES.get(type(module), {}).get(name, name))
                module = getattr(module, name)
            mapping[key] = ".".join(parts)
        return mapping

    def upstream_config(self) -> dict[str, Any]:
        """The ``model:`` section of the authors' YAML config for this network."""
        return {key: list(self.config[key]) if isinstance(self.config[key], tuple) else self.config[key]
                for key in ("dim", "blocks", "heads", "refinement_blocks")}

    # ------------------------------------------------------------------ guidance
    def guide(self, degraded: torch.Tensor, positive: torch.Tensor | None = None) -> Guidance:
        """Z (and Z⁺ of the optional ``positive`` view, one CFE batch when the shapes agree) and the SGM priors
        ``[F_1 … F_4]`` (finest level first) of ``degraded (B, 3, H, W)``; needs the SGM (``dinov2`` not None)."""
        self._check_inputs(degraded, positive)
        if self.sgm is None:
            raise ValueError("this network was built with dinov2=None: build the Guidance yourself with priors "
                             "[F_1, F_2, F_3, F_4] and Z (perceive_components.guidance.Guidance)")
        return compute_guidance(self.cfe, self.sgm, degraded, positive)

    # ------------------------------------------------------------------ forward
    def forward(self, degraded: torch.Tensor, guidance: Guidance | None = None) -> torch.Tensor:
        """Restore ``degraded (B, 3, H, W)``; returns ``(B, 3, H, W)`` in the dtype of ``degraded`` (or wider).

        ``guidance``: from ``guide()`` — on these images, or once on the whole images these are tiles of;
        ``None`` computes it here.
        """
        if guidance is None:
            guidance = self.guide(degraded)
        else:
            self._check_inputs(degraded, None)
            check_guidance(guidance, degraded.shape[0], prior_count=4, prior_dim=self.config["semantic_dim"],
                           embed_dim=self.config["embed_dim"])
        priors, z = guidance.priors, guidance.embedding

        enc1 = self.encoder1(self.embed(degraded))
        enc2 = self.encoder2(self.down1(enc1))
        enc3 = self.encoder3(self.down2(enc2))
        x = self.down3(enc3)
        x = self.latent(x, self.pgm[3](x, priors[3], z))
        decoder = ((self.up3, self.reduce3, self.decoder3, enc3, 2), (self.up2, self.reduce2, self.decoder2, enc2, 1),
                   (self.up1, self.reduce1, self.decoder1, enc1, 0))
        for up, reduce, stage, skip, level in decoder:
            x = reduce(torch.cat([up(x), skip], dim=1))
            x = stage(x, self.pgm[level](x, priors[level], z))  # Y = PGM(X_l, F_l, Z), shared by the stage's ETBs
        return self.output(self.refinement(x)) + degraded

    def _check_inputs(self, degraded: torch.Tensor, positive: torch.Tensor | None) -> None:
        _check_image_batch(degraded, "degraded")
        self.check_input_size(degraded)
        if positive is not None:
            _check_image_batch(positive, "positive")
            if positive.shape[0] != degraded.shape[0]:
                raise ValueError(f"positive must have the batch size of degraded ({degraded.shape[0]}), "
                                 f"got {tuple(positive.shape)}")


def _check_image_batch(tensor: object, name: str) -> None:
    """Rank, channels and dtype only (no host sync); values are the caller's business."""
    if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
        got = tensor.dtype if isinstance(tensor, torch.Tensor) else type(tensor).__name__
        raise TypeError(f"{name} must be a floating-point tensor (B, 3, H, W) in [0, 1], got {got}")
    if tensor.ndim != 4 or tensor.shape[1] != 3:
        raise ValueError(f"{name} must have shape (B, 3, H, W), got {tuple(tensor.shape)}")


def _build_sgm(
    dinov2: str | SGM | None,
    pretrained: bool,
    blocks: Sequence[int],
    image_size: int,
    kwargs: Mapping[str, Any] | None,
    semantic_dim: int,
    position_embedding: str,
) -> SGM | None:
    if dinov2 is None:
        return None
    if isinstance(dinov2, str):
        sgm = SGM(dinov2, pretrained=pretrained, blocks=tuple(blocks), image_size=image_size,
                  model_kwargs=dict(kwargs or {}), position_embedding=position_embedding)
    elif isinstance(dinov2, SGM):
        sgm = dinov2
    else:
        raise TypeError(f"dinov2 must be a timm DINOv2 name, an SGM or None, got {type(dinov2).__name__}")
    if len(sgm.blocks) != 4:
        raise ValueError(f"the SGM must give 4 priors (one per guided level), got blocks {sgm.blocks}")
    if sgm.embed_dim != semantic_dim:
        raise ValueError(f"semantic_dim={semantic_dim} but the DINOv2 gives {sgm.embed_dim}-d priors; "
                         f"pass semantic_dim={sgm.embed_dim}")
    return sgm
