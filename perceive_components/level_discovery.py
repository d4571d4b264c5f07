"""Find a backbone's decoder levels by tracing one dummy forward (used by ``PerceiveAdapter``).

Every submodule call is recorded with the shape of its input (the tensor a forward pre-hook would
modulate), the shape of its output and the module's parameter count. For an input ``(B, C, h, w)`` of an
``H × W`` image the *scale* is ``H / h`` when ``H / h == W / w`` is an integer.

Discovery rule: the bottleneck is the coarsest scale seen (scale s_max; pooled 1 × 1
tensors are ignored). From the first call at s_max on ("the path back up to full resolution") the
candidates at each scale are the outermost modules with parameters whose input and output both sit at
that scale (stages, not up/down-samplers). Per scale:

1. the first candidate that keeps its width (C_in = C_out) is the level: a stage of blocks
   (Restormer's ``decoder_level3``, NAFNet's ``decoders.0``), not the 1 × 1 merge conv before it nor a
   prompt or refinement module after it;
2. if no candidate keeps its width (concat-skip U-Nets whose block maps 2C → C), the candidate with the
   most parameters, leaving out the insides of up/down-samplers that start at that scale (if nothing
   is left, that scale gets no level).

Levels come back coarse to fine, i.e. in the order the decoder runs them. The choice is logged and
can always be overridden with explicit names.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
from torch import nn


@dataclass(frozen=True)
class ModuleCall:
    """One recorded call: ``input_key`` is 0 (first positional argument) or the keyword it came by."""

    name: str
    order: int
    input_key: int | str
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...] | None
    params: int
    scale: int | None
    out_scale: int | None

    @property
    def channels(self) -> int:
        return self.in_shape[1] if len(self.in_shape) == 4 else self.in_shape[-1]


@dataclass(frozen=True)
class Level:
    """A decoder level: module name, input channels, input scale (None for token inputs), call order."""

    name: str
    channels: int
    scale: int | None
    order: int
    input_key: int | str


def _scale(shape: tuple[int, ...] | None, batch: int, height: int, width: int) -> int | None:
    if shape is None or len(shape) != 4 or shape[0] != batch or min(shape[2:]) <= 1:
        return None
    h, w = shape[2:]
    if height % h or width % w or height // h != width // w:
        return None
    return height // h


def _first_tensor(args: tuple, kwargs: dict) -> tuple[int | str, torch.Tensor] | None:
    if args and isinstance(args[0], torch.Tensor):
        return 0, args[0]
    for key, value in kwargs.items():
        if isinstance(value, torch.Tensor):
            return key, value
    return None


def default_example(backbone: nn.Module, size: int, channels: int = 3, batch: int = 1) -> torch.Tensor:
    """A seeded random ``(batch, channels, size, size)`` image on the backbone's device and dtype."""
    reference = next((p for p in backbone.parameters() if p.is_floating_point()), None)
    device = reference.device if reference is not None else torch.device("cpu")
    dtype = reference.dtype if reference is not None else torch.float32
    generator = torch.Generator().manual_seed(0)
    return torch.rand(batch, channels, size, size, generator=generator).to(device=device, dtype=dtype)


@torch.no_grad()
def trace_calls(backbone: nn.Module, example: torch.Tensor) -> list[ModuleCall]:
    """Run ``backbone(example)`` once (eval mode, no grad, modes restored) and record every module call."""
    if not isinstance(example, torch.Tensor) or example.ndim != 4:
        raise ValueError(f"example_input must be a (B, C, H, W) tensor, got {getattr(example, 'shape', type(example))}")
    batch, _, height, width = example.shape
    modes = {module: module.training for module in backbone.modules()}
    pending: dict[int, list[dict]] = {}
    records: list[dict] = []
    handles = []

    def before(name: str, module: nn.Module, args: tuple, kwargs: dict) -> None:
        found = _first_tensor(args, kwargs)
        if found is None:
            return
        record = {"name": name, "order": len(records), "key": found[0], "in": tuple(found[1].shape), "out": None}
        records.append(record)
        pending.setdefault(id(module), []).append(record)

    def after(module: nn.Module, args: tuple, kwargs: dict, output: object) -> None:
        stack = pending.get(id(module))
        if stack:
            record = stack.pop()
            if isinstance(output, torch.Tensor):
                record["out"] = tuple(output.shape)

    params = {}
    for name, module in backbone.named_modules():
        if not name:
            continue
        params[name] = sum(p.numel() for p in module.parameters())
        handles.append(module.register_forward_pre_hook(
            lambda m, a, k, _n=name: before(_n, m, a, k), with_kwargs=True))
        handles.append(module.register_forward_hook(after, with_kwargs=True))
    try:
        backbone.eval()
        backbone(example)
    except Exception as error:
        raise RuntimeError(
            f"the trace forward of the backbone on a {tuple(example.shape)} input failed: {error}. Pass an input "
            "it accepts as example_input=… (or trace_size=… a multiple of its down-sampling factor)"
        ) from error
    finally:
        for handle in handles:
            handle.remove()
        for module, mode in modes.items():
            module.training = mode
    return [
        ModuleCall(r["name"], r["order"], r["key"], r["in"], r["out"], params[r["name"]],
                   _scale(r["in"], batch, height, width), _scale(r["out"], batch, height, width))
        for r in records
    ]


