"""Padding, one copy for every program: bucket ladders for lengths and batch sizes, positions
from an attention mask, and the target-aligned response loss mask.

A handful of padded shapes means a handful of compiled programs: the data pipeline, the
annotators' forward pass and the sampler all round a size up to the next bucket here.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np


def ladder(max_len: int, minimum: int = 16) -> tuple[int, ...]:
    """16, 24, 32, 48, 64, 96, ... below ``max_len``, then ``max_len`` itself."""
    out, p = [], minimum
    while p < max_len:
        out.append(p)
        if p + p // 2 < max_len and p >= 16:
            out.append(p + p // 2)
        p *= 2
    return tuple(sorted(set(out))) + (max_len,)


def fit(n: int, buckets: Sequence[int]) -> int:
    """The smallest bucket ``>= n`` (an error naming the largest when none is)."""
    for b in sorted(buckets):
        if b >= n:
            return int(b)
    raise ValueError(f"a size of {n} exceeds the largest bucket {max(buckets)}")


def round_up(n: int, buckets: Sequence[int] | None = None, *, minimum: int = 1, half_steps: bool = False) -> int:
    """:func:`fit` when ``buckets`` are given, else the next power of two (or, with
    ``half_steps``, the next of ``2^k`` and ``3 * 2^(k-1)``: 8, 12, 16, 24, 32, 48, ...), at
    least ``minimum``."""
    if buckets:
        return fit(n, buckets)
    p2 = 1 << max(0, int(n) - 1).bit_length()
    if half_steps and p2 >= 4 and 3 * p2 // 4 >= n:
        p2 = 3 * p2 // 4
    return max(minimum, p2)


def positions_from_mask(mask):
    """``max(cumsum(mask) - 1, 0)`` along the last axis (numpy in, numpy out; else jax): left or
    right padding never shifts a real token's position."""
    xp = np if isinstance(mask, np.ndarray) else jnp
    return xp.maximum(xp.cumsum(mask.astype(xp.int32), axis=-1) - 1, 0).astype(xp.int32)


def mark_response(loss_row: np.ndarray, prompt_len: int, length: int) -> None:
    """Sets the target-aligned loss mask of one row in place: hidden state ``t`` predicts token
    ``t + 1``, so a response occupying tokens ``[prompt_len, length)`` is counted at
    ``t in [prompt_len - 1, length - 1)``."""
    loss_row[prompt_len - 1:length - 1] = 1
