"""Sampling policies: pure functions on logits (temperature, top-k, top-p) and the token choice.

``SamplingPolicy`` is static (part of a compiled program's key); ``filter_logits`` applies
top-k then nucleus filtering with exact thresholds found by bisection on the float bits (no
sort of the 50k-wide vocabulary rows); ``choose_tokens`` picks one token per row and returns
its log-prob under the model and under the distribution sampled from. The decode loop in
:mod:`repo_jax.sampling` calls them once per step.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from repo_jax import logprobs



def _sortable_bits(x: jax.Array) -> jax.Array:
    """float32 -> int32 keys with the same order (no NaNs): flips the magnitude bits of negatives."""
    b = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.int32)
    return jnp.where(b < 0, b ^ jnp.int32(0x7FFFFFFF), b)


def _largest_threshold(keys_BxV: jax.Array, ok) -> jax.Array:
    """Per row, the largest key ``t`` (among 32-bit keys) with ``ok(keys_BxV >= t)`` true.

    ``ok`` must be monotone (true for small ``t``) and true at the row minimum. Exact bisection on
    the integer keys: 32 masked reductions over the vocabulary instead of a sort (XLA:CPU sorts
    of 50k-entry rows cost hundreds of ms per step).
    """
    lo_B = keys_BxV.min(axis=-1)  # ok(lo), invariant
    hi_B = keys_BxV.max(axis=-1)  # candidate; answer in [lo, hi]

    def body(_, lo_hi):
        lo, hi = lo_hi
        mid = (lo >> 1) + (hi >> 1) + (lo & hi & 1) + ((lo ^ hi) & 1)  # ceil((lo + hi) / 2), no overflow
        good = ok(keys_BxV >= mid[:, None])
        return jnp.where(good, mid, lo), jnp.where(good, hi, mid - 1)

    lo_B, _ = jax.lax.fori_loop(0, 33, body, (lo_B, hi_B))
    return lo_B


def filter_logits(logits_BxV: jax.Array, *, top_k: int | None = None, top_p: float | None = None) -> jax.Array:
    """Top-k then nucleus filtering (transformers' order); removed tokens get ``-inf``.

    ``top_k`` keeps the tokens whose logit is at least the k-th largest (ties at the boundary are
    all kept). ``top_p`` keeps the smallest set of most likely tokens whose cumulative
    probability reaches ``p`` (tokens tied with the last one are kept too), so the most likely
    token always survives.
    """
    logits_BxV = logits_BxV.astype(jnp.float32)
    neg_inf = jnp.float32(-jnp.inf)
    if top_k is not None and top_k < logits_BxV.shape[-1]:
        keys_BxV = _sortable_bits(logits_BxV)
        kth_B = _largest_threshold(keys_BxV, lambda m: m.sum(axis=-1) >= top_k)
        logits_BxV = jnp.where(keys_BxV >= kth_B[:, None], logits_BxV, neg_inf)
    if top_p is not None and top_p < 1.0:
        probs_BxV = jax.nn.softmax(logits_BxV, axis=-1)
        keys_BxV = _sortable_bits(probs_BxV)
        cut_B = _largest_threshold(keys_BxV, lambda m: jnp.where(m, probs_BxV, 0.0).sum(axis=-1) >= top_p)
        logits_BxV = jnp.where(keys_BxV >= cut_B[:, None], logits_BxV, neg_inf)
    return logits_BxV


@dataclasses.dataclass(frozen=True)
class SamplingPolicy:
    """Static sampling settings (part of the compile key). ``temperature == 0`` is greedy."""

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0 or self.top_k == 1


def choose_tokens(logits_BxV: jax.Array, keys_B: jax.Array, policy: SamplingPolicy):
    """Picks one token per row; returns ``(token_B, model_logp_B, sample_logp_B)``.

    ``model_logp`` is the token's log-prob under the unmodified model (``log_softmax`` of the raw
    logits, temperature 1, no filtering); ``sample_logp`` is its log-prob under the distribution
    actually sampled from (after temperature, top-k, top-p), 0 for greedy (a point mass).
    """
    logits_BxV = logits_BxV.astype(jnp.float32)
    pick = lambda x_BxV, token_B: jnp.take_along_axis(x_BxV, token_B[:, None], axis=-1)[:, 0]
    if policy.greedy:
        token_B = jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
        sample_logp_B = jnp.zeros(token_B.shape, jnp.float32)
    else:
        scaled_BxV = filter_logits(logits_BxV / policy.temperature, top_k=policy.top_k, top_p=policy.top_p)
        token_B = jax.vmap(jax.random.categorical)(keys_B, scaled_BxV).astype(jnp.int32)
        sample_logp_B = pick(scaled_BxV, token_B) - logprobs.logsumexp(scaled_BxV)
    model_logp_B = pick(logits_BxV, token_B) - logprobs.logsumexp(logits_BxV)
    return token_B, model_logp_B, sample_logp_B
