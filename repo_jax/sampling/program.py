"""The jitted decode program of :mod:`repo_jax.sampling`: a queue of prompts prefilled a group at a
time into the free slots of a fixed decode batch, a ``while_loop`` of decode steps between the
refills, and once the queue is empty, decode stages over a shrinking batch (the layout and the row
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
    """Carry of the refill and decode ``while_loop``s. ``B`` = the decode slots (``Static.stages[0]``,
    then fewer after each compaction), ``R`` = every output row (queued prompts x samples), ``N`` =
    the token buffer.

    Attributes:
      step: int32 []: decode steps run so far (all slots together); step ``g`` writes the fed
        tokens' keys at ring slot ``P + g % N``.
      next_prompt: int32 []: the first queued prompt slot not yet prefilled.
      cache: the model's KV cache of the ``B`` slots, ``S = P + N`` slots each: the prompt in
        ``[0, P)``, the row's decode tokens in ``N - 1`` consecutive slots of the ring ``[P, S)``.
      row_B: int32 [B]: the output row (``prompt * K + sample``) each slot fills; with the token
        index it keys the row's random stream, so neither refill nor compaction changes a token.
      index_B: int32 [B]: tokens sampled so far in the slot's row (the prefill's token is one).
      last_token_B: int32 [B]: the most recent token, fed to the next decode step.
      position_B: int32 [B]: that token's position (prompt length + index - 1).
      done_B: bool [B]: the slot is free: its row emitted a stop id or ``max_new_tokens``, it was
        never filled, or it holds padding.
      tokens_RxN: int32: new tokens of every output row, ``pad_id`` after a row's end.
      logps_RxN: float32: their log-probs under the unmodified model (0 after the end).
      sample_logps_RxN: float32: their log-probs under the sampling distribution (0 greedy / after).
      lengths_R: int32 [R]: new tokens per output row, stop token included.
    """

    step: jax.Array
    next_prompt: jax.Array
    cache: Any
    row_B: jax.Array
    index_B: jax.Array
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
    stages: tuple[int, ...]  # decode batch sizes: the slots, then the compactions (see _stage_rows)
    replicate: bool  # under a mesh: replicated outputs, so every process reads every row
    group: int = 0  # prompt slots prefilled per refill (0: every queued prompt at once, no refill)
    per_row: bool = False  # temperature_R gives each output row its own temperature (0: greedy)


def _row_keys(seed, rows_B, index_B):
    """The key of token ``index`` of output row ``row``: a function of the seed, the row
    (prompt, sample) and the token's index in its response only."""
    base = jax.random.key(seed)
    return jax.vmap(lambda r, i: jax.random.fold_in(jax.random.fold_in(base, r), i))(rows_B, index_B)


