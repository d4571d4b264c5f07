"""Input checks shared by every public entry point.

Each check names the argument, says what was expected and what came. They run once, at the public
boundary; internal code trusts its inputs. Value checks (finite, range) cost one fused reduction each and
a host sync; inside :func:`deferred_value_checks` the syncs wait until the block's work is queued, and all
of its checks share one sync per device. :func:`defer_host_read` lets other numbers (e.g. a count for a
warning) ride along in that same sync.
"""
from __future__ import annotations

import math
import threading
from contextlib import contextmanager
from functools import partial
from typing import Callable, Iterator, Sequence

import torch

RANGE_TOLERANCE = 1e-3  # images may overshoot [0, 1] by this much (interpolation ringing, fp error)


def check_images(
    images: object,
    name: str = "images",
    *,
    channels: int | None = 3,
    value_range: tuple[float, float] | None = (0.0, 1.0),
    allow_empty: bool = False,
) -> torch.Tensor:
    """Validate a batch ``(B, C, H, W)`` of floating-point images and return it unchanged.

    Raises ``TypeError`` for a non-tensor or a non-floating dtype and ``ValueError`` for a wrong rank,
    channel count, empty batch, non-finite values or values outside ``value_range`` (± RANGE_TOLERANCE).
    Inside :func:`deferred_value_checks` the value check waits for the end of the block (no pipeline stall).
    """
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape (B, 3, H, W), got {type(images).__name__}")
    if not images.is_floating_point():
        raise TypeError(
            f"{name} must be a floating-point tensor with values in [0, 1], got dtype {images.dtype}"
            " (convert uint8 images with .float() / 255)"
        )
    if images.ndim != 4:
        raise ValueError(f"{name} must have shape (B, C, H, W), got {images.ndim} dimensions {tuple(images.shape)}")
    if channels is not None and images.shape[1] != channels:
        raise ValueError(f"{name} must have {channels} channels (RGB), got shape {tuple(images.shape)}")
    if images.shape[0] == 0 and not allow_empty:
        raise ValueError(f"{name} is an empty batch (shape {tuple(images.shape)})")
    if images.shape[2] == 0 or images.shape[3] == 0:
        raise ValueError(f"{name} has an empty spatial size (shape {tuple(images.shape)})")
    if images.numel():
        check_values(images, name, value_range=value_range)
    return images


_deferred = threading.local()  # .checks: the open block's pending (tensor, value_range, stats, handle), or None
HostHandler = Callable[[float, float], None]  # receives the two numbers of a pending read, on the host


@contextmanager
def deferred_value_checks() -> Iterator[None]:
    """Queue the value checks made inside the block and run them all when it ends, with one host sync per
    device, raising for the first failing check in call order.

    A public entry point wraps its body in it so that its checks never stall the GPU pipeline midway:
    the reductions are queued behind the real work, and the block's single sync comes after it. Nested
    blocks join the outermost; a tensor already queued for the same range is not reduced again (e.g.
    ``restored``, checked by two loss terms). If the body raises, that exception propagates and the queued
    checks are dropped.
    """
    if getattr(_deferred, "checks", None) is not None:
        yield
        return
    checks: list[tuple[torch.Tensor | None, tuple[float, float] | None, torch.Tensor, HostHandler]] = []
    _deferred.checks = checks
    try:
        yield
    finally:
        _deferred.checks = None
    rows: dict[int, list[float]] = {}
    for device in {stats.device for _, _, stats, _ in checks}:
        indices = [i for i, (_, _, stats, _) in enumerate(checks) if stats.device == device]
        rows.update(zip(indices, host_values(torch.stack([checks[i][2] for i in indices]))))
    for index, (_, _, _, handle) in enumerate(checks):
        handle(*rows[index])


def defer_host_read(pair: torch.Tensor, handle: HostHandler) -> None:
    """Call ``handle(a, b)`` with the two numbers of ``pair`` (e.g. a count and a total) once they are on the
    host: within the one sync at the end of the enclosing :func:`deferred_value_checks` block (in call order
    with its checks), or at once outside a block. ``pair`` stays on its device until then."""
    stats = pair.detach().reshape(2).float()
    pending = getattr(_deferred, "checks", None)
    if pending is None:
        handle(*host_values(stats))
    else:
        pending.append((None, None, stats, handle))


