"""Building blocks shared by the Mistral/Llama and Phi-2 ports, as pure functions on arrays.

Parameters live in the models as stacked ``nnx.Param`` arrays (leading ``layers`` axis) and are
scanned over; each block receives one layer's slice as a dict. Matmuls take ``dtype`` inputs and
accumulate in float32 (``preferred_element_type``); norms, rotary embeddings and the softmax run
in float32.

Dimension letters (DESIGN.md's alphabet): B batch (here the sequences of a forward: the train
step's ``R = B * K`` rows are its ``B``), T query length, S key length (cache slots), D model,
N query heads, G kv heads, H head dim, F mlp hidden, V vocab, L layers; and three local to
this file: Q query heads per kv head (``N = G * Q``), E the flattened heads (``E = N * H``),
J the LoRA rank (:func:`project`).
"""

from __future__ import annotations

import functools
import itertools
import math
import zlib

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from repo_jax import sharding as shd
from repo_jax.models.config import RopeScaling

F32 = jnp.float32


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 3))
def matmul(spec: str, a, b, dtype):
    """``einsum(spec, a, b)`` on ``dtype`` inputs with float32 accumulation; float32 result.

    The backward pass keeps the same precision contract: both gradient einsums take ``dtype``
    inputs (the incoming cotangent is cast to ``dtype``) and accumulate in float32. JAX's own
    transpose of a ``preferred_element_type=float32`` dot would feed the float32 cotangent in
    and promote the other operand, so with bfloat16 compute every backward matmul would run in
    float32 (twice the operand bytes, and off the bf16 matmul units of accelerators). The
    explicit gradient einsums also suit XLA:CPU in float32 (policy gradient on 8 x 256 tokens of
    SmolLM2-135M: 21.3 -> 17.7 s). ``spec`` must name every index in at least two of
    its three terms (true of every matmul here), so each gradient is an einsum of the other two.
    """
    return jnp.einsum(spec, a.astype(dtype), b.astype(dtype), preferred_element_type=F32)


def _matmul_fwd(spec, a, b, dtype):
    a_c, b_c = a.astype(dtype), b.astype(dtype)
    out = jnp.einsum(spec, a_c, b_c, preferred_element_type=F32)
    return out, (a_c, b_c, jnp.zeros((), a.dtype), jnp.zeros((), b.dtype))


def _matmul_bwd(spec, dtype, res, g):
    a_c, b_c, a_like, b_like = res
    lhs, rest = spec.split(",")
    rhs, out = rest.split("->")
    g_c = g.astype(dtype)
    da = jnp.einsum(f"{out},{rhs}->{lhs}", g_c, b_c, preferred_element_type=F32).astype(a_like.dtype)
    db = jnp.einsum(f"{lhs},{out}->{rhs}", a_c, g_c, preferred_element_type=F32).astype(b_like.dtype)
    return da, db


matmul.defvjp(_matmul_fwd, _matmul_bwd)


def dense(x, w, spec: str, dtype):
    """``einsum(spec, x, w)`` with float32 accumulation, result in ``dtype`` (see :func:`matmul`)."""
    return matmul(spec, x, w, dtype).astype(dtype)


def adapter_specs(spec: str) -> tuple[str, str]:
    """The two einsums of a low-rank update beside ``spec`` (``J`` the LoRA rank):
    ``"BTD,DNH->BTNH"`` -> ``("BTD,DJ->BTJ", "BTJ,JNH->BTNH")``."""
    lhs, rest = spec.split(",")
    rhs, out = rest.split("->")
    into = "".join(c for c in rhs if c in lhs)
    outof = "".join(c for c in rhs if c not in lhs)
    batch = "".join(c for c in lhs if c not in rhs)
    if out != batch + outof:
        raise ValueError(f"no low-rank form for {spec!r}")
    return f"{lhs},{into}J->{batch}J", f"{batch}J,J{outof}->{out}"


