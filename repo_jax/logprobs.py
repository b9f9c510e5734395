"""Sequence log-probabilities from final hidden states and the unembedding, without ever
holding the full ``[B, T, V]`` float32 logits.

``logp(y|x) = sum_t mask_t * log softmax(h_t W + b)[y_t]``. The chunked kernel walks the
sequence in chunks of ``chunk_size`` positions: the forward pass keeps only the per-token
log-sum-exp (``[B, T]``); the backward pass (a ``custom_vjp``) recomputes each chunk's logits once
and produces ``dh``, ``dW`` and ``db`` from ``softmax - onehot``. Peak temporary memory is
``O(B * chunk_size * V)`` instead of ``O(B * T * V)``; matmuls accumulate in float32 whatever the
input dtype (``preferred_element_type``), and log-probs come out in float32.

Alignment convention: ``hidden[:, t]`` predicts ``targets[:, t]`` (callers pass
``hidden[:, :-1]`` and ``input_ids[:, 1:]``), and ``mask[:, t]`` says whether that target is a
response token.

Dimension letters: B batch, T positions, C chunks, D model, V vocab.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import Array


def _chunk_logits(h_BxTxD: Array, w_DxV: Array, b_V: Array | None) -> Array:
    logits_BxTxV = jnp.einsum("BTD,DV->BTV", h_BxTxD, w_DxV, preferred_element_type=jnp.float32)
    if b_V is not None:
        logits_BxTxV = logits_BxTxV + b_V.astype(jnp.float32)
    return logits_BxTxV


def _target_logit(logits_BxTxV: Array, targets_BxT: Array) -> Array:
    return jnp.take_along_axis(logits_BxTxV, targets_BxT[..., None], axis=-1)[..., 0]


def _split(x_BxT_: Array, chunk: int) -> Array:
    """``[B, T, ...]`` -> ``[C, B, chunk, ...]`` (T already a multiple of ``chunk``)."""
    b, t = x_BxT_.shape[:2]
    return jnp.moveaxis(x_BxT_.reshape(b, t // chunk, chunk, *x_BxT_.shape[2:]), 1, 0)


def _merge(x_CxBxT_: Array) -> Array:
    c, b, tc = x_CxBxT_.shape[:3]
    return jnp.moveaxis(x_CxBxT_, 0, 1).reshape(b, c * tc, *x_CxBxT_.shape[3:])


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _chunked_token_logprobs(h_BxTxD, w_DxV, b_V, targets_BxT, chunk):
    return _chunked_fwd(h_BxTxD, w_DxV, b_V, targets_BxT, chunk)[0]


def logsumexp(logits_xV: Array) -> Array:
    """``logsumexp`` over the last (vocabulary) axis, for forward passes (no custom gradient).

    The sum of exponentials is a matvec against ones: XLA:CPU's row reduction over a 50k-wide
    minor axis ran at about half the speed (71 vs 161 ms for a [8, 128, 49152] chunk). ``-inf``
    entries are fine as long as each row has a finite maximum.
    """
    m_x = jax.lax.stop_gradient(logits_xV.max(axis=-1))
    ones_V = jnp.ones(logits_xV.shape[-1:], logits_xV.dtype)
    return m_x + jnp.log(jnp.einsum("...V,V->...", jnp.exp(logits_xV - m_x[..., None]), ones_V))


def _chunked_fwd(h_BxTxD, w_DxV, b_V, targets_BxT, chunk):
    def body(_, xs):
        h_BxCxD, tgt_BxC = xs
        logits = _chunk_logits(h_BxCxD, w_DxV, b_V)
        lse_BxC = logsumexp(logits)
        return None, (_target_logit(logits, tgt_BxC) - lse_BxC, lse_BxC)

    _, (logp, lse) = jax.lax.scan(body, None, (_split(h_BxTxD, chunk), _split(targets_BxT, chunk)))
    return _merge(logp), (h_BxTxD, w_DxV, b_V, targets_BxT, _merge(lse))


def _chunked_bwd(chunk, residuals, g_BxT):
    h_BxTxD, w_DxV, b_V, targets_BxT, lse_BxT = residuals
    vocab = w_DxV.shape[1]

    def body(carry, xs):
        dw_DxV, db_V = carry
        h_BxCxD, tgt_BxC, lse_BxC, g_BxC = xs
        p_BxCxV = jnp.exp(_chunk_logits(h_BxCxD, w_DxV, b_V) - lse_BxC[..., None])
        onehot_BxCxV = tgt_BxC[..., None] == jnp.arange(vocab, dtype=tgt_BxC.dtype)
        dlogits_BxCxV = g_BxC[..., None] * (onehot_BxCxV.astype(jnp.float32) - p_BxCxV)
        dl = dlogits_BxCxV.astype(h_BxCxD.dtype)
        dh_BxCxD = jnp.einsum("BCV,DV->BCD", dl, w_DxV, preferred_element_type=jnp.float32)
        dw_DxV = dw_DxV + jnp.einsum("BCD,BCV->DV", h_BxCxD, dl, preferred_element_type=jnp.float32)
        if db_V is not None:
            db_V = db_V + dlogits_BxCxV.sum(axis=(0, 1))
        return (dw_DxV, db_V), dh_BxCxD.astype(h_BxCxD.dtype)

    init = (jnp.zeros(w_DxV.shape, jnp.float32), None if b_V is None else jnp.zeros(b_V.shape, jnp.float32))
    xs = tuple(_split(x, chunk) for x in (h_BxTxD, targets_BxT, lse_BxT, g_BxT.astype(jnp.float32)))
    (dw, db), dh = jax.lax.scan(body, init, xs)
    db = None if b_V is None else db.astype(b_V.dtype)
    return _merge(dh), dw.astype(w_DxV.dtype), db, None


_chunked_token_logprobs.defvjp(_chunked_fwd, _chunked_bwd)


def _pad_to_chunks(hidden: Array, targets: Array, chunk_size: int) -> tuple[Array, Array, int]:
    """``hidden``/``targets`` padded along T to a multiple of the chunk (``min(chunk_size, T)``)."""
    t = hidden.shape[1]
    chunk = max(1, min(int(chunk_size), t))
    pad = (-t) % chunk
    targets = targets.astype(jnp.int32)
    if pad:
        hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
        targets = jnp.pad(targets, ((0, 0), (0, pad)))
    return hidden, targets, chunk


def token_logprobs(
    hidden: Array, unembed: Array, targets: Array, bias: Array | None = None, *, chunk_size: int = 128
) -> Array:
    """Per-token ``log softmax(h W + b)[target]`` as float32 ``[B, T]``, chunked over T.

    ``hidden``: ``[B, T, D]``; ``unembed``: ``[D, V]``; ``targets``: int ``[B, T]``; ``bias``:
    ``[V]`` or None. ``chunk_size`` need not divide T (the tail is padded and sliced off).
    """
    t = hidden.shape[1]
    hidden, targets, chunk = _pad_to_chunks(hidden, targets, chunk_size)
    out_BxT = _chunked_token_logprobs(hidden, unembed, bias, targets, chunk)
    return out_BxT[:, :t]


def token_logprobs_greedy(
    hidden: Array, unembed: Array, targets: Array, bias: Array | None = None, *, chunk_size: int = 128
) -> tuple[Array, Array]:
    """Forward only (evaluation): per-token float32 log-probs ``[B, T]`` as :func:`token_logprobs`,
    and whether each target is an argmax of its logits (``bool [B, T]``, ties count as greedy)."""
    t = hidden.shape[1]
    hidden, targets, chunk = _pad_to_chunks(hidden, targets, chunk_size)

    def body(_, xs):
        h_BxCxD, tgt_BxC = xs
        logits = _chunk_logits(h_BxCxD, unembed, bias)
        tgt_BxC = _target_logit(logits, tgt_BxC)
        return None, (tgt_BxC - logsumexp(logits), tgt_BxC >= logits.max(axis=-1))

    _, (logp, greedy) = jax.lax.scan(body, None, (_split(hidden, chunk), _split(targets, chunk)))
    return _merge(logp)[:, :t], _merge(greedy)[:, :t]


def sequence_logprobs(
    hidden: Array, unembed: Array, targets: Array, mask: Array, bias: Array | None = None, *, chunk_size: int = 128
) -> Array:
    """``sum_t mask[b, t] * log p(targets[b, t] | hidden[b, t])`` as float32 ``[B]``, chunked."""
    logp_BxT = token_logprobs(hidden, unembed, targets, bias, chunk_size=chunk_size)
    return jnp.einsum("BT,BT->B", logp_BxT, mask.astype(jnp.float32))


def shared_prefix_logprobs(
    hidden: Array, unembed: Array, input_ids: Array, segment_ids: Array, num_responses: int,
    bias: Array | None = None, *, chunk_size: int = 128,
) -> Array:
    """Per-response log-probs ``[B, K]`` (float32) of shared-prefix rows (``training/batch.py``:
    segment 0 the prompt, ``k + 1`` response ``k``, ``-1`` padding).

    Each response token is predicted by the hidden state of the previous token of its own
    segment, or, for a response's first token, of the prompt's last token; those hidden states
    are gathered into place (``[B, T, D]``, one gather; its gradient a scatter-add) and the chunked
    kernel scores every token against its own id. Tokens outside ``1..K`` count for nothing.
    """
    b, t = input_ids.shape
    idx_T = jnp.arange(t, dtype=jnp.int32)
    last_prompt_B = jnp.max(jnp.where(segment_ids == 0, idx_T, 0), axis=1)
    same_prev_BxT = jnp.concatenate([jnp.zeros((b, 1), bool), segment_ids[:, 1:] == segment_ids[:, :-1]], axis=1)
    src_BxT = jnp.where(same_prev_BxT, idx_T - 1, last_prompt_B[:, None])
    h_src_BxTxD = jnp.take_along_axis(hidden, src_BxT[..., None], axis=1)
    logp_BxT = token_logprobs(h_src_BxTxD, unembed, input_ids, bias, chunk_size=chunk_size)
    onehot_BxTxK = (segment_ids[..., None] == jnp.arange(1, num_responses + 1, dtype=segment_ids.dtype))
    return jnp.einsum("BT,BTK->BK", logp_BxT, onehot_BxTxK.astype(jnp.float32))
