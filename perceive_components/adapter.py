"""PerceiveAdapter: Perceive-IR guidance (CFE + SGM + PGM [+ PGCA]) on any backbone, without editing it.

    guidance   = adapter.guide(I, positive=I⁺)   Z = CFE(I), Z⁺ = CFE(I⁺)       (B, 128)   docs/method.md §2.3
                                                 F_1 … F_n = SGM(I)            (B, 768)   frozen DINOv2, no grad
    restored   = adapter(I, guidance=guidance)   (or adapter(I): guidance computed inside, without Z⁺)
    at level l (a backbone module, hooked with a forward pre-hook), its input X_l becomes
    X_l ← PGM_l(X_l, F_l, Z)                      = X_l ⊙ (1 + γ_l) + β_l
    X_l ← X_l' + PGCA(LN(X_l), LN(X_l'))          only with pgca=True (X_l' = the PGM output)

The guidance is a value (``perceive_components.guidance.Guidance``): the loss takes Z and Z⁺ from it, tiled
inference computes it once per whole image, and nothing is kept on the adapter between calls. During one
forward the level hooks find it through a thread-local frame keyed by this adapter, so DataParallel replicas
(one thread each), ``copy.deepcopy`` (EMA) and nested calls each see their own.

Levels run coarse to fine: the first (bottleneck) gets the deepest DINOv2 block, the last (full
resolution) block 1. The backbone stays a plain registered submodule (``adapter.backbone``): its
parameter names and ``state_dict`` keys are exactly as before, so official checkpoints load into it.
The adapter's own weights live under ``perceive.*``; the frozen DINOv2 is in neither ``state_dict()`` nor
``parameters()``. With ``zero_init=True`` (default) the wrapped network starts as the bare backbone.
"""
from __future__ import annotations

import json
import logging
import os
import threading
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from .guidance import Guidance, check_guidance, compute_guidance
from .level_discovery import (
    coarsest_scale, default_example, discover_levels, format_candidates, resolve_levels, trace_calls,
)
from .modules.cfe import CFE
from .modules.pgca import PGCABlock
from .modules.pgm import PGM
from .modules.sgm import DEFAULT_DINOV2, SGM
from .ops.checkpoint import atomic_write
from .ops.tiling import pad_to_multiple
from .ops.validation import check_images, check_positive_int, deferred_value_checks, set_value_checks

logger = logging.getLogger(__name__)

ADAPTER_FORMAT = "perceive-components/adapter"
_frames = threading.local()  # .active: {adapter token: (adapter, guidance, visits)} for the forwards running now


def _key(name: str) -> str:
    return name.replace(".", "_")


