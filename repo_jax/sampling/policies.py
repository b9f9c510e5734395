"""Sampling policies: pure functions on logits (temperature, top-k, top-p) and the token choice.

``SamplingPolicy`` is static (part of a compiled program's key). ``choose_tokens`` picks one
token per row and returns its log-prob under the model and under the distribution sampled from.
The decode loop in :mod:`repo_jax.sampling` calls it once per step, so it is written for 50k-wide
vocabularies on CPU, where a sort of the rows, Gumbel noise for every entry (``random.categorical``)
and ``argmax``'s variadic reduction each cost more than the model's output layer:

* every draw is an inverse CDF with one uniform per row: the first entry whose cumulative
  weight passes ``u * total``, found block by block (block sums, then one block);
* top-k / top-p (nucleus) sampling first takes the ``CANDIDATES`` largest logits with
  ``lax.top_k``; a row whose kept set provably lies inside them (a strict value gap to the
  last candidate) is drawn from them alone. Only rows whose set reaches past the candidates
  (a flat distribution) take the exact full-vocabulary path: thresholds by bisection on the
  float bits (:func:`filter_logits`) on a gathered subset of the rows, or on all rows when too
  many need it. Each row's token depends only on its own logits and key, never on its
  neighbours, so a mesh and one device give the same tokens.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from repo_jax import logprobs

CANDIDATES = 64  # top-k / top-p candidates per row (lax.top_k); rows needing more go exact-full
BLOCK = 256  # entries per block of the blocked inverse CDF


def _sortable_bits(x: jax.Array) -> jax.Array:
    """float32 -> int32 keys with the same order (no NaNs): flips the magnitude bits of negatives."""
    b = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.int32)
    return jnp.where(b < 0, b ^ jnp.int32(0x7FFFFFFF), b)


def _largest_threshold(keys_BxV: jax.Array, ok) -> jax.Array:
    """Per row, the largest key ``t`` (among 32-bit keys) with ``ok(keys_BxV >= t)`` true.

    ``ok`` must be monotone (true for small ``t``) and true at the row minimum. Exact bisection on
    the integer keys: 32 masked reductions over the vocabulary instead of a sort.
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
    probability (renormalised after top-k) reaches ``p`` (tokens tied with the last one are kept
    too), so the most likely token always survives. Exact, on the whole vocabulary.
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

    def truncates(self, vocab: int) -> bool:
        """Whether top-k or top-p removes tokens (else the draw is over the whole vocabulary)."""
        return (self.top_k is not None and self.top_k < vocab) or (self.top_p is not None and self.top_p < 1.0)


# ---------------------------------------------------------------------------------------------
# Draws: one uniform per row, inverse CDF
# ---------------------------------------------------------------------------------------------


def _first_past(cum_BxK: jax.Array, target_B: jax.Array, last_B: jax.Array) -> jax.Array:
    """Index of the first entry whose cumulative weight exceeds ``target`` (zero-weight entries are
    skipped), clipped to ``last`` (the last entry with weight, against rounding at the top)."""
    return jnp.minimum((cum_BxK <= target_B[:, None]).sum(axis=-1), last_B).astype(jnp.int32)


def _last_positive(w_BxK: jax.Array) -> jax.Array:
    k = w_BxK.shape[-1]
    return (k - 1 - jnp.argmax(w_BxK[:, ::-1] > 0, axis=-1)).astype(jnp.int32)


