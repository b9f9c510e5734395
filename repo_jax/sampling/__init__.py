"""Batched sampling with the models' KV cache: prefills of queued prompts into a decode batch, and a
``while_loop`` of decode steps.

The whole generation (prefills, first tokens, the decode loops) is one jitted program per
*bucket*: batch size, prompt length and new-token buffer are rounded up (powers of two by
default) so that a long run compiles only a handful of times. ``jax.jit``'s own cache keeps the
programs, keyed by the static arguments (the model's graphdef and a hashable ``Static``: the
sampling policy, buffer, stop ids, stages) and the arguments' shapes, dtypes and shardings.
The program itself is :mod:`repo_jax.sampling.program`, the token choice
:mod:`repo_jax.sampling.policies`, the decode-row bookkeeping :mod:`repo_jax.sampling.rows`;
this module is the host side (buckets, padding, placement) and the public API.

Layout of one call (``P`` = prompt bucket, ``N`` = new-token bucket, ``S = P + N`` cache slots,
``K`` = ``num_samples``; an output row ``r = prompt * K + sample`` is one response):

* prompts are left-padded to ``P``; slots ``[0, P)`` hold the prompt (padding slots are masked
  by ``attention_mask``), positions count real tokens only, so padding never shifts RoPE;
* the prefill logits at the last prompt slot give the first new token;
* ``K`` responses per prompt reuse one prefill: the cache and the last logits are repeated along
  batch. Under a mesh whose batch axes do not divide the prompts, each prompt is prefilled ``f``
  times (``f`` divides ``K``) and each of those rows repeated ``K / f`` times (``_prefill_layout``);
* each decode step feeds every row its last token and samples the next. Step ``g`` writes the
  fed tokens' keys at slot ``P + g % N``: the decode slots are a ring, and a row (at most
  ``N - 1`` decode steps) owns ``N - 1`` consecutive ones from wherever it started; attention is
  causal by position (``models.layers.make_cache_context``), so the ring's order never matters;
* the random key of token ``i`` of output row ``r`` is ``fold_in(fold_in(key(seed), r), i)``, and
  a row's logits depend only on its own prompt and tokens, so a row's tokens do not depend on
  the batch it is decoded in, when it started, or the mesh.

**Refilled decode rows.** With ``slots`` fewer than the ``prompts x K`` rows, the call keeps a
decode batch of ``slots`` rows and a queue of prompts (the prefill / insert-into-slot model of
serving engines): once ``prefill_group x K`` slots are free, the next ``prefill_group`` prompts
are prefilled together (one compiled prefill shape) and their rows -- cache, first token,
position -- written into the free slots; decoding goes on. The batch stays full until the queue
runs out, and the tokens are those of one batch holding every row. Without ``slots`` every
prompt is prefilled at once (no queue).

A sequence stops *after* emitting a stop id (the stop token is returned and counted in
``lengths``, like transformers' greedy output), or after ``max_new_tokens``; the loop ends as soon
as the queue is empty and every row has stopped. Everything after a row's end is ``pad_id``
(log-probs 0).

Once the queue is empty, finished rows stop costing steps: when no more than half the decode
batch is live, the live rows (with their cache) are gathered into a batch of half the size and
decoding goes on there, up to ``max_compactions`` times per call (each size is one more loop body
in the same program; ``rows.py``). Before that, refill keeps the batch full instead.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from repo_jax import sharding as shd
from repo_jax.padding import round_up
from repo_jax.sampling.policies import SamplingPolicy, choose_tokens, filter_logits
from repo_jax.sampling.program import DecodeState, Static, clear_cache, compile_seconds, generate_program
from repo_jax.sampling.rows import _stage_rows

__all__ = ["DecodeState", "SampleOutput", "SamplingPolicy", "bucket", "choose_tokens", "clear_cache",
           "decoding_model", "filter_logits", "generate", "param_shardings", "sample"]

# --------------------------------------------------------------------------------------------
# Host side: bucketing, padding, placement, public API
# --------------------------------------------------------------------------------------------


def bucket(n: int, buckets: Sequence[int] | None = None, *, minimum: int = 1, half_steps: bool = False) -> int:
    """The sampler's shape buckets: :func:`repo_jax.padding.round_up`."""
    return round_up(n, buckets, minimum=minimum, half_steps=half_steps)


