"""Timing helpers shared by the benchmark scripts: a synchronised timer and per-round ratios.

Every script times all its cases once per round, so a ratio taken within one round compares two cases
under the same machine load; the median over rounds is reported with its range.
"""
from __future__ import annotations

import statistics
import time
from typing import Callable, Mapping, Sequence

import torch

CPU_CLOCKS = ("cpu", "process")  # CPU time of this process (robust on a shared machine); CPU runs only


def timer(device: torch.device, clock: str = "wall") -> Callable[[Callable[[], object]], float]:
    """``measure(fn) -> seconds`` of one call of ``fn``; on CUDA the device is synchronised before and after,
    so the time covers the queued work. ``clock``: ``"wall"``, or ``"cpu"``/``"process"`` (CPU time)."""
    if clock in CPU_CLOCKS and device.type != "cpu":
        raise SystemExit(f"--clock {clock} measures CPU work; use --clock wall on {device.type}")
    now = time.process_time if clock in CPU_CLOCKS else time.perf_counter
    synchronise = device.type == "cuda"

    def measure(fn: Callable[[], object]) -> float:
        if synchronise:
            torch.cuda.synchronize(device)
        start = now()
        fn()
        if synchronise:
            torch.cuda.synchronize(device)
        return now() - start

    return measure


def round_ratio(samples: Mapping[str, Sequence[float]], numerator: Sequence[str], denominator: Sequence[str]
                ) -> tuple[float, float, float]:
    """(median, min, max) over rounds of ``sum(numerator cases) / sum(denominator cases)`` within each round."""
    rounds = len(samples[numerator[0]])
    ratios = [sum(samples[c][r] for c in numerator) / sum(samples[c][r] for c in denominator) for r in range(rounds)]
    return statistics.median(ratios), min(ratios), max(ratios)
