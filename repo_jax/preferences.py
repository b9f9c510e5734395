"""Votes -> count matrices -> Zermelo / Bradley-Terry strengths -> empirical preferences.

iREPO step 2-4 (ALGORITHMS.md): ``A`` annotators judge every pair of ``K`` responses of a prompt;
their votes (0/1) or probabilities sum into ``counts[i, j]`` (how many annotators prefer ``i``
over ``j``; ``counts[i, j] + counts[j, i] = A``); the MM iteration fits strengths ``w``; the
empirical preference of a pair is ``p_hat_ij = w_i / (w_i + w_j)``.

Also the list-to-pair builders of the LPO paper's DPO baselines (best-vs-random, best-vs-each-
other, all pairs). Everything is jnp, batched over a leading prompt axis ``P`` and jittable.

Dimension letters: P prompts, K responses per prompt, A annotators (the papers' D and H).
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
from jax import Array
from jax.typing import ArrayLike


def counts_from_probs(probs: ArrayLike) -> Array:
    """Sums per-annotator pairwise judgements into counts.

    ``probs[a, p, i, j]`` (``[A, P, K, K]``, or ``[A, K, K]``) is annotator ``a``'s probability (or
    0/1 vote) that response ``i`` beats ``j``. The diagonal is ignored. Returns ``counts[p, i, j]``.
    """
    probs = jnp.asarray(probs, jnp.float32)
    d = probs.shape[-1]
    off_diag = 1.0 - jnp.eye(d, dtype=jnp.float32)
    return probs.sum(axis=0) * off_diag


_NEVER_WINS_GAP = 40.0


def _mm_step(log_w_PxK: Array, wins_PxK: Array, n_PxKxK: Array) -> Array:
    """One MM update ``w_i <- W_i / sum_j N_ij / (w_i + w_j)`` in log space, renormalised to
    geometric mean 1. Items with no comparisons keep their strength."""
    # Stable in log space: w_i / (w_i + w_j) = sigmoid(log w_i - log w_j), so
    # w_i * sum_j N_ij / (w_i + w_j) = sum_j N_ij sigmoid(log w_i - log w_j).
    diff_PxKxK = log_w_PxK[:, :, None] - log_w_PxK[:, None, :]
    denom_scaled_PxK = jnp.einsum("PIJ,PIJ->PI", n_PxKxK, jax.nn.sigmoid(diff_PxKxK))
    compared_PxK = n_PxKxK.sum(-1) > 0
    wins_any_PxK = compared_PxK & (wins_PxK > 0)
    # log w_i <- log W_i - log(w_i * denom) + log w_i
    upd_PxK = (
        jnp.log(jnp.where(wins_any_PxK, wins_PxK, 1.0))
        - jnp.log(jnp.where(wins_any_PxK, denom_scaled_PxK, 1.0))
        + log_w_PxK
    )
    # An item that is compared but never wins has MLE strength 0: pin it far below the weakest
    # winner (p_hat ~ e^-40) so the iteration still converges.
    floor_P = jnp.min(jnp.where(wins_any_PxK, upd_PxK, jnp.inf), axis=-1, keepdims=True) - _NEVER_WINS_GAP
    new_PxK = jnp.where(wins_any_PxK, upd_PxK, jnp.where(compared_PxK, floor_P, log_w_PxK))
    return new_PxK - new_PxK.mean(axis=-1, keepdims=True)


def zermelo(
    counts: ArrayLike, *, pseudo_count: float = 0.0, iters: int = 10_000, tol: float = 1e-6, return_log: bool = False
) -> Array:
    """Bradley-Terry strengths from a count matrix by Zermelo's MM iteration.

    Args:
      counts: ``[K, K]`` or batched ``[P, K, K]``; ``counts[i, j]`` = (soft) number of annotators
        preferring ``i`` over ``j``.
      pseudo_count: ``alpha`` added to every off-diagonal count before fitting (ALGORITHMS.md's
        default for the loop is 0.5); with 0 an item that never wins gets a strength that tends to
        0 (the maximum-likelihood estimate is on the boundary) and unanimous pairs give ``p_hat``
        of 0 or 1, which the iREPO loss clips.
      iters: maximum MM iterations; tol: stop when ``max |delta log w| < tol`` over the batch.
      return_log: return ``log w`` instead of ``w``.

    Returns strengths ``w`` with the shape of ``counts[..., 0]``, normalised to geometric mean 1
    (``mean(log w) = 0``) per prompt.
    """
    counts = jnp.asarray(counts, jnp.float32)
    batched = counts.ndim == 3
    c_PxKxK = counts if batched else counts[None]
    d = c_PxKxK.shape[-1]
    off_diag = 1.0 - jnp.eye(d, dtype=jnp.float32)
    c_PxKxK = (c_PxKxK + pseudo_count) * off_diag
    wins_PxK = c_PxKxK.sum(-1)
    n_PxKxK = c_PxKxK + jnp.swapaxes(c_PxKxK, -1, -2)

    def cond(state):
        i, _, delta = state
        return (i < iters) & (delta >= tol)

    def body(state):
        i, log_w, _ = state
        new = _mm_step(log_w, wins_PxK, n_PxKxK)
        return i + 1, new, jnp.max(jnp.abs(new - log_w))

    log_w0 = jnp.zeros(c_PxKxK.shape[:2], jnp.float32)
    _, log_w, _ = jax.lax.while_loop(cond, body, (jnp.int32(0), log_w0, jnp.float32(jnp.inf)))
    out = log_w if return_log else jnp.exp(log_w)
    return out if batched else out[0]


def p_hat(strengths: ArrayLike, i: ArrayLike, j: ArrayLike) -> Array:
    """``w_i / (w_i + w_j)`` for index arrays ``i``, ``j`` over the last axis of ``strengths``
    (``[K]`` with scalar/vector indices, or ``[P, K]`` with ``[P]`` / ``[P, M]`` indices)."""
    log_w = jnp.log(jnp.asarray(strengths, jnp.float32))
    return jax.nn.sigmoid(_take(log_w, i) - _take(log_w, j))


def bt_matrix(logits: ArrayLike) -> Array:
    """The Bradley-Terry probability of every pair: ``p[..., i, j] = sigmoid(l_i - l_j)`` for
    log-strengths ``l`` (``log w``, or a score over a temperature), as ``0.5 (1 + tanh(d / 2))``
    so that ``p_ij + p_ji = 1`` exactly and large differences saturate without overflow."""
    l = jnp.asarray(logits, jnp.float32)
    return 0.5 * (1.0 + jnp.tanh(0.5 * (l[..., :, None] - l[..., None, :])))


def p_hat_matrix(strengths: ArrayLike) -> Array:
    """``p[..., i, j] = w_i / (w_i + w_j)`` for every pair."""
    return bt_matrix(jnp.log(jnp.asarray(strengths, jnp.float32)))


def _take(x_PxK: Array, idx: ArrayLike) -> Array:
    idx = jnp.asarray(idx)
    if x_PxK.ndim == 1:
        return x_PxK[idx]
    if idx.ndim == 1:
        return jnp.take_along_axis(x_PxK, idx[:, None], axis=-1)[:, 0]
    return jnp.take_along_axis(x_PxK, idx, axis=-1)


def select_pairs(strengths_PxK: ArrayLike, mode: Literal["best_vs_worst", "all_pairs"] = "best_vs_worst"):
    """Pairs to train on and their targets, from fitted strengths.

    ``best_vs_worst`` (the paper's default): per prompt the strongest vs the weakest response,
    ``a_P``, ``b_P``, ``p_hat_P`` (``a != b`` even when all strengths tie). ``all_pairs``: every
    ``i < j``, as ``[P, K(K-1)/2]`` arrays. Returns ``(a, b, p_hat_ab)``.
    """
    w_PxK = jnp.asarray(strengths_PxK, jnp.float32)
    d = w_PxK.shape[-1]
    if d < 2:
        raise ValueError(f"need at least 2 responses per prompt to form pairs, got {d}")
    if mode == "best_vs_worst":
        a_P = jnp.argmax(w_PxK, axis=-1)
        b_P = jnp.argmin(w_PxK, axis=-1)
        b_P = jnp.where(a_P == b_P, (a_P + 1) % d, b_P)
        return a_P, b_P, p_hat(w_PxK, a_P, b_P)
    if mode == "all_pairs":
        i_M, j_M = jnp.triu_indices(d, k=1)
        p = w_PxK.shape[0]
        a_PxM, b_PxM = jnp.broadcast_to(i_M, (p, i_M.size)), jnp.broadcast_to(j_M, (p, j_M.size))
        return a_PxM, b_PxM, p_hat(w_PxK, a_PxM, b_PxM)
    raise ValueError(f"pair selection mode must be 'best_vs_worst' or 'all_pairs'; got {mode!r}")


# ----------------------------------------------------------------------------- lists -> pairs


def _best(scores_PxK: Array, mask_PxK: Array) -> Array:
    return jnp.argmax(jnp.where(mask_PxK, scores_PxK, -jnp.inf), axis=-1)


def pairs_best_vs_random(scores: ArrayLike, mask: ArrayLike, key: Array):
    """DPO best-vs-random: the top-scored response vs one drawn uniformly from those scored
    strictly lower. Returns ``(chosen_P, rejected_P, valid_P)``; ``valid`` is False when no
    response scores lower than the best (all tied, or fewer than 2 present)."""
    s_PxK, m_PxK = jnp.asarray(scores, jnp.float32), jnp.asarray(mask, bool)
    best_P = _best(s_PxK, m_PxK)
    best_score_P = jnp.take_along_axis(s_PxK, best_P[:, None], -1)
    lower_PxK = m_PxK & (s_PxK < best_score_P)
    u_PxK = jax.random.uniform(key, s_PxK.shape)
    rej_P = jnp.argmax(jnp.where(lower_PxK, u_PxK, -1.0), axis=-1)
    return best_P, rej_P, lower_PxK.any(-1)


def pairs_best_vs_others(scores: ArrayLike, mask: ArrayLike):
    """DPO 1-vs-others: the top-scored response vs each response scored strictly lower.
    Returns ``(chosen_PxK, rejected_PxK, valid_PxK)`` (slot ``k`` pairs best with ``k``)."""
    s_PxK, m_PxK = jnp.asarray(scores, jnp.float32), jnp.asarray(mask, bool)
    best_P = _best(s_PxK, m_PxK)
    best_score_P = jnp.take_along_axis(s_PxK, best_P[:, None], -1)
    k = s_PxK.shape[-1]
    rej_PxK = jnp.broadcast_to(jnp.arange(k), s_PxK.shape)
    return jnp.broadcast_to(best_P[:, None], s_PxK.shape), rej_PxK, m_PxK & (s_PxK < best_score_P)


def pairs_all(scores: ArrayLike, mask: ArrayLike):
    """DPO pairwise: every pair with different scores, oriented higher-over-lower; ties dropped.
    Returns ``(chosen_PxM, rejected_PxM, valid_PxM)`` over the ``M = K(K-1)/2`` slots ``i < j``."""
    s_PxK, m_PxK = jnp.asarray(scores, jnp.float32), jnp.asarray(mask, bool)
    i_M, j_M = jnp.triu_indices(s_PxK.shape[-1], k=1)
    s_i, s_j = s_PxK[:, i_M], s_PxK[:, j_M]
    i_wins = s_i > s_j
    chosen = jnp.where(i_wins, i_M, j_M)
    rejected = jnp.where(i_wins, j_M, i_M)
    valid = m_PxK[:, i_M] & m_PxK[:, j_M] & (s_i != s_j)
    return chosen, rejected, valid
