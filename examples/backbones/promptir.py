"""PromptIR (Potlapalli et al., "PromptIR: Prompting for All-in-One Blind Image Restoration", NeurIPS 2023).

A fresh re-implementation from the published architecture (docs/method.md §6). It is Restormer (see
``restormer.py`` for the blocks) with a prompt block in front of each decoder level. Attribute names follow
the upstream release, so its Lightning checkpoints (``{'state_dict': {'net.' + key: tensor}}``) load with
``strict=True``.

Prompt generation block (P_l = ``prompt_len`` learnt components of ``prompt_dims[l]`` channels at
``prompt_sizes[l]``², initialised U(0, 1)), for a decoder feature F ``(B, C, H, W)``::

    w      = softmax(Linear_{C→L}(mean_{H,W} F))                       (B, L)
    prompt = Conv3x3(Bilinear_{H×W}(Σ_l w_l · P_l))                    (B, p, H, W)

Interaction: ``F ← Conv1x1_{C+p→C'}(TransformerBlock_{C+p}([F, prompt]))``. With C = ``dim``, the decoder
(``decoder=True``, the released model) runs::

    z   = latent(...)                                                   8C @1/8
    z   = reduce_noise_level3(noise_level3([z, prompt3(z)]))            4C @1/8   (8C + p3 → 4C)
    d3  = decoder_level3(reduce_chan_level3([up4_3(z), e3]))            4C @1/4   (Upsample of 4C gives 2C)
    d3  = reduce_noise_level2(noise_level2([d3, prompt2(d3)]))          4C @1/4   (4C + p2 → 4C)
    d2  = decoder_level2(reduce_chan_level2([up3_2(d3), e2]))           2C @1/2
    d2  = reduce_noise_level1(noise_level1([d2, prompt1(d2)]))          2C @1/2   (2C + p1 → 2C)
    d1  = decoder_level1([up2_1(d2), e1]);  out = output(refinement(d1)) + I

The encoder is Restormer's. All three ``noise_level`` blocks use ``heads[2]`` heads.

Upstream also builds six 1x1 convolutions that its forward pass never calls (``chnl_reduce1..3`` and
``reduce_noise_channel_1..3``). They are in the released checkpoints and in the 35,592,263-parameter count
of the default config, so they are kept here (``vestigial_channels`` sets their widths) and documented as
unused. Upstream's class also takes ``decoder`` (default False), but only ``decoder=True`` runs: without
the prompt path the 8C latent meets ``up4_3``, built for 4C, and the forward pass fails. The released
model is ``decoder=True``; this class always builds it (``decoder=True`` is accepted for YAML
compatibility, ``decoder=False`` is refused).
"""
from __future__ import annotations

from functools import partial
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .base import RestorationBackbone
from .restormer import Downsample, PatchEmbed, RestormerLevels, TransformerBlock, Upsample, transformer_stage

CONFIGS: dict[str, dict] = {
    "default": dict(inp_channels=3, out_channels=3, dim=48, num_blocks=(4, 6, 6, 8), num_refinement_blocks=4,
                    heads=(1, 2, 4, 8), ffn_expansion_factor=2.66, bias=False, LayerNorm_type="WithBias",
                    prompt_len=5, prompt_dims=(64, 128, 320), prompt_sizes=(64, 32, 16),
                    vestigial_channels=(64, 128, 256)),
    "tiny": dict(inp_channels=3, out_channels=3, dim=4, num_blocks=(1, 1, 1, 1), num_refinement_blocks=1,
                 heads=(1, 1, 2, 2), ffn_expansion_factor=2.66, bias=False, LayerNorm_type="WithBias",
                 prompt_len=3, prompt_dims=(4, 8, 16), prompt_sizes=(8, 4, 4),
                 vestigial_channels=(4, 8, 12)),
}


class PromptGenBlock(nn.Module):
    """Input-conditioned prompt: ``(B, C, H, W) → (B, prompt_dim, H, W)`` (equation in the module docstring)."""

    def __init__(self, prompt_dim: int, prompt_len: int, prompt_size: int, lin_dim: int) -> None:
        super().__init__()
        self.prompt_param = nn.Parameter(torch.rand(1, prompt_len, prompt_dim, prompt_size, prompt_size))
        self.linear_layer = nn.Linear(lin_dim, prompt_len)
        self.conv3x3 = nn.Conv2d(prompt_dim, prompt_dim, kernel_size=3, padding=1, bias=False)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        weights = self.linear_layer(features.mean(dim=(-2, -1))).softmax(dim=1)  # (B, L)
        components = self.prompt_param[0]  # (L, p, s, s)
        prompt = torch.einsum("bl,lchw->bchw", weights, components.to(weights.dtype))
        prompt = F.interpolate(prompt, size=features.shape[-2:], mode="bilinear", align_corners=False)
        return self.conv3x3(prompt)


