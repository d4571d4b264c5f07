"""Load official (and our own) backbone checkpoints strictly and safely; save in the upstream layouts.

Formats read by ``load_checkpoint`` (the layout is detected, or named with ``param_key``):

- BasicSR (Restormer, NAFNet releases): ``{'params': state_dict}``, sometimes also ``'params_ema'``
  (``'params'`` is taken unless ``param_key='params_ema'``).
- PyTorch Lightning (PromptIR release): ``{'state_dict': {'net.' + key: tensor}, 'epoch': …, …}``; the
  ``net.`` prefix is removed and the other entries are ignored.
- The Perceive-IR authors' release (the paper's network, ``perceive_ir_net.py``): ``{'model': state_dict,
  'iteration': …, 'config': …}`` (training checkpoints add optimizer, scheduler and training state, which are
  ignored). Their key names are mapped to ours by the model's ``upstream_key_map()``. Their network was
  trained with Hugging Face's DINOv2, so a model with an ``sgm`` gets its position grid resampled the HF way
  (``SGM.set_position_embedding('hf')``) unless ``sgm_position_embedding='timm'`` is asked for.
- A plain state dict (``.pth``/``.pt`` or ``.safetensors``), e.g. the weights our training scripts write.

A ``module.`` prefix (saved from a DDP-wrapped model) is removed, as BasicSR does. Files are opened with
``torch.load(..., weights_only=True)`` (tensors and plain containers only; never arbitrary unpickling) and
loaded with ``load_state_dict(strict=True)``. A checkpoint that does not fit the model raises
``CheckpointError`` naming the model, the backbone the checkpoint looks like, and a few missing,
unexpected and mis-shaped keys, instead of torch's list of every key.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from perceive_components import SGM
from perceive_components.ops.checkpoint import atomic_write
from perceive_components.weights import WeightsError, read_checkpoint

# (family, key prefixes that must all occur), checked in order; the first match names the checkpoint.
FAMILY_SIGNATURES: list[tuple[str, tuple[str, ...]]] = [
    ("Perceive-IR net", ("cfe.", "pgm.", "latent.blocks.")),
    ("PromptIR", ("prompt1.prompt_param", "noise_level3.")),
    ("NAFNet", ("intro.", "ending.", "middle_blks")),
    ("Restormer", ("patch_embed.proj.", "latent.", "reduce_chan_level3.")),
]
_EXAMPLES = 3  # keys quoted per kind of mismatch
log = logging.getLogger(__name__)


class CheckpointError(WeightsError):
    """A checkpoint file cannot be read, or its tensors do not fit the model."""


def read_checkpoint_file(path: str | os.PathLike) -> Mapping[str, Any]:
    """Read ``path`` (torch file with ``weights_only=True``, or ``.safetensors``) into a mapping on the CPU: the
    library's ``perceive_components.weights.read_checkpoint``, its errors raised as ``CheckpointError``."""
    try:
        return read_checkpoint(path)
    except WeightsError as error:
        raise CheckpointError(str(error)) from error