def _draw_full(z_BxV: jax.Array, u_B: jax.Array):
    """Exact draw from ``softmax(z)`` over the whole row (``-inf`` entries excluded): block sums,
    the block holding ``u * total``, then the entry inside it. Returns ``(token_B, logp_B)``."""
    b, v = z_BxV.shape
    nb = -(-v // BLOCK)
    z_BxNxL = jnp.pad(z_BxV, ((0, 0), (0, nb * BLOCK - v)), constant_values=-jnp.inf).reshape(b, nb, BLOCK)
    max_B = z_BxV.max(axis=-1)
    w_BxNxL = jnp.exp(z_BxNxL - max_B[:, None, None])
    wsum_BxN = w_BxNxL.sum(axis=-1)
    cum_BxN = jnp.cumsum(wsum_BxN, axis=-1)
    total_B = cum_BxN[:, -1]
    target_B = u_B * total_B
    blk_B = _first_past(cum_BxN, target_B, _last_positive(wsum_BxN))
    w_BxL = jnp.take_along_axis(w_BxNxL, blk_B[:, None, None], axis=1)[:, 0]
    before_B = jnp.take_along_axis(cum_BxN - wsum_BxN, blk_B[:, None], axis=1)[:, 0]
    pos_B = _first_past(jnp.cumsum(w_BxL, axis=-1), target_B - before_B, _last_positive(w_BxL))
    token_B = blk_B * BLOCK + pos_B
    z_tok_B = jnp.take_along_axis(z_BxV, token_B[:, None], axis=1)[:, 0]
    return token_B, z_tok_B - max_B - jnp.log(total_B)


def _argmax(x_BxV: jax.Array) -> jax.Array:
    """First index of each row's maximum (``argmax``'s tie rule) from two plain max reductions:
    the block holding the maximum, then the entry inside it (XLA:CPU's argmax is a slow variadic
    reduction)."""
    b, v = x_BxV.shape
    nb = -(-v // BLOCK)
    x_BxNxL = jnp.pad(x_BxV, ((0, 0), (0, nb * BLOCK - v)), constant_values=-jnp.inf).reshape(b, nb, BLOCK)
    bmax_BxN = x_BxNxL.max(axis=-1)
    blk_B = jnp.argmax(bmax_BxN, axis=-1)
    inner_BxL = jnp.take_along_axis(x_BxNxL, blk_B[:, None, None], axis=1)[:, 0]
    return (blk_B * BLOCK + jnp.argmax(inner_BxL, axis=-1)).astype(jnp.int32)


# ---------------------------------------------------------------------------------------------
# Top-k / top-p: candidates first, the exact full path for the rows that reach past them
# ---------------------------------------------------------------------------------------------


def _from_candidates(vals_BxC, idx_BxC, lse_B, u_B, policy: SamplingPolicy, vocab: int):
    """Draw from the kept set when it lies inside the candidates (``vals`` sorted, descending).

    Returns ``(token_B, logp_B, ok_B)``; ``ok`` is false where the kept set may reach past the
    candidates (then token and logp are meaningless). ``lax.top_k``'s outputs are only combined
    elementwise and reduced, never sliced or gathered: XLA:CPU rewrites a TopK whose outputs are
    sliced into a full sort of the rows (100x slower).
    """
    c = vals_BxC.shape[-1]
    col_1xC = jnp.arange(c)[None, :]
    upper_CxC = (col_1xC.T <= col_1xC).astype(jnp.float32)
    cumsum = lambda w_BxC: jnp.einsum("BC,CK->BK", w_BxC, upper_CxC)  # no scan: no slices (see above)
    at = lambda x_BxC, pos_B: jnp.where(col_1xC == pos_B[:, None], x_BxC, 0).sum(axis=-1)  # x[b, pos[b]]
    max_B, last_B = vals_BxC.max(axis=-1), vals_BxC.min(axis=-1)  # first and last candidate
    keep_BxC = jnp.ones(vals_BxC.shape, bool)
    ok_B = jnp.ones(vals_BxC.shape[:1], bool)
    if policy.top_k is not None and policy.top_k < vocab:
        kth_B = jnp.where(col_1xC < policy.top_k, vals_BxC, jnp.inf).min(axis=-1)
        keep_BxC = vals_BxC >= kth_B[:, None]
        ok_B &= last_B < kth_B  # no tie with the k-th value outside the candidates
        lse_B = logprobs.logsumexp(jnp.where(keep_BxC, vals_BxC, -jnp.inf))
    if policy.top_p is not None and policy.top_p < 1.0:
        cum_BxC = cumsum(jnp.where(keep_BxC, jnp.exp(vals_BxC - lse_B[:, None]), 0.0))
        reach_BxC = cum_BxC >= policy.top_p
        cut_B = jnp.where(reach_BxC, vals_BxC, -jnp.inf).max(axis=-1)  # the value where p is reached
        keep_BxC &= vals_BxC >= cut_B[:, None]
        ok_B &= reach_BxC.any(axis=-1) & (last_B < cut_B)
    w_BxC = jnp.where(keep_BxC, jnp.exp(vals_BxC - max_B[:, None]), 0.0)
    cum_BxC = cumsum(w_BxC)
    total_B = cum_BxC.max(axis=-1)
    pos_B = _first_past(cum_BxC, u_B * total_B, keep_BxC.sum(axis=-1) - 1)
    logp_B = at(vals_BxC, pos_B) - max_B - jnp.log(total_B)
    return at(idx_BxC, pos_B).astype(jnp.int32), logp_B, ok_B


def _exact_truncated(z_BxV, u_B, policy: SamplingPolicy):
    return _draw_full(filter_logits(z_BxV, top_k=policy.top_k, top_p=policy.top_p), u_B)


def _truncated(logits_BxV, u_B, live_B, policy: SamplingPolicy):
    """Top-k / top-p draw: candidates where they suffice, the exact path for the other live rows
    (on a gathered subset of ``capacity`` rows when that many suffice, else on all rows)."""
    b, v = logits_BxV.shape
    c = min(v, max(CANDIDATES, (policy.top_k or 0) + 1))
    inv_t = 1.0 / policy.temperature  # z = logits / T: top_k on the raw logits, same order
    vals_BxC, idx_BxC = jax.lax.top_k(logits_BxV, c)
    lse_B = logprobs.logsumexp(logits_BxV * inv_t)
    token_B, logp_B, ok_B = _from_candidates(vals_BxC * inv_t, idx_BxC, lse_B, u_B, policy, v)
    if c == v:  # the candidates are the whole vocabulary
        return token_B, logp_B
    need_B = live_B & ~ok_B
    n_need = need_B.sum()
    capacity = min(b, max(4, b // 8))

    def subset(_):
        rows_R = jnp.nonzero(need_B, size=capacity, fill_value=0)[0]
        tok_R, lp_R = _exact_truncated(logits_BxV[rows_R] * inv_t, u_B[rows_R], policy)
        sel_R = jnp.arange(capacity) < n_need  # fill entries (row 0 repeated) write nothing
        rows_R = jnp.where(sel_R, rows_R, b)  # out of bounds: dropped by the scatter
        return token_B.at[rows_R].set(tok_R, mode="drop"), logp_B.at[rows_R].set(lp_R, mode="drop")

    def every_row(_):
        tok_B, lp_B = _exact_truncated(logits_BxV * inv_t, u_B, policy)
        return jnp.where(need_B, tok_B, token_B), jnp.where(need_B, lp_B, logp_B)

    branch = jnp.where(n_need == 0, 0, jnp.where(n_need <= capacity, 1, 2))
    return jax.lax.switch(branch, [lambda _: (token_B, logp_B), subset, every_row], None)


def choose_tokens(logits_BxV: jax.Array, keys_B: jax.Array, policy: SamplingPolicy, live_B: jax.Array | None = None,
                  temperature_B: jax.Array | None = None):
    """Picks one token per row; returns ``(token_B, model_logp_B, sample_logp_B)``.

    ``temperature_B`` (no top-k / top-p): each row's own temperature, greedy where it is 0 (an
    evaluation's greedy answers and its temperature-1 KL samples in one batch); a row's token is
    the one the uniform-temperature policy would pick.

    ``model_logp`` is the token's log-prob under the unmodified model (``log_softmax`` of the raw
    logits, temperature 1, no filtering); ``sample_logp`` is its log-prob under the distribution
    actually sampled from (after temperature, top-k, top-p), 0 for greedy (a point mass).
    ``live_B`` marks the rows whose token is used (finished rows never take the exact path).
    """
    logits_BxV = logits_BxV.astype(jnp.float32)
    b, v = logits_BxV.shape
    if temperature_B is not None:
        u_B = jax.vmap(lambda k: jax.random.uniform(k, dtype=jnp.float32))(keys_B)
        hot_B = temperature_B > 0
        drawn_B, drawn_logp_B = _draw_full(logits_BxV * (1.0 / jnp.where(hot_B, temperature_B, 1.0))[:, None], u_B)
        token_B = jnp.where(hot_B, drawn_B, _argmax(logits_BxV))
        sample_logp_B = jnp.where(hot_B, drawn_logp_B, 0.0)
    elif policy.greedy:
        token_B = _argmax(logits_BxV)
        sample_logp_B = jnp.zeros(token_B.shape, jnp.float32)
    else:
        u_B = jax.vmap(lambda k: jax.random.uniform(k, dtype=jnp.float32))(keys_B)
        if policy.truncates(v):
            live_B = jnp.ones((b,), bool) if live_B is None else live_B
            token_B, sample_logp_B = _truncated(logits_BxV, u_B, live_B, policy)
        else:
            token_B, sample_logp_B = _draw_full(logits_BxV * (1.0 / policy.temperature), u_B)
    model_logp_B = jnp.take_along_axis(logits_BxV, token_B[:, None], axis=-1)[:, 0] - logprobs.logsumexp(logits_BxV)
    return token_B, model_logp_B, sample_logp_B