class PromptIR(RestormerLevels, RestorationBackbone):
    """PromptIR, ``(B, inp_channels, H, W) → (B, out_channels, H, W)`` with H, W multiples of 8."""

    family = "PromptIR"
    checkpoint_format = "lightning"

    def __init__(self, inp_channels: int = 3, out_channels: int = 3, dim: int = 48,
                 num_blocks: Sequence[int] = (4, 6, 6, 8), num_refinement_blocks: int = 4,
                 heads: Sequence[int] = (1, 2, 4, 8), ffn_expansion_factor: float = 2.66, bias: bool = False,
                 LayerNorm_type: str = "WithBias", prompt_len: int = 5,  # noqa: N803
                 prompt_dims: Sequence[int] = (64, 128, 320), prompt_sizes: Sequence[int] = (64, 32, 16),
                 vestigial_channels: Sequence[int] = (64, 128, 256), decoder: bool = True) -> None:
        if decoder is not True:
            raise ValueError("PromptIR only runs with decoder=True (upstream's decoder=False path has mismatched"
                             f" channels at up4_3 and cannot run), got decoder={decoder!r}")
        super().__init__(dict(inp_channels=inp_channels, out_channels=out_channels, dim=dim,
                              num_blocks=tuple(num_blocks), num_refinement_blocks=num_refinement_blocks,
                              heads=tuple(heads), ffn_expansion_factor=ffn_expansion_factor, bias=bias,
                              LayerNorm_type=LayerNorm_type, prompt_len=prompt_len,
                              prompt_dims=tuple(prompt_dims), prompt_sizes=tuple(prompt_sizes),
                              vestigial_channels=tuple(vestigial_channels)))
        for name, value in (("num_blocks", num_blocks), ("heads", heads)):
            if len(value) != 4:
                raise ValueError(f"{name} needs 4 entries (3 levels + latent), got {value}")
        for name, value in (("prompt_dims", prompt_dims), ("prompt_sizes", prompt_sizes),
                            ("vestigial_channels", vestigial_channels)):
            if len(value) != 3:
                raise ValueError(f"{name} needs 3 entries (decoder levels 1, 2, 3), got {value}")
        stage = partial(transformer_stage, ffn_expansion_factor=ffn_expansion_factor, bias=bias,
                        layer_norm_type=LayerNorm_type)  # stage(width, depth, num_heads)
        block = partial(TransformerBlock, num_heads=heads[2], ffn_expansion_factor=ffn_expansion_factor,
                        bias=bias, layer_norm_type=LayerNorm_type)  # block(width)
        conv1x1 = partial(nn.Conv2d, kernel_size=1, bias=bias)
        c, (p1, p2, p3), (v1, v2, v3) = dim, prompt_dims, vestigial_channels

        self.patch_embed = PatchEmbed(inp_channels, c)
        self.prompt1 = PromptGenBlock(p1, prompt_len, prompt_sizes[0], lin_dim=2 * c)
        self.prompt2 = PromptGenBlock(p2, prompt_len, prompt_sizes[1], lin_dim=4 * c)
        self.prompt3 = PromptGenBlock(p3, prompt_len, prompt_sizes[2], lin_dim=8 * c)
        # Vestigial (never called in forward; present in the released checkpoints).
        self.chnl_reduce1, self.chnl_reduce2, self.chnl_reduce3 = conv1x1(p1, v1), conv1x1(p2, v2), conv1x1(p3, v3)
        self.reduce_noise_channel_1 = conv1x1(c + v1, c)
        self.reduce_noise_channel_2 = conv1x1(2 * c + v2, 2 * c)
        self.reduce_noise_channel_3 = conv1x1(4 * c + v3, 4 * c)

        self.encoder_level1 = stage(c, num_blocks[0], heads[0])
        self.down1_2 = Downsample(c)
        self.encoder_level2 = stage(2 * c, num_blocks[1], heads[1])
        self.down2_3 = Downsample(2 * c)
        self.encoder_level3 = stage(4 * c, num_blocks[2], heads[2])
        self.down3_4 = Downsample(4 * c)
        self.latent = stage(8 * c, num_blocks[3], heads[3])

        self.noise_level3 = block(8 * c + p3)
        self.reduce_noise_level3 = conv1x1(8 * c + p3, 4 * c)
        self.up4_3 = Upsample(4 * c)
        self.reduce_chan_level3 = conv1x1(2 * c + 4 * c, 4 * c)
        self.decoder_level3 = stage(4 * c, num_blocks[2], heads[2])

        self.noise_level2 = block(4 * c + p2)
        self.reduce_noise_level2 = conv1x1(4 * c + p2, 4 * c)
        self.up3_2 = Upsample(4 * c)
        self.reduce_chan_level2 = conv1x1(4 * c, 2 * c)
        self.decoder_level2 = stage(2 * c, num_blocks[1], heads[1])

        self.noise_level1 = block(2 * c + p1)
        self.reduce_noise_level1 = conv1x1(2 * c + p1, 2 * c)
        self.up2_1 = Upsample(2 * c)
        self.decoder_level1 = stage(2 * c, num_blocks[0], heads[0])
        self.refinement = stage(2 * c, num_refinement_blocks, heads[0])
        self.output = nn.Conv2d(2 * c, out_channels, kernel_size=3, padding=1, bias=bias)

    @staticmethod
    def _prompted(features: torch.Tensor, prompt: nn.Module, interact: nn.Module, reduce: nn.Module) -> torch.Tensor:
        """``reduce(interact([F, prompt(F)]))``: a prompt block in front of a decoder level."""
        return reduce(interact(torch.cat([features, prompt(features)], 1)))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self.check_input_size(images)
        enc1 = self.encoder_level1(self.patch_embed(images))
        enc2 = self.encoder_level2(self.down1_2(enc1))
        enc3 = self.encoder_level3(self.down2_3(enc2))
        latent = self.latent(self.down3_4(enc3))

        latent = self._prompted(latent, self.prompt3, self.noise_level3, self.reduce_noise_level3)
        dec3 = self.decoder_level3(self.reduce_chan_level3(torch.cat([self.up4_3(latent), enc3], 1)))
        dec3 = self._prompted(dec3, self.prompt2, self.noise_level2, self.reduce_noise_level2)
        dec2 = self.decoder_level2(self.reduce_chan_level2(torch.cat([self.up3_2(dec3), enc2], 1)))
        dec2 = self._prompted(dec2, self.prompt1, self.noise_level1, self.reduce_noise_level1)
        dec1 = self.refinement(self.decoder_level1(torch.cat([self.up2_1(dec2), enc1], 1)))
        return self.output(dec1) + images