def _strip_prefix(state: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    return {key[len(prefix):] if key.startswith(prefix) else key: value for key, value in state.items()}


def extract_state_dict(checkpoint: Mapping[str, Any], param_key: str | None = None) -> dict[str, torch.Tensor]:
    """The model's state dict inside a loaded checkpoint (layouts in the module docstring)."""
    if param_key is not None:
        if param_key not in checkpoint:
            raise CheckpointError(f"param_key {param_key!r} is not in the checkpoint; its top-level keys are"
                                  f" {sorted(checkpoint)[:10]}")
        state = checkpoint[param_key]
    elif "params" in checkpoint or "params_ema" in checkpoint:
        state = checkpoint.get("params", checkpoint.get("params_ema"))
    elif "state_dict" in checkpoint:
        state = _strip_prefix(checkpoint["state_dict"], "net.")
    elif is_authors_layout(checkpoint):
        state = checkpoint["model"]
    else:
        state = checkpoint
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(
            "no state dict found: expected {'params': …}, {'params_ema': …}, {'state_dict': {'net.…': …}},"
            " {'model': …} or a plain dict of tensors;"
            f" top-level keys are {sorted(checkpoint)[:10]} (choose one with param_key)"
        )
    return _strip_prefix(state, "module.")


def is_authors_layout(checkpoint: Mapping[str, Any]) -> bool:
    """True for the Perceive-IR authors' ``{'model': state_dict, …}`` (not a BasicSR/Lightning file)."""
    other_layout = {"params", "params_ema", "state_dict"} & set(checkpoint)
    return not other_layout and isinstance(checkpoint.get("model"), Mapping)


def guess_family(keys: set[str] | list[str]) -> str | None:
    """The backbone family whose signature key prefixes all occur in ``keys`` (see FAMILY_SIGNATURES)."""
    for family, prefixes in FAMILY_SIGNATURES:
        if all(any(key.startswith(prefix) for key in keys) for prefix in prefixes):
            return family
    return None


def _describe(model: nn.Module) -> str:
    family = getattr(model, "family", type(model).__name__)
    config = getattr(model, "config", None)
    return f"{family}({', '.join(f'{k}={v!r}' for k, v in config.items())})" if config else family


def _few(keys: list[str]) -> str:
    shown = ", ".join(keys[:_EXAMPLES])
    return shown + (", …" if len(keys) > _EXAMPLES else "")


def check_state_dict_fits(model: nn.Module, state: Mapping[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Raise ``CheckpointError`` unless ``state`` has exactly the keys and shapes of ``model.state_dict()``."""
    expected = model.state_dict()
    missing = [key for key in expected if key not in state]
    unexpected = [key for key in state if key not in expected]
    reshaped = [f"{key}: checkpoint {tuple(state[key].shape)} vs model {tuple(value.shape)}"
                for key, value in expected.items() if key in state and state[key].shape != value.shape]
    if not (missing or unexpected or reshaped):
        return
    model_family = getattr(model, "family", type(model).__name__)
    lines = [f"{source} does not fit {_describe(model)}:"]
    looks_like = guess_family(list(state))
    if looks_like and looks_like != model_family:
        lines.append(f"  it looks like a {looks_like} checkpoint, not a {model_family} one")
    elif looks_like == model_family and reshaped and not (missing or unexpected):
        lines.append(f"  same {model_family} layout but different sizes: was it saved with another config?")
    if missing:
        lines.append(f"  {len(missing)} key(s) missing from the checkpoint, e.g. {_few(missing)}")
    if unexpected:
        lines.append(f"  {len(unexpected)} unexpected key(s) in the checkpoint, e.g. {_few(unexpected)}")
    if reshaped:
        lines.append(f"  {len(reshaped)} tensor(s) with another shape, e.g. {_few(reshaped)}")
    raise CheckpointError("\n".join(lines))


def from_upstream_keys(model: nn.Module, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename upstream keys to ``model``'s own where the model names its blocks differently.

    Models with an ``upstream_key_map()`` (``{own key: upstream key}``, e.g. the paper's network) get each
    upstream key renamed; keys that are already the model's own stay, so both layouts load.
    """
    key_map = getattr(model, "upstream_key_map", None)
    if key_map is None:
        return dict(state)
    own_by_upstream = {upstream: own for own, upstream in key_map().items()}
    own = set(own_by_upstream.values())
    return {key if key in own else own_by_upstream.get(key, key): value for key, value in state.items()}


def load_checkpoint(model: nn.Module, path: str | os.PathLike, *, param_key: str | None = None,
                    sgm_position_embedding: str = "auto") -> nn.Module:
    """Load the checkpoint at ``path`` into ``model`` with ``strict=True`` and return the model.

    ``param_key`` picks the entry holding the weights (e.g. ``'params_ema'``); by default it is detected.
    ``sgm_position_embedding`` (models with an ``sgm``): ``'auto'`` switches to ``'hf'`` for a checkpoint in
    the authors' layout (their DINOv2 is Hugging Face's) and leaves the model as built otherwise; ``'timm'``
    or ``'hf'`` force one (``SGM.set_position_embedding``). Raises ``FileNotFoundError`` for a missing file
    and ``CheckpointError`` (a ``ValueError``) for an unreadable file or weights that do not fit.
    """
    if sgm_position_embedding not in ("auto", "timm", "hf"):
        raise ValueError(f"sgm_position_embedding must be 'auto', 'timm' or 'hf', got {sgm_position_embedding!r}")
    checkpoint = read_checkpoint_file(path)
    state = from_upstream_keys(model, extract_state_dict(checkpoint, param_key))
    check_state_dict_fits(model, state, source=f"checkpoint {str(path)!r}")
    model.load_state_dict(state, strict=True)
    sgm = getattr(model, "sgm", None)
    wanted = sgm_position_embedding
    if wanted == "auto":
        wanted = "hf" if is_authors_layout(checkpoint) else None
    if isinstance(sgm, SGM) and wanted is not None and sgm.position_embedding != wanted:
        sgm.set_position_embedding(wanted)
        if "dinov2_position_embedding" in getattr(model, "config", {}):
            model.config["dinov2_position_embedding"] = wanted
        log.info("%s: DINOv2 position embedding resampled the %s way", Path(path).name, wanted)
    return model


def save_official_checkpoint(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write ``model``'s weights atomically in its upstream layout (``model.checkpoint_format``).

    'basicsr' → ``{'params': state_dict}``; 'lightning' → ``{'state_dict': {'net.' + key: tensor}}``;
    'perceive-ir' (the authors' release of the paper's network) → ``{'model': state_dict with the authors' key
    names, 'iteration': 0, 'config': {'model': {dim, blocks, heads, refinement_blocks}}}``, the entries their
    evaluation script reads. ``load_checkpoint`` and the upstream code read the result.
    """
    layout = getattr(model, "checkpoint_format", None)
    state = {key: value.detach().cpu() for key, value in model.state_dict().items()}
    if layout == "basicsr":
        checkpoint: dict[str, Any] = {"params": state}
    elif layout == "lightning":
        checkpoint = {"state_dict": {f"net.{key}": value for key, value in state.items()}}
    elif layout == "perceive-ir":
        key_map = model.upstream_key_map()
        checkpoint = {"model": {key_map[key]: value for key, value in state.items()}, "iteration": 0,
                      "config": {"model": model.upstream_config()}}
    else:
        raise ValueError(f"model must define checkpoint_format 'basicsr', 'lightning' or 'perceive-ir', got {layout!r}")
    path = Path(path)
    with atomic_write(path) as tmp:
        torch.save(checkpoint, tmp)
    return path