def default_heads(channels: int) -> int:
    """Restormer's heads per width (48 → 1, 96 → 2, 192 → 4, 384 → 8), lowered to a divisor of C."""
    heads = max(1, channels // 48)
    while channels % heads:
        heads -= 1
    return heads


class PerceiveAdapter(nn.Module):
    """Wrap ``backbone`` so that each decoder level's input is modulated by PGM(F_l, Z).

    Args:
        backbone: any image-to-image ``nn.Module`` taking ``(B, 3, H, W)`` in [0, 1].
        levels: ``None`` (discover by tracing), a list of module names, or ``{name: channels}``.
        cfe: ``"code"`` / ``"figure"`` (a new CFE), a ``CFE`` instance, or None (no Z).
        sgm: a timm DINOv2 name, an ``SGM``, a built timm ViT, or None (no semantic prior).
        sgm_kwargs: arguments for ``SGM`` when it is built here (``pretrained``, ``blocks``, ``image_size``,
            ``model_kwargs`` …); ``blocks`` defaults to one per level ((1, 4, 8, 12) for four levels).
        pgca: add one ``PGCABlock`` per level after PGM (4-D levels only). pgca_heads: heads (default C/48).
        pgm_form: ``"code"`` or ``"figure"`` (docs/method.md §3.2). zero_init: start as the identity (default True).
        embed_dim: width of Z for a CFE built here (128).
        example_input / trace_size: the dummy input of the trace (default ``rand(1, 3, 64, 64)``).
        multiple: required divisor of H and W (default: the down-sampling factor seen in the trace).
        pad: replicate-pad inputs to ``multiple`` and crop the output back instead of raising.
        validate_inputs: check images for rank, range [0, 1] and finite values (one host sync).
    """

    def __init__(
        self,
        backbone: nn.Module,
        levels: Sequence[str] | Mapping[str, int] | None = None,
        *,
        cfe: str | CFE | None = "code",
        sgm: str | SGM | nn.Module | None = DEFAULT_DINOV2,
        sgm_kwargs: Mapping[str, Any] | None = None,
        pgca: bool = False,
        pgca_heads: int | None = None,
        pgm_form: str = "code",
        zero_init: bool = True,
        embed_dim: int = 128,
        example_input: torch.Tensor | None = None,
        trace_size: int = 64,
        multiple: int | None = None,
        pad: bool = False,
        validate_inputs: bool = True,
    ) -> None:
        super().__init__()
        if not isinstance(backbone, nn.Module):
            raise TypeError(f"backbone must be an nn.Module, got {type(backbone).__name__}")
        self.backbone = backbone
        example = default_example(backbone, check_positive_int(trace_size, "trace_size")) if example_input is None \
            else example_input
        calls = trace_calls(backbone, example)
        if levels is None:
            self.levels = discover_levels(calls)
            logger.info("PerceiveAdapter discovered levels (override with levels=…); candidates were:\n%s",
                        format_candidates(calls))
        else:
            self.levels = resolve_levels(backbone, calls, levels)
        self.multiple = coarsest_scale(calls) if multiple is None else check_positive_int(multiple, "multiple")
        self.pad, self.validate_inputs = pad, validate_inputs
        if len({_key(level.name) for level in self.levels}) != len(self.levels):
            raise ValueError(f"level names collide once '.' becomes '_': {[lv.name for lv in self.levels]}")

        cfe_module = _build_cfe(cfe, embed_dim)
        self.sgm = _build_sgm(sgm, dict(sgm_kwargs or {}), len(self.levels))
        prior_dim = self.sgm.embed_dim if self.sgm is not None else 0
        z_dim = cfe_module.embed_dim if cfe_module is not None else 0
        if prior_dim + z_dim == 0:
            raise ValueError("cfe and sgm are both None: the adapter would have nothing to guide the backbone with")
        self.perceive = nn.ModuleDict()
        if cfe_module is not None:
            self.perceive["cfe"] = cfe_module
        self.perceive["pgm"] = nn.ModuleDict({
            _key(level.name): PGM(level.channels, prior_dim, z_dim, form=pgm_form, zero_init=zero_init)
            for level in self.levels
        })
        if pgca:
            flat = [level.name for level in self.levels if level.scale is None]
            if flat:
                raise ValueError(f"pgca=True needs (B, C, H, W) level inputs; {flat} take token tensors")
            self.perceive["pgca"] = nn.ModuleDict({
                _key(level.name): PGCABlock(level.channels, pgca_heads or default_heads(level.channels),
                                            zero_init=zero_init)
                for level in self.levels
            })
        self.config = {
            "levels": [[level.name, level.channels] for level in self.levels], "cfe": getattr(cfe_module, "form", None),
            "embed_dim": z_dim, "sgm": getattr(self.sgm, "model_name", None),
            "sgm_blocks": list(self.sgm.blocks) if self.sgm is not None else None, "prior_dim": prior_dim,
            "pgca": bool(pgca), "pgm_form": pgm_form, "zero_init": bool(zero_init),
        }
        # Values are checked once, at this boundary (the images); CFE and PGM inside trust their inputs, so no
        # reduction or host read happens per level.
        set_value_checks(self.perceive, False)
        self._token = _FrameToken()  # copied with the adapter (deepcopy, pickle), shared by DataParallel replicas
        modules = dict(backbone.named_modules())
        self._handles = [
            modules[level.name].register_forward_pre_hook(_LevelHook(self._token, index), with_kwargs=True)
            for index, level in enumerate(self.levels)
        ]
        logger.info("PerceiveAdapter on %s:\n%s", type(backbone).__name__, self.describe())

    # ------------------------------------------------------------------ description
    @staticmethod
    def candidates(backbone: nn.Module, example_input: torch.Tensor | None = None, trace_size: int = 64) -> str:
        """A table of the modules that could be levels (traced like the constructor does), coarse first,
        followed by the levels auto-discovery would pick. Use it to choose ``levels=`` by hand."""
        example = default_example(backbone, trace_size) if example_input is None else example_input
        calls = trace_calls(backbone, example)
        try:
            picked = ", ".join(level.name for level in discover_levels(calls))
        except ValueError as error:
            picked = f"none ({error})"
        return f"{format_candidates(calls)}\nauto-discovery picks: {picked}"

    def level_blocks(self) -> list[int | None]:
        """The DINOv2 block guiding each level (coarse first), None without SGM."""
        if self.sgm is None:
            return [None] * len(self.levels)
        return list(reversed(self.sgm.blocks))

    def describe(self) -> str:
        """One line per guided level (coarse first): module, channels, scale and its DINOv2 block — for your
        logger (``logger.info("levels:\n%s", adapter.describe())``)."""
        rows = []
        for level, block in zip(self.levels, self.level_blocks()):
            scale = f"1/{level.scale}" if level.scale else "tokens"
            prior = f" <- DINOv2 block {block}" if block is not None else ""
            rows.append(f"  {level.name}: {level.channels} ch @ {scale}{prior}")
        return "\n".join(rows)

    # ------------------------------------------------------------------ forward
    @property
    def _cfe(self) -> CFE | None:
        return self.perceive["cfe"] if "cfe" in self.perceive else None

    def guide(self, images: torch.Tensor, positive: torch.Tensor | None = None) -> Guidance:
        """The guidance of ``images (B, 3, H, W)`` in [0, 1]: Z = CFE(images), the SGM priors and, with a
        ``positive`` view (``(B, 3, h, w)``, e.g. from ``paired_crops``), Z⁺ for the contrastive loss.

        Pass it to ``forward(images, guidance=…)`` and to ``QualityAwareLoss(…, guidance=…)``. Computed once
        on a whole image, it also guides each of that image's tiles."""
        with deferred_value_checks():
            self._check_batch(images, "images")
            if positive is not None:
                self._check_batch(positive, "positive")
            return compute_guidance(self._cfe, self.sgm, images, positive)

    def forward(self, images: torch.Tensor, *args: Any, guidance: Guidance | None = None, **kwargs: Any) -> Any:
        """Run the guided backbone on ``images (B, 3, H, W)`` in [0, 1]; returns the backbone's output.

        ``guidance``: from ``guide()`` (on these images, or on the whole images these are tiles of); ``None``
        computes it here (without Z⁺). Extra ``args``/``kwargs`` go to the backbone.
        """
        for moved in ("positive", "priors", "embedding"):
            if moved in kwargs:
                raise TypeError(f"{moved}= is not a forward argument: compute guidance = adapter.guide(images"
                                f"{', positive=view' if moved == 'positive' else ''}) and pass guidance=guidance")
        with deferred_value_checks():  # shapes now; values once the work is queued (no GPU pipeline stall)
            self._check_batch(images, "images")
            if guidance is None:
                guidance = compute_guidance(self._cfe, self.sgm, images)
            else:
                check_guidance(guidance, images.shape[0], prior_count=len(self.levels) if self.sgm else 0,
                               prior_dim=self.config["prior_dim"], embed_dim=self.config["embed_dim"])
            return self._guided_forward(images, args, kwargs, guidance)

    def _check_batch(self, images: object, name: str) -> None:
        """Rank, channels and a dtype the weights can take always; values too unless ``validate_inputs=False``."""
        if self.validate_inputs:
            check_images(images, name)
        elif not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"{name} must have shape (B, 3, H, W), got {getattr(images, 'shape', type(images))}")
        weight = next(self.perceive.parameters())
        if not images.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor in [0, 1], got {images.dtype} "
                            "(convert uint8 images with .float() / 255)")
        if images.dtype != weight.dtype and not torch.is_autocast_enabled(images.device.type):
            raise TypeError(f"{name} are {images.dtype} but the adapter's weights are {weight.dtype}: convert the "
                            f"images (.to({weight.dtype})), move the network (.to({images.dtype})) or run under "
                            "torch.autocast")

    def _guided_forward(self, images: torch.Tensor, args: tuple, kwargs: dict, guidance: Guidance) -> Any:
        height, width = images.shape[-2:]
        inputs = images
        if height % self.multiple or width % self.multiple:
            if not self.pad:
                raise ValueError(
                    f"images height and width must be multiples of {self.multiple} (the backbone's down-sampling "
                    f"factor), got {height}×{width}; pad them, or build the adapter with pad=True"
                )
            inputs, _ = pad_to_multiple(images, self.multiple, mode="replicate")
        priors = list(reversed(guidance.priors)) if guidance.priors is not None else [None] * len(self.levels)
        visits = [0] * len(self.levels)
        frames = _active_frames()
        outer = frames.get(self._token)
        frames[self._token] = (self, priors, guidance.embedding, visits)  # coarse-to-fine priors, like self.levels
        try:
            output = self.backbone(inputs, *args, **kwargs)
        finally:
            if outer is None:
                del frames[self._token]
            else:
                frames[self._token] = outer
        missed = [level.name for level, count in zip(self.levels, visits) if not count]
        if missed and self._handles:
            raise RuntimeError(f"levels {missed} did not run in this forward: their PGM would get no gradient")
        if inputs is not images and isinstance(output, torch.Tensor) and output.shape[-2:] == inputs.shape[-2:]:
            output = output[..., :height, :width]
        return output

    def _modulate(self, index: int, priors: list, embedding: torch.Tensor | None, visits: list[int],
                  args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        level = self.levels[index]
        key = _key(level.name)
        x = args[level.input_key] if isinstance(level.input_key, int) else kwargs[level.input_key]
        channel_dim = 1 if x.ndim == 4 else -1
        if x.ndim not in (3, 4) or x.shape[channel_dim] != level.channels:
            raise ValueError(f"level {level.name!r} expects {level.channels} input channels, got {tuple(x.shape)}")
        y = self.perceive["pgm"][key](x, priors[index], embedding)
        if "pgca" in self.perceive:
            y = self.perceive["pgca"][key](x, y)
        visits[index] += 1
        if isinstance(level.input_key, int):
            return (y, *args[1:]), kwargs
        return args, {**kwargs, level.input_key: y}

    def remove_hooks(self) -> None:
        """Detach the adapter from the backbone (the backbone then runs bare, even inside this adapter)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    # ------------------------------------------------------------------ adapter weights
    def adapter_parameters(self):
        """The adapter's own trainable parameters (CFE, PGM, PGCA), e.g. for a separate optimizer group."""
        return self.perceive.parameters()

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """Only the adapter's own weights, keyed ``perceive.*`` (as in ``self.state_dict()``)."""
        return {f"perceive.{name}": tensor for name, tensor in self.perceive.state_dict().items()}

    def save_adapter(self, path: str | os.PathLike) -> None:
        """Write the adapter's own weights and config to a safetensors file (atomically)."""
        from safetensors.torch import save_file

        tensors = {name: tensor.detach().cpu().contiguous() for name, tensor in self.adapter_state_dict().items()}
        metadata = {"format": ADAPTER_FORMAT, "config": json.dumps(self.config, sort_keys=True)}
        with atomic_write(path) as tmp:
            save_file(tensors, str(tmp), metadata=metadata)

    def load_adapter(self, path: str | os.PathLike, strict: bool = True) -> None:
        """Load weights written by ``save_adapter``; the levels and widths must match this adapter."""
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as handle:
                metadata = handle.metadata() or {}
                tensors = {name: handle.get_tensor(name) for name in handle.keys()}
        except (OSError, RuntimeError, ValueError) as error:
            raise ValueError(f"{path} is not a readable safetensors adapter file: {error}") from error
        if metadata.get("format") != ADAPTER_FORMAT:
            raise ValueError(f"{path} was not written by PerceiveAdapter.save_adapter")
        saved = json.loads(metadata["config"])
        for key in ("levels", "embed_dim", "prior_dim", "pgca", "pgm_form"):
            if saved.get(key) != self.config[key]:
                raise ValueError(f"{path}: saved {key}={saved.get(key)!r} but this adapter has {self.config[key]!r}")
        prefix = "perceive."
        stray = [name for name in tensors if not name.startswith(prefix)]
        if stray:
            raise ValueError(f"{path}: unexpected tensors {stray[:5]}")
        self.perceive.load_state_dict({name[len(prefix):]: t for name, t in tensors.items()}, strict=strict)


class _FrameToken:
    """Identifies one adapter's frames; a deepcopy of the adapter gets its own token, a replica shares it."""


def _active_frames() -> dict:
    frames = getattr(_frames, "active", None)
    if frames is None:
        frames = _frames.active = {}
    return frames


def _in_backward() -> bool:
    current = getattr(torch._C, "_current_graph_task_id", None)
    return current is not None and current() != -1


class _LevelHook:
    """Forward pre-hook of one level: modulates its input with the guidance of the adapter forward running
    in this thread (a DataParallel replica finds its own adapter and weights there). Called with no such
    forward — the backbone run on its own — it leaves the input untouched."""

    def __init__(self, token: _FrameToken, index: int) -> None:
        self.token, self.index = token, index

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict):
        frame = _active_frames().get(self.token)
        if frame is None:
            if _in_backward():
                raise RuntimeError(
                    "a PerceiveAdapter level ran while autograd recomputed an activation checkpoint that encloses "
                    "the level module: the guidance of that forward is gone by then. Checkpoint the guided call "
                    "instead — torch.utils.checkpoint.checkpoint(adapter, x, guidance=g, use_reentrant=False) — or "
                    "checkpoint the blocks inside the level")
            return None
        adapter, priors, embedding, visits = frame
        return adapter._modulate(self.index, priors, embedding, visits, args, kwargs)