def project(x, w, spec: str, dtype, adapter=None):
    """:func:`dense`, plus a LoRA update when ``adapter`` is given: ``(a, b, scale, rate, key)``
    with ``a`` over ``w``'s input dimensions and the rank, ``b`` over the rank and ``w``'s
    output dimensions (``models.lora``); ``x W + scale * dropout(x) A B``, summed in float32,
    so a zero ``b`` gives exactly ``dense``'s result. ``rate`` > 0 with a ``key``: inverted
    dropout on the adapter's input only (as PEFT)."""
    if adapter is None:
        return dense(x, w, spec, dtype)
    a, b, scale, rate, key = adapter
    spec_a, spec_b = adapter_specs(spec)
    x_in = x
    if rate and key is not None:
        keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
        x_in = jnp.where(keep, x / (1.0 - rate), 0.0).astype(x.dtype)
    low = matmul(spec_a, x_in, a, dtype).astype(dtype)
    return (matmul(spec, x, w, dtype) + scale * matmul(spec_b, low, b, dtype)).astype(dtype)


def project_shared(x, projections, dtype):
    """:func:`project` of one input through several weights, ``projections`` a list of ``(w,
    spec, adapter)`` whose specs contract the same input dimensions (q, k and v of one
    normalised input). The adapters' first matmuls run as one (their ``A``s concatenated along
    the rank): one read of ``x`` instead of one per adapter, where the skinny ``x A`` products
    are bound by memory traffic, not FLOPs. Adapters with dropout keep their own masks and
    matmuls (as PEFT: an independent mask per adapted module)."""
    fused = [i for i, (_, _, ad) in enumerate(projections) if ad is not None and not (ad[3] and ad[4] is not None)]
    if len(fused) < 2:
        return [project(x, w, spec, dtype, ad) for w, spec, ad in projections]
    spec_a, _ = adapter_specs(projections[fused[0]][1])
    a_cat = jnp.concatenate([projections[i][2][0] for i in fused], axis=-1)
    low = matmul(spec_a, x, a_cat, dtype).astype(dtype)
    ranks = [projections[i][2][0].shape[-1] for i in fused]
    lows = dict(zip(fused, jnp.split(low, list(itertools.accumulate(ranks))[:-1], axis=-1)))
    out = []
    for i, (w, spec, ad) in enumerate(projections):
        if i not in lows:
            out.append(project(x, w, spec, dtype, ad))
            continue
        _, spec_b = adapter_specs(spec)
        a, b, scale, _, _ = ad
        out.append((matmul(spec, x, w, dtype) + scale * matmul(spec_b, lows[i], b, dtype)).astype(dtype))
    return out


def adapter_of(p, name: str, lora):
    """:func:`project`'s ``adapter`` for the layer parameter ``name`` from one layer's dict ``p``:
    its ``p["lora"][name]`` arrays (``models.lora``) with ``lora``'s scale and dropout rate, and a
    dropout key folded from ``p["lora_key"]`` when the forward has one; ``None`` when ``name`` is
    not adapted."""
    ad = p.get("lora", {}).get(name)
    if ad is None:
        return None
    key = p.get("lora_key")
    if key is not None:
        key = jax.random.fold_in(key, zlib.crc32(name.encode()) & 0x7FFFFFFF)
    return ad["a"], ad["b"], lora.scale, lora.dropout, key


def rms_norm(x_BxTxD, scale_D, eps: float, dtype):
    x = x_BxTxD.astype(F32)
    x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps)
    return (x * scale_D.astype(F32)).astype(dtype)


def layer_norm(x, scale, bias, eps: float, dtype):
    x = x.astype(F32)
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    x = (x - mean) * jax.lax.rsqrt(var + eps)
    return (x * scale.astype(F32) + bias.astype(F32)).astype(dtype)


def activation(name: str):
    if name == "silu":
        return jax.nn.silu
    if name in ("gelu_new", "gelu_pytorch_tanh"):
        return lambda x: jax.nn.gelu(x, approximate=True)
    return lambda x: jax.nn.gelu(x, approximate=False)


# --------------------------------------------------------------------------------------------
# Rotary embeddings (the "rotate half" layout of HF checkpoints)
# --------------------------------------------------------------------------------------------