@flax.struct.dataclass
class SampleOutput:
    """Result of :func:`sample` (host numpy arrays); row ``r`` continues prompt ``r // num_samples``.

    Attributes:
      tokens_BxS: int32 [B*K, max_new_tokens]: new tokens, ``pad_id`` after each row's end.
      logps_BxS: float32: log-prob of each token under the unmodified model (raw logits,
        temperature 1, no top-k/top-p) -- the policy log-prob the training loop uses.
      sample_logps_BxS: float32: log-prob under the distribution sampled from (temperature,
        top-k, top-p applied); 0 for greedy.
      lengths_B: int32 [B*K]: new tokens per row, the stop token included.
      prompt_index_B: int32 [B*K]: the prompt each row continues.
      num_steps: decode steps run (each feeds every decode slot one token; prefills not counted;
        ``<= max_new_tokens - 1`` without refill).
      compile_seconds: time spent tracing and compiling in this call (0 when ``jax.jit``
        already held the program).
      run_seconds: wall time of the call less ``compile_seconds`` (prefill + decode, blocked on).
    """

    tokens_BxS: np.ndarray
    logps_BxS: np.ndarray
    sample_logps_BxS: np.ndarray
    lengths_B: np.ndarray
    prompt_index_B: np.ndarray
    num_steps: int = flax.struct.field(pytree_node=False)
    compile_seconds: float = flax.struct.field(pytree_node=False)
    run_seconds: float = flax.struct.field(pytree_node=False)


COMPACT_MIN_ROWS = 16  # no decode batch is compacted below this many rows

def _check_mesh(mesh) -> None:
    """Refuses Explicit (and Manual) mesh axes: the models leave activation layouts to the
    compiler (Auto), and under Explicit axes their gathers and einsums have no resolvable layout."""
    if mesh is not None and any(t != jax.sharding.AxisType.Auto for t in mesh.axis_types):
        raise ValueError(
            f"sampling needs a mesh with Auto axis types, got {mesh.axis_types}; build it with "
            "repo_jax.sharding.make_mesh or jax.make_mesh(..., axis_types=(AxisType.Auto,) * n)"
        )


def _prefill_layout(b: int, num_samples: int, mult: int) -> tuple[int, int]:
    """``(b, f)``: ``b`` prompt slots (the bucket, grown by filler slots if needed), each prefilled
    ``f`` times (``f`` divides ``num_samples``), so that both the ``b * f`` prefill rows and the
    ``b * num_samples`` decode rows divide over the mesh's batch axes (``mult`` devices).

    Repeating a prompt is preferred to adding filler slots: both add prefill rows (the same
    number, up to ``mult``, with power-of-two buckets and batch axes), but every filler slot also
    adds ``num_samples`` decode rows that each step of the loop computes although they are done.
    Filler slots are added only where no ``f`` exists (``b * num_samples`` is not a multiple of
    ``mult``), and then the fewest that make it one.
    """
    while (b * num_samples) % mult:
        b += 1
    f = next(f for f in range(1, num_samples + 1) if num_samples % f == 0 and (b * f) % mult == 0)
    return b, f


MIN_SHARED_PREFIX = 8  # a shorter common prefix is prefilled with each prompt


def _common_prefix(prompts) -> int:
    """Length of the prompts' longest common prefix, leaving every prompt at least one token
    (its last logits start the response); 0 when under ``MIN_SHARED_PREFIX``."""
    first, c = prompts[0], min(len(x) for x in prompts) - 1
    for x in prompts[1:]:
        c = next((i for i in range(c) if x[i] != first[i]), c)
    return c if c >= MIN_SHARED_PREFIX else 0


def _left_padded(prompts, b: int, p: int, pad_id: int):
    """``(tokens_BxP, mask_BxP, valid_B)`` for ``b`` slots: the prompts left-padded to ``p``, then
    filler slots that copy prompt 0 (any real tokens keep the prefill finite) and are not valid."""
    tokens_BxP = np.full((b, p), pad_id, np.int32)
    mask_BxP = np.zeros((b, p), np.int32)
    for i in range(b):
        row = prompts[i] if i < len(prompts) else prompts[0]
        tokens_BxP[i, p - len(row) :] = row
        mask_BxP[i, p - len(row) :] = 1
    return tokens_BxP, mask_BxP, np.arange(b) < len(prompts)


def _place(x, sharding: jax.NamedSharding) -> jax.Array:
    """A global host array -> a ``jax.Array`` laid out by ``sharding``; each process fills only its
    own devices' shards, from the same global ``x`` that every process holds."""
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def param_shardings(state, mesh, rules=shd.SAMPLE_RULES):
    """NamedShardings for a model state from its parameters' logical axis names (sampling layout)."""
    return shd.state_shardings(state, mesh, rules)