def host_values(stats: torch.Tensor) -> list:
    """``stats.tolist()``: the host sync of the value checks (one function, so tests can count the syncs)."""
    return stats.tolist()


def value_stats(tensor: torch.Tensor) -> torch.Tensor:
    """``[min, max]`` of a tensor as a float32 tensor on its device; queued, no host sync (NaN propagates)."""
    with torch.no_grad():
        low, high = torch.aminmax(tensor.detach().reshape(-1))
        return torch.stack([low.float(), high.float()])


def _raise_for_min_max(low_v: float, high_v: float, name: str, value_range: tuple[float, float] | None) -> None:
    if not (math.isfinite(low_v) and math.isfinite(high_v)):
        raise ValueError(f"{name} contains NaN or Inf values")
    if value_range is not None:
        lo, hi = value_range
        if low_v < lo - RANGE_TOLERANCE or high_v > hi + RANGE_TOLERANCE:
            raise ValueError(
                f"{name} must hold values in [{lo:g}, {hi:g}], got min {low_v:.4g} and max {high_v:.4g}"
                " (scale 8-bit images by 1/255; clamp model outputs)"
            )


def check_values(
    tensor: torch.Tensor, name: str, *, value_range: tuple[float, float] | None = (0.0, 1.0)
) -> None:
    """Raise ``ValueError`` if ``tensor`` holds NaN/Inf or leaves ``value_range`` by more than the tolerance
    (at the end of the enclosing :func:`deferred_value_checks` block, if any)."""
    pending = getattr(_deferred, "checks", None)
    handle = partial(_raise_for_min_max, name=name, value_range=value_range)
    if pending is None:
        handle(*host_values(value_stats(tensor)))
    elif not any(queued is tensor and queued_range == value_range for queued, queued_range, _, _ in pending):
        pending.append((tensor, value_range, value_stats(tensor), handle))


def compiling() -> bool:
    """True while ``torch.compile`` traces: a value check reads back to the host, which would break the graph,
    so modules skip their value checks there (shape and dtype checks still run)."""
    is_compiling = getattr(torch.compiler, "is_compiling", None)
    if is_compiling is None:  # torch < 2.3
        from torch._dynamo import is_compiling
    return bool(is_compiling())


def as_parameter_dtype(tensor: torch.Tensor, module: torch.nn.Module) -> torch.Tensor:
    """``tensor`` cast to the floating dtype of ``module``'s parameters, so that e.g. a float64 input runs
    through a float32 module instead of failing inside it (under autocast the layers then cast as usual)."""
    parameter = next(module.parameters(), None)
    return tensor if parameter is None or tensor.dtype == parameter.dtype else tensor.to(parameter.dtype)


def set_value_checks(module: torch.nn.Module, enabled: bool) -> torch.nn.Module:
    """Switch the input value checks (``validate_inputs``) of ``module`` and every submodule that has them
    (PerceiveAdapter, CFE, PGM), e.g. off inside a training step whose losses check the values anyway, so
    that no check reads back to the host in the middle of the forward pass. Returns ``module``."""
    for submodule in module.modules():
        if hasattr(submodule, "validate_inputs"):
            submodule.validate_inputs = bool(enabled)
    return module


def check_same_shape(reference: torch.Tensor, ref_name: str, other: torch.Tensor, other_name: str) -> None:
    """Raise ``ValueError`` unless ``other`` has exactly the shape of ``reference``."""
    if tuple(other.shape) != tuple(reference.shape):
        raise ValueError(
            f"{other_name} must have the same shape as {ref_name} {tuple(reference.shape)}, got {tuple(other.shape)}"
        )


def check_positive_int(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def check_choice(value: object, name: str, choices: Sequence[str]) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")
    return value  # type: ignore[return-value]