def rope_inv_freq(rotary_dim: int, theta: float, scaling: RopeScaling | None = None) -> np.ndarray:
    """The rotary frequencies ``theta^(-2i / rotary_dim)``, float32 ``[rotary_dim // 2]``, scaled
    as HF's ``rope_type`` says: ``linear`` divides every frequency by ``factor``; ``llama3``
    (Llama-3.1) divides the low frequencies (wavelength above ``original / low_freq``) by
    ``factor``, keeps the high ones (below ``original / high_freq``) and blends the band between
    linearly in ``original / wavelength``; ``yarn`` blends interpolated (``/ factor``) and
    original frequencies along a ramp over the dimensions that turn between ``beta_fast`` and
    ``beta_slow`` times in the original context. ``dynamic`` depends on the positions of the
    forward: :func:`rope_angles`."""
    inv = 1.0 / (np.float32(theta) ** (np.arange(0, rotary_dim, 2, dtype=np.float32) / np.float32(rotary_dim)))
    if scaling is None or scaling.kind == "dynamic":
        return inv.astype(np.float32)
    factor = np.float32(scaling.factor)
    if scaling.kind == "linear":
        inv = inv / factor
    elif scaling.kind == "llama3":
        ratio = np.float32(scaling.original) * inv / np.float32(2 * np.pi)  # original context / wavelength
        blend = np.clip((ratio - np.float32(scaling.low_freq)) / np.float32(scaling.high_freq - scaling.low_freq),
                        0.0, 1.0)  # 0: low band (scaled), 1: high band (kept)
        inv = (1.0 - blend) * inv / factor + blend * inv
    elif scaling.kind == "yarn":
        keep = 1.0 - _yarn_ramp(rotary_dim, theta, scaling)  # 1: extrapolate (keep), 0: interpolate
        inv = inv / factor * (1.0 - keep) + inv * keep
    else:
        raise ValueError(f"rope scaling kind {scaling.kind!r} is not one of linear, dynamic, llama3, yarn")
    return inv.astype(np.float32)


def _yarn_ramp(rotary_dim: int, theta: float, s: RopeScaling) -> np.ndarray:
    """YaRN's ramp over the ``rotary_dim // 2`` frequencies: 0 up to the dimension that turns
    ``beta_fast`` times in the original context, 1 from the one that turns ``beta_slow`` times."""

    def dim_of(turns: float) -> float:
        return rotary_dim * math.log(s.original / (turns * 2 * math.pi)) / (2 * math.log(theta))

    low, high = dim_of(s.beta_fast), dim_of(s.beta_slow)
    if s.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, rotary_dim - 1)
    if low == high:
        high += 0.001
    return np.clip((np.arange(rotary_dim // 2, dtype=np.float32) - low) / np.float32(high - low), 0.0, 1.0)


def _dynamic_inv_freq(positions_BxT, rotary_dim: int, theta: float, s: RopeScaling):
    """Dynamic NTK: past the original context the base grows with the longest sequence of the
    forward, ``theta * (factor * L / original - (factor - 1)) ^ (d / (d - 2))`` with ``L`` = the
    largest position + 1 over the whole batch (HF's rule); below it, the default frequencies."""
    seq_len = jnp.maximum(jnp.max(positions_BxT) + 1, s.original).astype(F32)
    base = theta * (s.factor * seq_len / s.original - (s.factor - 1.0)) ** (rotary_dim / (rotary_dim - 2))
    return 1.0 / base ** (jnp.arange(0, rotary_dim, 2, dtype=F32) / rotary_dim)


def rope_angles(positions_BxT, rotary_dim: int, theta: float, scaling: RopeScaling | None = None):
    """``(sin, cos)``, each float32 ``[B, T, rotary_dim // 2]`` (``scaling``: see :func:`rope_inv_freq`;
    YaRN's ``attention_factor`` multiplies both)."""
    if scaling is not None and scaling.kind == "dynamic":
        inv_freq = _dynamic_inv_freq(positions_BxT, rotary_dim, theta, scaling)
    else:
        inv_freq = jnp.asarray(rope_inv_freq(rotary_dim, theta, scaling))
    ang_BxTxH2 = positions_BxT.astype(F32)[..., None] * inv_freq
    sin, cos = jnp.sin(ang_BxTxH2), jnp.cos(ang_BxTxH2)
    if scaling is not None and scaling.attention_factor != 1.0:
        sin, cos = sin * scaling.attention_factor, cos * scaling.attention_factor
    return sin, cos


def apply_rope(x_BxTxNxH, sin_cos):
    """Rotates the first ``rotary_dim`` features of each head; the rest pass through."""
    sin, cos = sin_cos[0][:, :, None, :], sin_cos[1][:, :, None, :]
    half = sin.shape[-1]
    x = x_BxTxNxH.astype(F32)
    x1, x2, rest = x[..., :half], x[..., half : 2 * half], x[..., 2 * half :]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], axis=-1)
    return out.astype(x_BxTxNxH.dtype)


# --------------------------------------------------------------------------------------------
# Attention with an optional KV cache
# --------------------------------------------------------------------------------------------


@flax.struct.dataclass
class KVCache:
    """Keys and values of every layer in two stacked buffers (the training layout's cache), and
    the position held by each slot.

    Attributes:
      k_LxBxGxSxH, v_LxBxGxSxH: cached keys (rotated) and values, the cache dtype. Slots sit
        inside the kv-head axis, the layout the attention dots read without a transpose.
      pos_BxS: int32 position of the token in each slot, ``-1`` for empty or padding slots.
    """

    k_LxBxGxSxH: jax.Array
    v_LxBxGxSxH: jax.Array
    pos_BxS: jax.Array

    @classmethod
    def zeros(cls, num_layers, batch, max_len, kv_heads, head_dim, dtype) -> "KVCache":
        shape = (num_layers, batch, kv_heads, max_len, head_dim)
        return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.full((batch, max_len), -1, jnp.int32))

    def repeat(self, k: int) -> "KVCache":
        """Each row ``k`` times in a row (``k`` samples continuing one prefill)."""
        rep = lambda x, axis: jnp.repeat(x, k, axis=axis)
        return KVCache(rep(self.k_LxBxGxSxH, 1), rep(self.v_LxBxGxSxH, 1), rep(self.pos_BxS, 0))

    def take(self, rows_B) -> "KVCache":
        """The rows ``rows_B`` (decode rows gathered after others finished)."""
        take = lambda x, axis: jnp.take(x, rows_B, axis=axis)
        return KVCache(take(self.k_LxBxGxSxH, 1), take(self.v_LxBxGxSxH, 1), take(self.pos_BxS, 0))

    def put(self, rows_B, other: "KVCache") -> "KVCache":
        """Rows ``rows_B`` replaced by ``other``'s rows, all slots (prefilled rows into free decode slots)."""
        put = lambda x, y, axis: x.at[(slice(None),) * axis + (rows_B,)].set(y.astype(x.dtype))
        return KVCache(put(self.k_LxBxGxSxH, other.k_LxBxGxSxH, 1), put(self.v_LxBxGxSxH, other.v_LxBxGxSxH, 1),
                       put(self.pos_BxS, other.pos_BxS, 0))