def _build_cfe(cfe: str | CFE | None, embed_dim: int) -> CFE | None:
    if cfe is None or isinstance(cfe, CFE):
        return cfe
    if isinstance(cfe, str):
        return CFE(embed_dim, form=cfe)
    raise TypeError(f"cfe must be 'code', 'figure', a CFE or None, got {type(cfe).__name__}")


def _build_sgm(sgm: str | SGM | nn.Module | None, kwargs: dict, n_levels: int) -> SGM | None:
    if sgm is None:
        return None
    if isinstance(sgm, SGM):
        if kwargs:
            raise ValueError("sgm_kwargs only apply when the adapter builds the SGM; configure your SGM instead")
        if len(sgm.blocks) != n_levels:
            raise ValueError(
                f"the SGM gives {len(sgm.blocks)} priors (blocks {sgm.blocks}) but there are {n_levels} levels; "
                f"build it with blocks=<{n_levels} block indices> (or blocks={n_levels} to spread them)"
            )
        return sgm
    if isinstance(sgm, (str, nn.Module)):
        kwargs.setdefault("blocks", n_levels)
        built = SGM(sgm, **kwargs)
        if len(built.blocks) != n_levels:
            raise ValueError(f"sgm_kwargs blocks={built.blocks} must name one block per level ({n_levels})")
        return built
    raise TypeError(f"sgm must be a timm model name, an SGM, a timm ViT or None, got {type(sgm).__name__}")