def coarsest_scale(calls: Sequence[ModuleCall]) -> int:
    """The backbone's down-sampling factor seen in the trace (1 when nothing is down-sampled)."""
    return max((c.scale for c in calls if c.scale is not None), default=1)


def _up_path_start(calls: Sequence[ModuleCall]) -> int | None:
    scaled = [c for c in calls if c.scale is not None]
    if not scaled:
        return None
    s_max = coarsest_scale(scaled)
    return min(c.order for c in scaled if c.scale == s_max)


def level_candidates(calls: Sequence[ModuleCall]) -> list[ModuleCall]:
    """Calls on the path back up from the bottleneck that keep their scale and have parameters."""
    start = _up_path_start(calls)
    if start is None:
        return []
    return [c for c in calls if c.order >= start and c.scale is not None and c.out_scale == c.scale and c.params > 0]


def _inside(name: str, ancestor: str) -> bool:
    return name.startswith(ancestor + ".")


def _pick(candidates: list[ModuleCall], calls: Sequence[ModuleCall]) -> ModuleCall | None:
    names = {c.name for c in candidates}
    outer = [c for c in candidates if not any(_inside(c.name, other) for other in names)]
    keeps_width = [c for c in outer if c.out_shape is not None and c.out_shape[1] == c.in_shape[1]]
    if keeps_width:
        return keeps_width[0]
    scale, start = outer[0].scale, _up_path_start(calls)
    samplers = {c.name for c in calls if c.order >= start and c.scale == scale and c.out_scale != scale}
    pool = [c for c in outer if not any(_inside(c.name, sampler) for sampler in samplers)]
    return max(pool, key=lambda c: (c.params, -c.order)) if pool else None


def discover_levels(calls: Sequence[ModuleCall]) -> list[Level]:
    """One level per scale, coarse to fine (see the module docstring for the rule)."""
    by_scale: dict[int, list[ModuleCall]] = {}
    for call in level_candidates(calls):
        by_scale.setdefault(call.scale, []).append(call)
    if not by_scale:
        raise ValueError(
            "no decoder level found: no module with parameters ran on an image-shaped (B, C, h, w) tensor "
            "after the bottleneck. Pass levels={'module.name': channels, …} explicitly"
        )
    chosen, seen = [], set()
    for scale in sorted(by_scale, reverse=True):
        call = _pick(by_scale[scale], calls)
        if call is not None and call.name not in seen:
            seen.add(call.name)
            chosen.append(Level(call.name, call.channels, call.scale, call.order, call.input_key))
    if not chosen:
        raise ValueError(
            "no decoder level found: the only modules after the bottleneck are inside up/down-samplers. "
            "Pass levels={'module.name': channels, …} explicitly"
        )
    return chosen


def format_candidates(calls: Sequence[ModuleCall], limit: int = 40) -> str:
    """A table of level candidates (name, input shape, scale, parameters), coarse first."""
    rows = sorted(level_candidates(calls), key=lambda c: (-c.scale, c.order))
    lines = [f"  {c.name:<40} in {str(c.in_shape):<22} 1/{c.scale:<3} {c.params:>12,} params" for c in rows[:limit]]
    if len(rows) > limit:
        lines.append(f"  … {len(rows) - limit} more")
    return "\n".join(lines) if lines else "  (none: no module ran on an image-shaped tensor after the bottleneck)"


def resolve_levels(
    backbone: nn.Module, calls: Sequence[ModuleCall], levels: Sequence[str] | Mapping[str, int]
) -> list[Level]:
    """Validate user-named levels against the module tree and the trace; returns them in call order."""
    if isinstance(levels, str) or not isinstance(levels, (Sequence, Mapping)):
        raise TypeError(f"levels must be a list of module names or a {{name: channels}} dict, got {levels!r}")
    requested = dict(levels) if isinstance(levels, Mapping) else {name: None for name in levels}
    if not requested:
        raise ValueError("levels is empty: name at least one backbone module")
    module_names = {name for name, _ in backbone.named_modules() if name}
    unknown = [name for name in requested if name not in module_names]
    if unknown:
        hints = {name: difflib.get_close_matches(str(name), module_names, n=3) for name in unknown}
        raise ValueError(
            f"levels {unknown} are not modules of {type(backbone).__name__} (close matches: {hints}). "
            f"Candidate decoder levels found by tracing a forward:\n{format_candidates(calls)}"
        )
    first_call = {}
    for call in calls:
        first_call.setdefault(call.name, call)
    resolved = []
    for name, channels in requested.items():
        call = first_call.get(name)
        if call is None:
            raise ValueError(f"level {name!r} did not run (with a tensor input) during the trace forward")
        if len(call.in_shape) not in (3, 4):
            raise ValueError(f"level {name!r} takes a {call.in_shape} input; a level needs (B, C, H, W) or (B, N, C)")
        if channels is not None and channels != call.channels:
            raise ValueError(
                f"level {name!r} was given {channels} channels but its input has {call.channels} "
                f"(shape {call.in_shape} in the trace)"
            )
        resolved.append(Level(name, call.channels, call.scale, call.order, call.input_key))
    return sorted(resolved, key=lambda level: level.order)