@flax.struct.dataclass
class LayerKVCache:
    """The decoding layout's cache: one key and one value buffer per layer, each updated in place
    by its layer, and the slots' positions.

    Attributes:
      k_layers, v_layers: ``L``-tuples of ``[B, G, S, H]`` buffers (the cache dtype).
      pos_BxS: int32 position of the token in each slot, ``-1`` for empty or padding slots.
    """

    k_layers: tuple[jax.Array, ...]
    v_layers: tuple[jax.Array, ...]
    pos_BxS: jax.Array

    @classmethod
    def zeros(cls, num_layers, batch, max_len, kv_heads, head_dim, dtype) -> "LayerKVCache":
        shape = (batch, kv_heads, max_len, head_dim)
        bufs = lambda: tuple(jnp.zeros(shape, dtype) for _ in range(num_layers))
        return cls(bufs(), bufs(), jnp.full((batch, max_len), -1, jnp.int32))

    def repeat(self, k: int) -> "LayerKVCache":
        """Each row ``k`` times in a row (``k`` samples continuing one prefill)."""
        rep = lambda xs: tuple(jnp.repeat(x, k, axis=0) for x in xs)
        return LayerKVCache(rep(self.k_layers), rep(self.v_layers), jnp.repeat(self.pos_BxS, k, axis=0))

    def take(self, rows_B) -> "LayerKVCache":
        """The rows ``rows_B`` (decode rows gathered after others finished)."""
        take = lambda xs: tuple(jnp.take(x, rows_B, axis=0) for x in xs)
        return LayerKVCache(take(self.k_layers), take(self.v_layers), jnp.take(self.pos_BxS, rows_B, axis=0))

    def put(self, rows_B, other: "LayerKVCache") -> "LayerKVCache":
        """Rows ``rows_B`` replaced by ``other``'s rows, all slots (prefilled rows into free decode slots)."""
        put = lambda xs, ys: tuple(x.at[rows_B].set(y.astype(x.dtype)) for x, y in zip(xs, ys))
        return LayerKVCache(put(self.k_layers, other.k_layers), put(self.v_layers, other.v_layers),
                            self.pos_BxS.at[rows_B].set(other.pos_BxS))


