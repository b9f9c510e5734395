"""The jitted decode program of :mod:`repo_jax.sampling`: one prefill, the first token, then a
``while_loop`` of decode steps per stage over :class:`DecodeState` (the layout and the row
bookkeeping are described in :mod:`repo_jax.sampling`'s module docstring). ``generate_program``
is the program, ``jax.jit``-ed with its static arguments (the graphdef and a hashable
:class:`Static`), so ``jax.jit``'s own cache holds one compiled program per bucket; the compile
clock reads ``jax.monitoring``'s events to report each call's tracing and compile time.
"""

from __future__ import annotations

import dataclasses
import threading
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

from repo_jax.padding import positions_from_mask
from repo_jax.sampling.policies import SamplingPolicy, choose_tokens
from repo_jax.sampling.rows import _compact


@flax.struct.dataclass
class DecodeState:
    """Carry of the decode ``while_loop``s. ``B`` = the rows being decoded (all ``R = prompts x
    samples`` rows, then fewer after each compaction), ``N`` = the token buffer.

    Attributes:
      step: int32 []: tokens sampled so far per row (the prefill's token counts as one).
      cache: the model's KV cache for the ``B`` rows, ``S = P + N`` slots; step ``i`` writes
        slot ``P + i - 1``.
      row_B: int32 [B]: the output row (``0 .. R-1``) each decoded row fills; it keys the row's
        random stream, so compaction never changes a row's tokens.
      last_token_B: int32 [B]: the most recent token, fed to the next decode step.
      position_B: int32 [B]: that token's position (prompt length + step - 1).
      done_B: bool [B]: the row has emitted a stop id, reached ``max_new_tokens``, or is padding.
      tokens_RxN: int32: new tokens of every output row, ``pad_id`` after a row's end.
      logps_RxN: float32: their log-probs under the unmodified model (0 after the end).
      sample_logps_RxN: float32: their log-probs under the sampling distribution (0 greedy / after).
      lengths_R: int32 [R]: new tokens per output row, stop token included.
    """

    step: jax.Array
    cache: Any
    row_B: jax.Array
    last_token_B: jax.Array
    position_B: jax.Array
    done_B: jax.Array
    tokens_RxN: jax.Array
    logps_RxN: jax.Array
    sample_logps_RxN: jax.Array
    lengths_R: jax.Array


@dataclasses.dataclass(frozen=True)
class Static:
    """Everything static in one compiled program (with the graphdef and the argument shapes)."""

    policy: SamplingPolicy
    samples_per_row: int  # decode rows per prefill row: num_samples / f
    buffer_len: int  # N
    stop_ids: tuple[int, ...]
    pad_id: int
    cache_dtype: Any
    stages: tuple[int, ...]  # decode batch sizes: all rows, then the compactions (see _stage_rows)
    replicate: bool  # under a mesh: replicated outputs, so every process reads every row


def _row_keys(seed, step, rows_B):
    base = jax.random.fold_in(jax.random.key(seed), step)
    return jax.vmap(lambda r: jax.random.fold_in(base, r))(rows_B)


