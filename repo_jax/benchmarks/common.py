"""Small helpers shared by the benchmarks: timing of jitted functions and the JSON last line."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import jax


def wall_times(fn: Callable[[], Any], *, repeats: int = 3, warmup: int = 1) -> list[float]:
    """Sorted wall times in seconds of ``repeats`` calls of ``fn()`` (jax results blocked on,
    anything else -- torch tensors, host arrays -- returned as is), after ``warmup`` calls."""
    for _ in range(warmup):
        jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return sorted(times)


def time_fn(fn: Callable[[], Any], *, repeats: int = 3, warmup: int = 1) -> float:
    """Median wall time in seconds of ``fn()`` (see :func:`wall_times`)."""
    times = wall_times(fn, repeats=repeats, warmup=warmup)
    return times[len(times) // 2]


def emit(result: dict[str, Any]) -> None:
    """Prints the benchmark's machine-readable last line."""
    print(json.dumps(result, sort_keys=False), flush=True)