@flax.struct.dataclass
class AttentionContext:
    """What every layer's attention shares in one forward: rotary angles and the allowed mask.

    ``allowed_BxTxS[b, t, s]``: query ``t`` may attend to key slot ``s``: the slot holds a real
    token, is not in the query's future, and (with a sliding window ``W``) lies fewer than ``W``
    positions back.
    """

    sin_cos: tuple[jax.Array, jax.Array]
    allowed_BxTxS: jax.Array


def make_context(positions_BxT, key_pos_BxS, index, *, rotary_dim, theta, window, segment_ids_BxT=None,
                 rope_scaling: RopeScaling | None = None):
    """Context for queries at slots ``index .. index + T - 1`` over keys with positions ``key_pos_BxS``
    (padding keys carry position -1, see :func:`key_positions`).

    With ``segment_ids_BxT`` (a full forward over shared-prefix rows, ``S = T``): segment 0 is the
    prompt, ``k + 1`` response ``k``; a query sees the prompt and its own segment, never another
    response, and causality is counted in positions (every response continues from the prompt's
    end), so each response sees exactly what it would see in a row of its own; the sliding window
    is in positions too."""
    t, s = positions_BxT.shape[1], key_pos_BxS.shape[1]
    if segment_ids_BxT is not None:
        seg_q, seg_k = segment_ids_BxT[:, :, None], segment_ids_BxT[:, None, :]
        allowed = ((key_pos_BxS[:, None, :] >= 0) & ((seg_k == 0) | (seg_k == seg_q))
                   & (key_pos_BxS[:, None, :] <= positions_BxT[:, :, None]))
    else:
        q_slot_T = index + jnp.arange(t, dtype=jnp.int32)
        allowed = (key_pos_BxS[:, None, :] >= 0) & (jnp.arange(s, dtype=jnp.int32)[None, None, :] <= q_slot_T[None, :, None])
    if window is not None:
        allowed &= positions_BxT[:, :, None] - key_pos_BxS[:, None, :] < window
    return AttentionContext(rope_angles(positions_BxT, rotary_dim, theta, rope_scaling), allowed)


def make_cache_context(positions_BxT, key_pos_BxS, *, rotary_dim, theta, window,
                       rope_scaling: RopeScaling | None = None):
    """Context for queries over a sampler's cache, causal by *position*: a query may attend to every
    key slot holding a real token at a position up to its own, wherever the slot lies. The sampler
    writes decode tokens into a ring of slots (a refilled row starts anywhere in the ring), so a
    row's slot order is not its token order; every slot a row does not own holds position -1."""
    allowed = (key_pos_BxS[:, None, :] >= 0) & (key_pos_BxS[:, None, :] <= positions_BxT[:, :, None])
    if window is not None:
        allowed &= positions_BxT[:, :, None] - key_pos_BxS[:, None, :] < window
    return AttentionContext(rope_angles(positions_BxT, rotary_dim, theta, rope_scaling), allowed)


def key_positions(positions_BxT, attention_mask_BxT):
    """Positions of new keys, ``-1`` where the token is padding."""
    return jnp.where(attention_mask_BxT > 0, positions_BxT, -1).astype(jnp.int32)