def _generate_program(state, tokens_BxT, mask_BxT, valid_B, max_new_tokens, seed, *, graphdef, static: Static):
    """Prefill the ``B`` rows once, repeat each ``K`` times, then decode the ``B*K`` rows in
    ``while_loop``s, one per stage size (finished rows compacted away between stages)."""
    model = nnx.merge(graphdef, state)
    k, n = static.samples_per_row, static.buffer_len
    b, p = tokens_BxT.shape
    rows = b * k
    max_len = p + n

    # Prefill: positions count real tokens, so left padding does not shift them.
    positions_BxT = positions_from_mask(mask_BxT)
    prompt_len_B = mask_BxT.astype(jnp.int32).sum(axis=1)
    cache = model.init_cache(b, max_len, dtype=static.cache_dtype)
    logits_Bx1xV, cache = model.forward_with_cache(tokens_BxT, positions_BxT, mask_BxT, cache, jnp.int32(0), last_only=True)
    last_logits_BxV = logits_Bx1xV[:, -1].astype(jnp.float32)

    if k > 1:  # K samples per row from one prefill: repeat cache and logits along batch.
        cache = cache.repeat(k)
        last_logits_BxV = jnp.repeat(last_logits_BxV, k, axis=0)
        prompt_len_B = jnp.repeat(prompt_len_B, k, axis=0)
        valid_B = jnp.repeat(valid_B, k, axis=0)

    stop_ids = jnp.asarray(static.stop_ids or (-1,), jnp.int32)

    def record(s: DecodeState, logits_BxV) -> DecodeState:
        live_B = ~s.done_B
        token_B, logp_B, sample_logp_B = choose_tokens(logits_BxV, _row_keys(seed, s.step, s.row_B), static.policy, live_B)
        token_B = jnp.where(live_B, token_B, static.pad_id)
        # Finished rows write padding (and 0) after their end: what the buffers already hold there.
        put = lambda out_RxN, x_B: out_RxN.at[s.row_B, s.step].set(x_B, mode="drop")
        lengths_R = s.lengths_R.at[s.row_B].add(live_B.astype(jnp.int32))
        stopped_B = jnp.isin(token_B, stop_ids) if static.stop_ids else jnp.zeros_like(live_B)
        return s.replace(
            step=s.step + 1,
            last_token_B=token_B,
            tokens_RxN=put(s.tokens_RxN, token_B),
            logps_RxN=put(s.logps_RxN, jnp.where(live_B, logp_B, 0.0)),
            sample_logps_RxN=put(s.sample_logps_RxN, jnp.where(live_B, sample_logp_B, 0.0)),
            lengths_R=lengths_R,
            done_B=s.done_B | (live_B & stopped_B) | (lengths_R[s.row_B] >= max_new_tokens),
        )

    s = DecodeState(
        step=jnp.int32(0),
        cache=cache,
        row_B=jnp.arange(rows, dtype=jnp.int32),
        last_token_B=jnp.zeros((rows,), jnp.int32),
        position_B=prompt_len_B - 1,
        done_B=~valid_B | (max_new_tokens <= 0),
        tokens_RxN=jnp.full((rows, n), static.pad_id, jnp.int32),
        logps_RxN=jnp.zeros((rows, n), jnp.float32),
        sample_logps_RxN=jnp.zeros((rows, n), jnp.float32),
        lengths_R=jnp.zeros((rows,), jnp.int32),
    )
    s = record(s, last_logits_BxV)

    def body(s: DecodeState):
        position_B = s.position_B + 1
        logits_Bx1xV, cache = model.forward_with_cache(
            s.last_token_B[:, None], position_B[:, None], jnp.ones((s.row_B.shape[0], 1), jnp.int32), s.cache,
            p + s.step - 1,
        )
        return record(s.replace(cache=cache, position_B=position_B), logits_Bx1xV[:, 0])

    limit = jnp.minimum(max_new_tokens, n)
    for i, size in enumerate(static.stages):
        if i:
            s = _compact(s, size)
        after = static.stages[i + 1] if i + 1 < len(static.stages) else 0  # move on at <= `after` live rows
        s = jax.lax.while_loop(lambda s, after=after: (s.step < limit) & ((~s.done_B).sum() > after), body, s)
    out = {
        "tokens_BxN": s.tokens_RxN,
        "logps_BxN": s.logps_RxN,
        "sample_logps_BxN": s.sample_logps_RxN,
        "lengths_B": s.lengths_R,
        "num_steps": s.step - 1,
    }
    # (a few KB gathered; the mesh is the one ``mesh_rules`` set around the call)
    return jax.lax.with_sharding_constraint(out, jax.P()) if static.replicate else out


generate_program = jax.jit(_generate_program, static_argnames=("graphdef", "static"))


_COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/jaxpr_to_mlir_module_duration",
                   "/jax/core/compile/backend_compile_duration")
_compile_clock = threading.local()  # seconds this thread spent tracing, lowering, compiling the program


_PROGRAM_NAMES = ("_generate_program", "jit(_generate_program)")  # as traced, as lowered and compiled


def _on_compile_event(event: str, duration: float, fun_name: str | None = None, **_) -> None:
    if fun_name in _PROGRAM_NAMES and event in _COMPILE_EVENTS:
        _compile_clock.seconds = getattr(_compile_clock, "seconds", 0.0) + duration


jax.monitoring.register_event_duration_secs_listener(_on_compile_event)


def clear_cache() -> None:
    """Drops the compiled sampling programs (after changing a constant they trace)."""
    generate_program.clear_cache()


def compile_seconds() -> float:
    """Seconds this thread has spent tracing, lowering and compiling the program so far."""
    return getattr(_compile_clock, "seconds", 0.0)
