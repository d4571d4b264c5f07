"""Backbone weights in and out of a wrapped network, whatever wrapper saved them.

Official checkpoints keep the backbone's state dict under different entries and key prefixes:

==============================  =====================================================================
who saved it                    layout
==============================  =====================================================================
BasicSR (Restormer, NAFNet)     ``{"params": sd}`` (sometimes also ``"params_ema"``)
PyTorch Lightning (PromptIR)    ``{"state_dict": {"net.<key>": …}, "epoch": …}``
the Perceive-IR authors         ``{"model": sd, "iteration": …, "config": …}``
DDP / ``torch.compile``         ``module.<key>`` / ``_orig_mod.<key>``
``PerceiveAdapter``             ``backbone.<key>`` beside ``perceive.<key>`` (the adapter's own weights)
a LightningModule around it     ``<attr>.backbone.<key>``, e.g. ``net.backbone.…`` and ``net.perceive.…``
==============================  =====================================================================

``load_backbone_weights(net, source)`` finds the state dict in any of these and the key prefix under which it
fits the backbone (``net.backbone`` for a ``PerceiveAdapter``), then loads it strictly; ``load_weights(module,
source)`` does the same for any module (a whole adapter back from a LightningModule's checkpoint).
``backbone_state_dict(source)`` goes the other way: the bare backbone's keys out of an adapter's, a
Lightning or a DDP checkpoint, ready for upstream evaluation code (``torch.save({"params": …}, path)``).

Files are read with ``torch.load(..., weights_only=True)`` (tensors and plain containers, never arbitrary
objects) or safetensors.
"""
from __future__ import annotations

import os
import pickle
import re
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

STATE_DICT_ENTRIES = ("params", "params_ema", "state_dict", "model", "net", "network")  # tried in this order
WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # added by DDP and torch.compile around any module
ADAPTER_PREFIX, ADAPTER_OWN = "backbone.", "perceive."


class WeightsError(ValueError):
    """A checkpoint cannot be read, or no arrangement of its keys fits the module."""


def read_checkpoint(path: str | os.PathLike) -> Mapping[str, Any]:
    """A checkpoint file as a mapping on the CPU: ``.safetensors``, or a torch file read with ``weights_only``."""
    path = Path(path)
    if path.is_dir():
        raise WeightsError(f"{str(path)!r} is a folder; pass the checkpoint file inside it")
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(path)
        except Exception as error:  # safetensors raises its own error types for damaged files
            raise WeightsError(f"cannot read {str(path)!r}: truncated or not a safetensors file ({error})") from error
    checkpoint = load_torch_file(path)
    if not isinstance(checkpoint, Mapping):
        raise WeightsError(f"{str(path)!r} holds a {type(checkpoint).__name__}, expected a dict")
    return checkpoint


def load_torch_file(path: str | os.PathLike) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU: tensors, numbers, strings and plain containers load,
    nothing else is unpickled. A file that needs more (a pickled class or function) or a damaged one raises a
    ``WeightsError`` that names the refused object or says the file is not a PyTorch checkpoint."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        refused = re.search(r"Unsupported global: GLOBAL (\S+)", str(error))
        if refused:
            name = refused.group(1)
            raise WeightsError(f"{str(path)!r} holds a Python object, {name}: torch.load(weights_only=True) refuses "
                               f"to unpickle {name}, and arbitrary objects are never unpickled here; re-save its "
                               "tensors as a plain state dict in an environment you trust") from error
        raise WeightsError(f"cannot read {str(path)!r}: truncated or not a PyTorch checkpoint (the unpickler met "
                           "invalid data)") from error
    except Exception as error:  # a damaged file can fail anywhere inside the unpickler
        raise WeightsError(f"cannot read {str(path)!r}: truncated or not a PyTorch checkpoint "
                           f"({type(error).__name__}: {error})") from error


def _is_state_dict(value: object) -> bool:
    return isinstance(value, Mapping) and bool(value) and all(isinstance(v, torch.Tensor) for v in value.values())


def find_state_dict(checkpoint: Mapping[str, Any], entry: str | None = None) -> dict[str, torch.Tensor]:
    """The state dict inside a loaded checkpoint: ``checkpoint[entry]``, else the first of
    ``STATE_DICT_ENTRIES`` that holds one, else the checkpoint itself if it is a plain state dict."""
    if entry is not None:
        if entry not in checkpoint:
            raise WeightsError(f"the checkpoint has no entry {entry!r}; its entries are {sorted(checkpoint)[:12]}")
        candidates = [checkpoint[entry]]
    else:
        candidates = [checkpoint[name] for name in STATE_DICT_ENTRIES if name in checkpoint] + [checkpoint]
    for candidate in candidates:
        if _is_state_dict(candidate):
            return dict(candidate)
    raise WeightsError(f"no state dict found in the checkpoint (entries {sorted(checkpoint)[:12]}); expected a dict "
                       f"of tensors, or one under {list(STATE_DICT_ENTRIES)} (choose with entry=…)")


