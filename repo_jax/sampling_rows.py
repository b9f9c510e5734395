"""Decode-row bookkeeping of the sampler: where a KV cache holds its batch, repeating rows for K
samples per prompt, and compacting finished rows away between decode stages (see
:mod:`repo_jax.sampling`'s module docstring)."""

from __future__ import annotations

import jax
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


def _repeat_rows(tree, batch_axes, k: int):
    return jax.tree.map(lambda x, ax: x if ax is None else jnp.repeat(x, k, axis=ax), tree, batch_axes)


def _take_rows(tree, batch_axes, rows_B):
    return jax.tree.map(lambda x, ax: x if ax is None else jnp.take(x, rows_B, axis=ax), tree, batch_axes)


def _cache_batch_axes(model, batch: int, max_len: int, dtype):
    """For every cache leaf, the axis that holds the batch (found by comparing two shapes)."""
    a = jax.eval_shape(lambda: model.init_cache(batch, max_len, dtype=dtype))
    b = jax.eval_shape(lambda: model.init_cache(batch + 1, max_len, dtype=dtype))

    def axis(x, y):
        diff = [i for i, (m, n) in enumerate(zip(x.shape, y.shape)) if m != n]
        return diff[0] if diff else None

    return jax.tree.map(axis, a, b)


def _compact(s, size: int, cache_axes):
    """The first ``size`` rows after a stable sort on ``done``: every live row (the caller ensures
    there are at most ``size``), then finished rows as filler (they write only padding)."""
    keep_B = jnp.argsort(s.done_B, stable=True)[:size]
    take = lambda x_B: jnp.take(x_B, keep_B, axis=0)
    return s.replace(cache=_take_rows(s.cache, cache_axes, keep_B), row_B=take(s.row_B),
                     last_token_B=take(s.last_token_B), position_B=take(s.position_B), done_B=take(s.done_B))


