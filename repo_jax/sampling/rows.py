"""Decode-row bookkeeping of the sampler: the decode stages' batch sizes, and compacting finished
rows away between stages once the prompt queue is empty (see :mod:`repo_jax.sampling`'s module docstring). A model's KV cache
repeats and gathers its own rows (``cache.repeat(k)``, ``cache.take(rows_B)``)."""

from __future__ import annotations

import jax.numpy as jnp


def _stage_rows(rows: int, mult: int, *, min_rows: int, max_compactions: int) -> tuple[int, ...]:
    """Decode batch sizes of one call: ``rows``, then halves (at most ``max_compactions``) while a
    half keeps at least ``min_rows`` rows and still divides over the ``mult`` batch devices.

    Once no more live rows remain than the next size, the live rows are gathered into that many
    (:func:`_compact`) and decoding goes on with the smaller batch: finished rows stop costing
    model steps, at the price of one more compiled loop body per size.
    """
    sizes = [rows]
    while len(sizes) <= max_compactions:
        half = sizes[-1] // 2
        if sizes[-1] % 2 or half < max(min_rows, mult) or half % mult:
            break
        sizes.append(half)
    return tuple(sizes)


def _compact(s, size: int):
    """The first ``size`` rows after a stable sort on ``done``: every live row (the caller ensures
    there are at most ``size``), then finished rows as filler (they write only padding)."""
    keep_B = jnp.argsort(s.done_B, stable=True)[:size]
    take = lambda x_B: jnp.take(x_B, keep_B, axis=0)
    return s.replace(cache=s.cache.take(keep_B), row_B=take(s.row_B), index_B=take(s.index_B),
                     last_token_B=take(s.last_token_B), position_B=take(s.position_B), done_B=take(s.done_B))