def program_inputs(prompts: Sequence[Sequence[int]], *, max_new_tokens: int, temperature=0.0, top_k=None,
                   top_p=None, eos_id=None, seed: int = 0, num_samples: int = 1, pad_id: int = 0, mesh=None,
                   batch_buckets=None, length_buckets=None, new_token_buckets=None, cache_dtype=None,
                   max_compactions: int = 3, slots: int | None = None, prefill_group: int | None = None,
                   share_prefix: bool = True, row_offset: int = 0) -> tuple[tuple, Static]:
    """The decode program's arguments after the model state (host arrays) and its ``Static``, for
    :func:`sample`'s arguments of the same names; ``python -m repo_jax.plan`` lowers the program
    with them and an abstract model state, so the planned program is the one a run compiles."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("sample() needs at least one prompt and every prompt needs at least one token")
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    stop_ids = () if eos_id is None else ((int(eos_id),) if np.isscalar(eos_id) else tuple(int(e) for e in eos_id))
    n_prompts, k = len(prompts), int(num_samples)
    per_row = not np.isscalar(temperature)
    if per_row:
        temps = np.asarray(temperature, np.float32)
        if temps.shape != (n_prompts,) or (temps < 0).any():
            raise ValueError(f"temperature: one value >= 0 per prompt ({n_prompts}), got shape {temps.shape}")
        if top_k is not None or top_p is not None:
            raise ValueError("a temperature per prompt takes no top_k / top_p")
        temperature = float(temps.max())
    policy = SamplingPolicy(float(temperature), None if top_k is None else int(top_k), None if top_p is None else float(top_p))
    per_row = per_row and not policy.greedy
    mult = 1 if mesh is None else shd.batch_size_multiple(mesh)
    b = bucket(n_prompts, batch_buckets)
    if slots is not None:
        slots = max(int(slots), k)
        slots += -slots % mult
    if slots is None or b * k <= slots:  # every row fits at once: one prefill, no refill
        q, f = _prefill_layout(b, k, mult)
        group, n_slots = 0, q * k
    else:  # a queue of prompt slots, `group` of them prefilled per refill
        group, f = _prefill_layout(max(1, int(prefill_group or slots // (32 * k))), k, mult)
        n_slots = max(slots, group * k)
        q = group * bucket(-(-n_prompts // group))
    c = _common_prefix(prompts) if share_prefix else 0
    c_bucket = bucket(c, length_buckets, minimum=8, half_steps=True) if c else 0
    p = bucket(max(len(x) for x in prompts) - c, length_buckets, minimum=8, half_steps=True)
    n = bucket(max(1, max_new_tokens), new_token_buckets, minimum=8)
    prefix, prefix_mask, _ = _left_padded([prompts[0][:c]], mult, c_bucket, pad_id) if c else (
        np.zeros((1, 0), np.int32), np.zeros((1, 0), np.int32), None)
    # Prefill row j holds prompt slot j // f; output row r continues prompt slot r // K.
    tokens, mask, valid = _left_padded([x[c:] for x in prompts], q, p, pad_id)
    tokens, mask = np.repeat(tokens, f, axis=0), np.repeat(mask, f, axis=0)

    stages = _stage_rows(n_slots, mult, min_rows=COMPACT_MIN_ROWS, max_compactions=max_compactions)
    static = Static(policy, k // f, n, stop_ids, int(pad_id), cache_dtype, stages, replicate=mesh is not None,
                    group=group, per_row=per_row)
    temperature_R = np.zeros((q * k,), np.float32)  # output row r continues prompt r // K
    if per_row:
        temperature_R[:n_prompts * k] = np.repeat(temps, k)
    return (prefix, prefix_mask, tokens, mask, valid, np.int32(n_prompts), np.int32(max_new_tokens),
            np.uint32(seed), np.int32(row_offset), temperature_R), static


def sample(
    model,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    temperature: float | Sequence[float] = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_id: int | Sequence[int] | None = None,
    seed: int = 0,
    num_samples: int = 1,
    pad_id: int = 0,
    mesh: jax.sharding.Mesh | None = None,
    shardings=None,
    batch_buckets: Sequence[int] | None = None,
    length_buckets: Sequence[int] | None = None,
    new_token_buckets: Sequence[int] | None = None,
    cache_dtype=None,
    unstack: bool | None = None,
    max_compactions: int = 3,
    slots: int | None = None,
    prefill_group: int | None = None,
    share_prefix: bool = True,
    row_offset: int = 0,
) -> SampleOutput:
    """Samples ``num_samples`` continuations of each prompt; see the module docstring.

    Args:
      model: an NNX model with ``init_cache`` and ``forward_with_cache``, whose cache repeats and
        gathers its rows (``cache.repeat(k)``, ``cache.take(rows_B)``: the models' ``KVCache``).
      prompts: token-id lists (non-empty), any lengths; left-padded internally.
      eos_id: a stop id or a list of them; ``None`` never stops early.
      mesh: optional, with Auto axis types (``repo_jax.sharding.make_mesh``); rows are sharded
        over the mesh's batch axes (``data``, ``fsdp``) and parameters laid out by ``shardings``
        (a pytree of NamedShardings matching ``nnx.state(model)``) or, if omitted, by their
        logical names under ``SAMPLE_RULES``. Any prompt count and ``num_samples`` fit any batch
        axes (prompts are repeated or padded, see ``_prefill_layout``), with the tokens of one
        device. With several processes, every process calls ``sample`` with the same global
        ``prompts`` and arguments (each places its own devices' shards of them) and gets every
        row back: the outputs are replicated.
      unstack: decode a ``CausalLM`` in its unstacked layout (``model.unstacked()``: per-layer
        weights and KV buffers, a copy of the weights). ``None``: on CPU only, where a scan over
        stacked weights copies every layer's slice per decoded token (1.5x slower per token at
        batch 16 for SmolLM2-135M); accelerators read the slices in place and keep one copy of
        the weights. A loop sampling many times can pass ``model.unstacked()`` itself.
      max_compactions: how many times the decode batch may halve once the queue is empty and half its rows have
        finished (live rows gathered, see ``_stage_rows``; batches under ``2 * COMPACT_MIN_ROWS``
        rows never compact). Each size is one more compiled loop body; 0 turns it off. The tokens
        are those of an uncompacted call.
      slots: decode slots (rows decoded together). ``None``: every row at once (one prefill of
        all prompts, no refill). Fewer slots than ``prompts x num_samples`` rows: the prompts
        queue, ``prefill_group`` at a time are prefilled into the slots that finished rows freed
        (see the module doc); rounded up to a multiple of the mesh's batch devices and to at least
        one group's rows. The tokens do not depend on it.
      prefill_group: prompts per refill (default ``slots / (32 * num_samples)``, at least 1: refilling
        as soon as a prompt's rows fit keeps the batch fullest, and a small prefill costs little
        more per token; SmolLM2, 64 slots, 256 rows at T=0.8 on 2 CPU cores: 455 tokens/s with
        groups of 1 prompt, 382 with 4, 332 with 8); under a mesh it may grow like the batch
        bucket (see ``_prefill_layout``).
      share_prefix: prefill the prompts' longest common prefix (a chat template's system turn)
        once and copy its cache into every row, when it is at least ``MIN_SHARED_PREFIX`` tokens
        (each prompt keeps one token of its own). The tokens do not depend on it.
      row_offset: the index of these prompts' first output row in a larger batch: sampling
        prompts ``[a, b)`` with ``row_offset = a * num_samples`` gives the tokens one call on
        all the prompts gives them (the host loop samples a round in waves this way).
      *_buckets: allowed sizes. Defaults: batch and new-token buffer powers of two, prompt length
        ``2^k`` or ``3 * 2^(k-1)`` (prefill cost is linear in it); under a mesh the batch bucket
        may grow by filler slots (see ``_prefill_layout``).
    """
    _check_mesh(mesh)
    inputs, static = program_inputs(
        prompts, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, eos_id=eos_id,
        seed=seed, num_samples=num_samples, pad_id=pad_id, mesh=mesh, batch_buckets=batch_buckets,
        length_buckets=length_buckets, new_token_buckets=new_token_buckets, cache_dtype=cache_dtype,
        max_compactions=max_compactions, slots=slots, prefill_group=prefill_group, share_prefix=share_prefix,
        row_offset=row_offset)
    n_prompts, k = len(prompts), int(num_samples)
    model = decoding_model(model, unstack)
    graphdef, state = nnx.split(model)
    args = (state, *inputs)
    if mesh is not None:
        state_sh = shardings if shardings is not None else param_shardings(state, mesh)
        repl = shd.replicated(mesh)
        args = (jax.device_put(state, state_sh), *(_place(x, repl) for x in args[1:]))

    before = compile_seconds()
    t0 = time.perf_counter()
    with shd.mesh_rules(mesh, shd.SAMPLE_RULES):
        out = jax.block_until_ready(generate_program(*args, graphdef=graphdef, static=static))
    compiled_in = compile_seconds() - before
    run_seconds = time.perf_counter() - t0 - compiled_in
    out = jax.device_get(out)
    keep = n_prompts * k
    return SampleOutput(
        tokens_BxS=np.asarray(out["tokens_BxN"][:keep, :max_new_tokens]),
        logps_BxS=np.asarray(out["logps_BxN"][:keep, :max_new_tokens]),
        sample_logps_BxS=np.asarray(out["sample_logps_BxN"][:keep, :max_new_tokens]),
        lengths_B=np.asarray(out["lengths_B"][:keep]),
        prompt_index_B=np.repeat(np.arange(n_prompts, dtype=np.int32), k),
        num_steps=int(out["num_steps"]),
        compile_seconds=compiled_in,
        run_seconds=run_seconds,
    )


def decoding_config(cfg):
    """The ``ModelConfig`` of a decoding copy: the compute dtype as the storage dtype when it is
    narrower (float32 master weights, bfloat16 compute), else ``cfg`` (``python -m repo_jax.plan``
    plans the sampler with it)."""
    if cfg.jnp_dtype.itemsize >= cfg.jnp_param_dtype.itemsize:
        return cfg
    return cfg.replace(param_dtype=cfg.dtype)


# one compiled cast per (shapes, dtype): the loop makes a decoding copy every round
_cast_floats = jax.jit(lambda tree, dtype: jax.tree.map(
    lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree), static_argnums=1)


def in_compute_dtype(model):
    """``model`` with its floating weights stored as :func:`decoding_config` says: the layers cast
    every weight to the compute dtype before using it, so a bfloat16 copy of float32 master
    weights computes the same and holds half the bytes (Mistral-7B: 13.5 GiB instead of 27 per
    replica). Otherwise ``model`` itself."""
    cfg = getattr(model, "config", None)
    if cfg is None or decoding_config(cfg) is cfg:
        return model
    graphdef, abs_state = nnx.split(nnx.eval_shape(lambda: type(model)(decoding_config(cfg), rngs=nnx.Rngs(0))))
    paths, arrays = zip(*[(path, v[...]) for path, v in nnx.to_flat_state(nnx.state(model))])
    values = dict(zip(paths, _cast_floats(list(arrays), cfg.jnp_dtype)))
    flat = [(path, var.replace(values[path])) for path, var in nnx.to_flat_state(abs_state)]
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def decoding_model(model, unstack: bool | None = None):
    """The model :func:`sample` decodes with: ``model.unstacked()`` when ``unstack`` says so
    (``None``: when the weights live on CPU), else ``model`` (see ``sample``'s ``unstack``);
    LoRA adapters are folded into the weights first (``models.lora.merge``: decoding costs what
    the base costs), and float32 master weights of a bf16-compute model are cast to bf16
    (:func:`in_compute_dtype`)."""
    if not hasattr(model, "unstacked"):
        return model
    from repo_jax.models import lora

    model = in_compute_dtype(lora.merge(model))
    if unstack is None:
        leaf = jax.tree.leaves(nnx.state(model))[0]
        unstack = all(d.platform == "cpu" for d in leaf.devices())
    return model.unstacked() if unstack else model


def sampling_copy(model, mesh: jax.sharding.Mesh | None = None):
    """:func:`decoding_model` of ``model`` with its parameters laid out for :func:`sample` on
    ``mesh`` (:func:`param_shardings`, in a new model) when the mesh has more than one device."""
    model = decoding_model(model)
    if mesh is not None and mesh.size > 1:  # a new model: the caller's keeps its own placement
        graphdef, state = nnx.split(model)
        model = nnx.merge(graphdef, jax.device_put(state, param_shardings(state, mesh)))
    return model


def generate(model, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, **options) -> list[list[int]]:
    """New tokens of each prompt, up to and including the first ``eos_id`` (greedy unless
    ``options`` say otherwise: any keyword of :func:`sample`)."""
    out = sample(model, prompts, max_new_tokens=max_new_tokens, **options)
    return [row[:n].tolist() for row, n in zip(out.tokens_BxS, out.lengths_B)]