def _without_wrappers(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key, changed = key[len(prefix):], True
    return key


def fit_state_dict(state: Mapping[str, torch.Tensor], module: nn.Module) -> dict[str, torch.Tensor]:
    """``state`` re-keyed to ``module.state_dict()``: DDP/compile wrappers removed, then the one key prefix
    (``""``, ``"net."``, ``"backbone."``, ``"net.backbone."`` …) under which every key of ``module`` is found.
    Keys outside that prefix (an adapter's ``perceive.*``, a LightningModule's losses) are left out."""
    state = {_without_wrappers(key): value for key, value in state.items()}
    wanted = module.state_dict()
    if not wanted:
        raise WeightsError(f"{type(module).__name__} has no weights to load")
    first = next(iter(wanted))
    prefixes = {key[: len(key) - len(first)] for key in state if key == first or key.endswith("." + first)}
    for prefix in sorted(prefixes, key=len):
        if all(prefix + key in state for key in wanted):
            fitted = {key: state[prefix + key] for key in wanted}
            reshaped = [f"{key}: checkpoint {tuple(fitted[key].shape)} vs module {tuple(value.shape)}"
                        for key, value in wanted.items() if fitted[key].shape != value.shape]
            if reshaped:
                raise WeightsError(f"the checkpoint's keys fit {type(module).__name__} under prefix {prefix!r}, but "
                                   f"{len(reshaped)} tensor(s) have another shape, e.g. {reshaped[:3]} (another "
                                   "config of the same network?)")
            return fitted
    missing = [key for key in wanted if key not in state]
    raise WeightsError(
        f"the checkpoint does not fit {type(module).__name__} under any key prefix: {len(missing)} of its "
        f"{len(wanted)} keys are missing, e.g. {missing[:3]}; the checkpoint has e.g. {sorted(state)[:3]}")


def load_weights(module: nn.Module, source: str | os.PathLike | Mapping[str, Any], *,
                 entry: str | None = None) -> nn.Module:
    """Load a checkpoint (a path, a loaded checkpoint or a state dict, in any layout of the table in the module
    docstring) strictly into ``module`` itself, under whatever key prefix it was saved (``fit_state_dict``):
    e.g. a whole ``PerceiveAdapter`` back from a LightningModule's checkpoint (``net.backbone.*``, ``net.perceive.*``).
    Returns ``module``."""
    checkpoint = read_checkpoint(source) if isinstance(source, (str, os.PathLike)) else source
    module.load_state_dict(fit_state_dict(find_state_dict(checkpoint, entry), module), strict=True)
    return module


def load_backbone_weights(net: nn.Module, source: str | os.PathLike | Mapping[str, Any], *,
                          entry: str | None = None) -> nn.Module:
    """Load a backbone checkpoint (as ``load_weights``) strictly into ``net`` — into ``net.backbone`` when ``net``
    is a ``PerceiveAdapter``, so official weights go into the wrapped network without renaming a key (the
    adapter's own weights stay as they are). Returns ``net``."""
    from .adapter import PerceiveAdapter

    load_weights(net.backbone if isinstance(net, PerceiveAdapter) else net, source, entry=entry)
    return net


def backbone_state_dict(source: nn.Module | str | os.PathLike | Mapping[str, Any], *,
                        entry: str | None = None) -> dict[str, torch.Tensor]:
    """The bare backbone's state dict, with its own keys, out of a ``PerceiveAdapter`` (or anything holding
    one, e.g. a LightningModule) or of a checkpoint saved from one (``.../backbone.<key>`` → ``<key>``;
    ``perceive.*`` and everything else dropped). Upstream code loads the result strictly."""
    if isinstance(source, nn.Module):
        state = source.state_dict()
    else:
        checkpoint = read_checkpoint(source) if isinstance(source, (str, os.PathLike)) else source
        state = find_state_dict(checkpoint, entry)
    state = {_without_wrappers(key): value for key, value in state.items()}
    holders = {_holder(key) for key in state} - {None}
    if not holders:
        raise WeightsError("no 'backbone.' keys found: this is not the state of a PerceiveAdapter (a bare "
                           "backbone's checkpoint needs no conversion)")
    prefix = min(holders, key=len) + ADAPTER_PREFIX  # the outermost adapter (a backbone may have its own 'backbone')
    return {key[len(prefix):]: value for key, value in state.items() if key.startswith(prefix)}


def _holder(key: str) -> str | None:
    """The key prefix before its first ``backbone.`` component (``"net."`` for ``net.backbone.conv.weight``)."""
    parts = key.split(".")
    if "backbone" not in parts[:-1]:
        return None
    index = parts.index("backbone")
    return "".join(f"{part}." for part in parts[:index])