def _generate_program(state, prefix_MxC, prefix_mask_MxC, tokens_QxT, mask_QxT, valid_Q, num_prompts, max_new_tokens,
                      seed, row_offset, temperature_R, *, graphdef, static: Static):
    """Prefill the queued prompt slots a group at a time into free decode slots (each prefill row
    repeated ``K / f`` times), decode between refills, then drain the last rows in ``while_loop``s,
    one per stage size (finished rows compacted away between stages).

    ``tokens_QxT``: the queue's prefill rows (prompt slot ``j`` is rows ``j*f .. j*f + f - 1``);
    ``valid_Q`` marks real prompt slots; ``num_prompts`` (dynamic): queued slots to prefill (the
    rest of the bucket is filler and never prefilled). ``prefix_MxC``: the prompts' common prefix
    (left-padded to ``C``, ``M`` equal rows: the mesh's batch devices), prefilled once into slots
    ``[0, C)`` of every row's cache; the queue's rows are the suffixes, at slots ``[C, C + T)``.
    ``C = 0``: no common prefix. ``row_offset`` (dynamic) is added to the output rows' indices
    in their random keys: a call on prompts ``[a, b)`` with ``row_offset = a * K`` draws the
    tokens those rows get in one call on every prompt."""
    model = nnx.merge(graphdef, state)
    k, n = static.samples_per_row, static.buffer_len
    qf, t = tokens_QxT.shape
    c = prefix_MxC.shape[1]
    p = c + t  # prompt slots: prefix, then suffix
    f = qf // valid_Q.shape[0]
    kk = k * f  # samples per prompt slot: num_samples
    q = valid_Q.shape[0]
    group = static.group or q
    slots = static.stages[0]
    rows = q * kk
    max_len = p + n
    stop_ids = jnp.asarray(static.stop_ids or (-1,), jnp.int32)
    prefix_len = prefix_mask_MxC[0].astype(jnp.int32).sum()
    if c:  # the common prefix, once: its cache rows are every prefill's start
        prefix_cache = model.init_cache(prefix_MxC.shape[0], max_len, dtype=static.cache_dtype)
        _, prefix_cache = model.forward_with_cache(prefix_MxC, positions_from_mask(prefix_mask_MxC), prefix_mask_MxC,
                                                   prefix_cache, jnp.int32(0), last_only=True)

    def choose(logits_BxV, row_B, index_B, live_B):
        """Token, model and sample log-probs, stopped flag of each row (padding where not live)."""
        temp_B = jnp.take(temperature_R, row_B, mode="clip") if static.per_row else None
        token_B, logp_B, sample_logp_B = choose_tokens(logits_BxV, _row_keys(seed, row_B + row_offset, index_B), static.policy, live_B,
                                                       temp_B)
        token_B = jnp.where(live_B, token_B, static.pad_id)
        stopped_B = jnp.isin(token_B, stop_ids) if static.stop_ids else jnp.zeros_like(live_B)
        return token_B, jnp.where(live_B, logp_B, 0.0), jnp.where(live_B, sample_logp_B, 0.0), live_B & stopped_B

    def write(s: DecodeState, row_B, index_B, live_B, token_B, logp_B, sample_logp_B) -> DecodeState:
        """Token ``index`` of each live row into the output buffers (rows that are not live write nothing)."""
        out_B = jnp.where(live_B, row_B, rows)  # out of bounds: dropped
        put = lambda out_RxN, x_B: out_RxN.at[out_B, index_B].set(x_B, mode="drop")
        return s.replace(tokens_RxN=put(s.tokens_RxN, token_B), logps_RxN=put(s.logps_RxN, logp_B),
                         sample_logps_RxN=put(s.sample_logps_RxN, sample_logp_B),
                         lengths_R=s.lengths_R.at[out_B].set(index_B + 1, mode="drop"))

    def refill(s: DecodeState) -> DecodeState:
        """Prefill the next ``group`` prompt slots, sample their first tokens and move their
        ``group * K`` rows into the first free decode slots (the caller ensures there are enough)."""
        j = s.next_prompt
        tok_GxT = jax.lax.dynamic_slice_in_dim(tokens_QxT, j * f, group * f)
        mask_GxT = jax.lax.dynamic_slice_in_dim(mask_QxT, j * f, group * f)
        valid_G = jnp.repeat(jax.lax.dynamic_slice_in_dim(valid_Q, j, group), kk)
        # Prefill: positions count real tokens, so left padding does not shift them.
        prompt_len_G = jnp.repeat(prefix_len + mask_GxT.astype(jnp.int32).sum(axis=1), k)
        if c:
            cache = prefix_cache.take(jnp.zeros((group * f,), jnp.int32))
        else:
            cache = model.init_cache(group * f, max_len, dtype=static.cache_dtype)
        positions_GxT = prefix_len + positions_from_mask(mask_GxT)
        logits_Gx1xV, cache = model.forward_with_cache(tok_GxT, positions_GxT, mask_GxT, cache, jnp.int32(c),
                                                       last_only=True)
        logits_GxV = logits_Gx1xV[:, -1].astype(jnp.float32)
        if k > 1:  # K samples per prompt from one prefill: repeat cache and logits along batch.
            cache = cache.repeat(k)
            logits_GxV = jnp.repeat(logits_GxV, k, axis=0)
        row_G = j * kk + jnp.arange(group * kk, dtype=jnp.int32)
        live_G = valid_G & (max_new_tokens > 0)
        index_G = jnp.zeros_like(row_G)
        token_G, logp_G, sample_logp_G, stopped_G = choose(logits_GxV, row_G, index_G, live_G)
        s = write(s, row_G, index_G, live_G, token_G, logp_G, sample_logp_G)
        if group * kk == slots:  # every slot at once (no refill): no scatter
            free_G = jnp.arange(slots, dtype=jnp.int32)
            put = lambda x_B, y_G: y_G
            cache_B = cache
        else:
            free_G = jnp.nonzero(s.done_B, size=group * kk, fill_value=0)[0]
            put = lambda x_B, y_G: x_B.at[free_G].set(y_G)
            cache_B = s.cache.put(free_G, cache)
        return s.replace(
            next_prompt=j + group,
            cache=cache_B,
            row_B=put(s.row_B, row_G),
            index_B=put(s.index_B, jnp.ones_like(index_G)),
            last_token_B=put(s.last_token_B, token_G),
            position_B=put(s.position_B, prompt_len_G - 1),
            done_B=put(s.done_B, ~live_G | stopped_G | (max_new_tokens <= 1)),
        )

    def decode(s: DecodeState) -> DecodeState:
        """One decode step of every slot: feed the last token at ring slot ``P + step % N``."""
        b = s.row_B.shape[0]
        live_B = ~s.done_B
        position_B = s.position_B + 1
        logits_Bx1xV, cache = model.forward_with_cache(
            s.last_token_B[:, None], position_B[:, None], jnp.ones((b, 1), jnp.int32), s.cache, p + s.step % n)
        token_B, logp_B, sample_logp_B, stopped_B = choose(logits_Bx1xV[:, 0], s.row_B, s.index_B, live_B)
        s = write(s, s.row_B, s.index_B, live_B, token_B, logp_B, sample_logp_B)
        index_B = s.index_B + live_B.astype(jnp.int32)
        return s.replace(step=s.step + 1, cache=cache, position_B=position_B, last_token_B=token_B, index_B=index_B,
                         done_B=s.done_B | stopped_B | (index_B >= max_new_tokens))

    s = DecodeState(
        step=jnp.int32(0),
        next_prompt=jnp.int32(0),
        cache=model.init_cache(slots, max_len, dtype=static.cache_dtype),
        row_B=jnp.zeros((slots,), jnp.int32),
        index_B=jnp.zeros((slots,), jnp.int32),
        last_token_B=jnp.zeros((slots,), jnp.int32),
        position_B=jnp.zeros((slots,), jnp.int32),
        done_B=jnp.ones((slots,), bool),
        tokens_RxN=jnp.full((rows, n), static.pad_id, jnp.int32),
        logps_RxN=jnp.zeros((rows, n), jnp.float32),
        sample_logps_RxN=jnp.zeros((rows, n), jnp.float32),
        lengths_R=jnp.zeros((rows,), jnp.int32),
    )
    live = lambda s: (~s.done_B).sum()
    if group == q:  # one prefill of the whole queue: no refill
        s = refill(s)
    else:  # decode until a group's rows fit in the free slots, then refill them; until the queue is empty
        make_room = lambda s: jax.lax.while_loop(lambda s: slots - live(s) < group * kk, decode, s)
        s = jax.lax.while_loop(lambda s: s.next_prompt < num_prompts, lambda s: refill(make_room(s)), s)
    for i, size in enumerate(static.stages):
        if i:
            s = _compact(s, size)
        after = static.stages[i + 1] if i + 1 < len(static.stages) else 0  # move on at <= `after` live rows
        s = jax.lax.while_loop(lambda s, after=after: live(s) > after, decode, s)
    out = {
        "tokens_BxN": s.tokens_RxN,
        "logps_BxN": s.logps_RxN,
        "sample_logps_BxN": s.sample_logps_RxN,
        "lengths_B": s.lengths_R,
        "num_steps": s.step,
    }
    # (a few KB gathered; the mesh is the one ``mesh_rules`` set around the call)
    return jax.lax.with_sharding_constraint(out, jax.P()) if static.replicate else out


generate_program = jax.jit(_generate_program, static_argnames=("graphdef", "static"))


COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/jaxpr_to_mlir_module_duration",
                   "/jax/core/compile/backend_compile_duration")
_compile_clock = threading.local()  # seconds this thread spent tracing, lowering, compiling the program


_PROGRAM_NAMES = ("_generate_program", "jit(_generate_program)")  # as traced, as lowered and compiled


def _on_compile_event(event: str, duration: float, fun_name: str | None = None, **_) -> None:
    if fun_name in _PROGRAM_NAMES and event in COMPILE_EVENTS:
        _compile_clock.seconds = getattr(_compile_clock, "seconds", 0.0) + duration


jax.monitoring.register_event_duration_secs_listener(_on_compile_event)


def clear_cache() -> None:
    """Drops the compiled sampling programs (after changing a constant they trace)."""
    generate_program.clear_cache()


def compile_seconds() -> float:
    """Seconds this thread has spent tracing, lowering and compiling the program so far."""
    return getattr(_compile_clock, "seconds", 0.0)