def attend(q_BxTxNxH, k_BxGxSxH, v_BxGxSxH, allowed_BxTxS, dtype):
    """Grouped-query softmax attention, scores and softmax in float32.

    Both dots keep ``(B, G, Q, T)`` leading on the query side and return that order: with the
    query axes in their natural order XLA:CPU runs the batched dots directly (putting ``T``
    first in the output made it swap the operands of the ``probs @ v`` dot, ~4x slower per
    decoded token); the result is transposed back once.
    """
    b, t, n, h = q_BxTxNxH.shape
    g = k_BxGxSxH.shape[1]
    q_BxGxQxTxH = q_BxTxNxH.reshape(b, t, g, n // g, h).transpose(0, 2, 3, 1, 4)
    scores = matmul("BGQTH,BGSH->BGQTS", q_BxGxQxTxH, k_BxGxSxH, dtype)
    scores = scores * (h**-0.5)
    scores = jnp.where(allowed_BxTxS[:, None, None], scores, jnp.finfo(F32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(dtype)
    out_BxGxQxTxH = matmul("BGQTS,BGSH->BGQTH", probs, v_BxGxSxH, dtype)
    return out_BxGxQxTxH.transpose(0, 3, 1, 2, 4).reshape(b, t, n, h).astype(dtype)


def out_proj(o_BxTxNxH, wo_NxHxD, dtype, adapter=None):
    """Attention output projection, with the heads flattened first (``adapter``: see
    :func:`project`, its ``a`` over ``[N, H, J]``).

    Contracting ``(N, H)`` as one dimension pins the order the weight is read in; with the two
    dimensions separate, XLA:CPU lays out the attention output head-dim-major and copies a
    transpose of ``wo`` on every call (per decoded token, the slowest op of the step).
    """
    b, t, n, h = o_BxTxNxH.shape
    if adapter is not None:
        adapter = (adapter[0].reshape(n * h, -1), *adapter[1:])
    return project(o_BxTxNxH.reshape(b, t, n * h), wo_NxHxD.reshape(n * h, -1), "BTE,ED->BTD", dtype, adapter)


def _rotated(q_BxTxNxH, k_BxTxGxH, v_BxTxGxH, ctx: AttentionContext):
    """Rotary on ``q`` and ``k``; keys and values in the cache's ``[B, G, T, H]`` order."""
    q_BxTxNxH = shd.constrain(apply_rope(q_BxTxNxH, ctx.sin_cos), ("batch", "length", "act_heads", None))
    return q_BxTxNxH, apply_rope(k_BxTxGxH, ctx.sin_cos).transpose(0, 2, 1, 3), v_BxTxGxH.transpose(0, 2, 1, 3)


def attention(q_BxTxNxH, k_BxTxGxH, v_BxTxGxH, ctx: AttentionContext, dtype):
    """Rotary, then attention over this call's own keys (no cache)."""
    q, k_BxGxTxH, v_BxGxTxH = _rotated(q_BxTxNxH, k_BxTxGxH, v_BxTxGxH, ctx)
    return attend(q, k_BxGxTxH, v_BxGxTxH, ctx.allowed_BxTxS, dtype)


def attention_cached(q_BxTxNxH, k_BxTxGxH, v_BxTxGxH, ctx: AttentionContext, kv, index, dtype):
    """Rotary, write the new keys and values at slots ``index ..`` of one layer's buffers
    ``kv = (k_BxGxSxH, v_BxGxSxH)``, attend over the slots; returns ``(o, new kv)``."""
    q, k_BxGxTxH, v_BxGxTxH = _rotated(q_BxTxNxH, k_BxTxGxH, v_BxTxGxH, ctx)
    k_BxGxSxH, v_BxGxSxH = kv
    start = (0, 0, index, 0)
    k_BxGxSxH = jax.lax.dynamic_update_slice(k_BxGxSxH, k_BxGxTxH.astype(k_BxGxSxH.dtype), start)
    v_BxGxSxH = jax.lax.dynamic_update_slice(v_BxGxSxH, v_BxGxTxH.astype(v_BxGxSxH.dtype), start)
    return attend(q, k_BxGxSxH, v_BxGxSxH, ctx.allowed_BxTxS, dtype), (k_BxGxSxH, v_BxGxSxH)


def attention_cached_stack(q_BxTxNxH, k_BxTxGxH, v_BxTxGxH, ctx: AttentionContext, kv, layer, index, dtype):
    """As :func:`attention_cached` on layer ``layer`` of the stacked buffers
    ``kv = (k_LxBxGxSxH, v_LxBxGxSxH)`` (inside the layers' ``scan``); returns ``(o, new kv)``."""
    q, k_BxGxTxH, v_BxGxTxH = _rotated(q_BxTxNxH, k_BxTxGxH, v_BxTxGxH, ctx)
    k_LxBxGxSxH, v_LxBxGxSxH = kv
    start = (layer, 0, 0, index, 0)
    k_LxBxGxSxH = jax.lax.dynamic_update_slice(k_LxBxGxSxH, k_BxGxTxH[None].astype(k_LxBxGxSxH.dtype), start)
    v_LxBxGxSxH = jax.lax.dynamic_update_slice(v_LxBxGxSxH, v_BxGxTxH[None].astype(v_LxBxGxSxH.dtype), start)
    out = attend(q, k_LxBxGxSxH[layer], v_LxBxGxSxH[layer], ctx.allowed_BxTxS, dtype)
    return out, (k_LxBxGxSxH, v_LxBxGxSxH)