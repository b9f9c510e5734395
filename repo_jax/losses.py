"""Preference-optimisation losses on sequence-level log-ratios.

Every loss here is a pure function of ``rho = logp_policy(y|x) - logp_ref(y|x)`` (summed over
response tokens by :mod:`repo_jax.logprobs`), works in float32 whatever the input dtype, returns
one loss per example (``[B]``) and is safe under ``jit``, ``vmap`` and ``grad``. Reduction (masked
or weighted mean over the batch) belongs to the train step. The maths and the choices the papers
left open are in ``ALGORITHMS.md``; the names below follow its notation.

Dimension letters: B batch, K responses per prompt.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
from jax import Array
from jax.typing import ArrayLike

_NEG = -1e30  # a finite "minus infinity" for masked logits: log_softmax stays finite


def _f32(x: ArrayLike) -> Array:
    return jnp.asarray(x, jnp.float32)


def _logit(p: Array) -> Array:
    return jnp.log(p) - jnp.log1p(-p)


def irepo_loss(
    logratio_a: ArrayLike, logratio_b: ArrayLike, pref: ArrayLike, *, beta: float, pref_eps: float = 1e-3
) -> Array:
    """iREPO: ``(beta * (rho_a - rho_b) - logit(p_hat))**2`` per example.

    ``pref`` is the empirical probability that ``a`` beats ``b``; it is clipped to
    ``[pref_eps, 1 - pref_eps]`` so unanimous votes (``pref`` in {0, 1}) give a finite target.
    Symmetric: swapping ``a`` and ``b`` and replacing ``pref`` by ``1 - pref`` gives the same loss.
    """
    rho_a_B, rho_b_B, pref_B = _f32(logratio_a), _f32(logratio_b), _f32(pref)
    target_B = _logit(jnp.clip(pref_B, pref_eps, 1.0 - pref_eps))
    margin_B = beta * (rho_a_B - rho_b_B)
    return jnp.square(margin_B - target_B)


def dpo_loss(
    logratio_chosen: ArrayLike, logratio_rejected: ArrayLike, *, beta: float, label_smoothing: float = 0.0
) -> Array:
    """DPO ``-log sigma(beta * (rho_w - rho_l))``; with ``label_smoothing = eps`` the conservative
    (cDPO) form ``-(1 - eps) log sigma(z) - eps log sigma(-z)``."""
    z_B = beta * (_f32(logratio_chosen) - _f32(logratio_rejected))
    return -(1.0 - label_smoothing) * jax.nn.log_sigmoid(z_B) - label_smoothing * jax.nn.log_sigmoid(-z_B)


def soft_dpo_loss(logratio_a: ArrayLike, logratio_b: ArrayLike, pref: ArrayLike, *, beta: float) -> Array:
    """Cross-entropy with a soft label: ``-(p log sigma(z) + (1 - p) log sigma(-z))``,
    ``z = beta * (rho_a - rho_b)``. Finite for ``p`` in {0, 1}."""
    z_B = beta * (_f32(logratio_a) - _f32(logratio_b))
    p_B = _f32(pref)
    return -(p_B * jax.nn.log_sigmoid(z_B) + (1.0 - p_B) * jax.nn.log_sigmoid(-z_B))


def ipo_loss(logratio_chosen: ArrayLike, logratio_rejected: ArrayLike, *, beta: float) -> Array:
    """IPO ``(rho_w - rho_l - 1 / (2 beta))**2`` (``beta`` plays IPO's ``tau``, as in TRL)."""
    return jnp.square(_f32(logratio_chosen) - _f32(logratio_rejected) - 1.0 / (2.0 * beta))


def _safe_div(num: Array, den: Array) -> Array:
    """``num / den`` with 0 where ``den == 0`` (and a gradient that stays finite there)."""
    ok = den != 0
    return jnp.where(ok, num / jnp.where(ok, den, 1.0), 0.0)


def lpo_pair_weights(
    scores: ArrayLike, mask: ArrayLike, *, weight_norm: Literal["none", "mean", "sum"] = "none",
    weight: Literal["squared", "linear"] = "squared",
) -> Array:
    """``m_BxKxK[b, i, j] = |s_i^2 - s_j^2|`` (``weight="linear"``: ``|s_i - s_j|``) where
    ``s_i > s_j`` and both are present, else 0.

    ``weight_norm``: ``none`` as printed in the paper; ``sum`` divides each row's weights by their
    sum (they add up to 1); ``mean`` divides by their mean over the row's ordered pairs (they
    average 1). Tied pairs get weight 0 and so drop out.
    """
    mask_BxK = jnp.asarray(mask, bool)
    s_BxK = jnp.where(mask_BxK, _f32(scores), 0.0)
    ordered_BxKxK = (s_BxK[:, :, None] > s_BxK[:, None, :]) & mask_BxK[:, :, None] & mask_BxK[:, None, :]
    if weight == "squared":
        gap_BxKxK = s_BxK[:, :, None] ** 2 - s_BxK[:, None, :] ** 2
    elif weight == "linear":
        gap_BxKxK = s_BxK[:, :, None] - s_BxK[:, None, :]
    else:
        raise ValueError(f"weight must be 'squared' or 'linear'; got {weight!r}")
    m_BxKxK = jnp.where(ordered_BxKxK, jnp.abs(gap_BxKxK), 0.0)
    if weight_norm == "none":
        return m_BxKxK
    total_B = m_BxKxK.sum(axis=(1, 2))
    if weight_norm == "sum":
        return _safe_div(m_BxKxK, total_B[:, None, None])
    if weight_norm == "mean":
        n_pairs_B = ordered_BxKxK.sum(axis=(1, 2)).astype(jnp.float32)
        return _safe_div(m_BxKxK * n_pairs_B[:, None, None], total_B[:, None, None])
    raise ValueError(f"weight_norm must be one of none, mean, sum; got {weight_norm!r}")


def lpo_loss(
    logratios: ArrayLike,
    scores: ArrayLike,
    mask: ArrayLike,
    *,
    beta: float,
    variant: Literal["lpo", "lpo_abs"] = "lpo",
    abs_term: Literal["sigmoid", "logsigmoid"] = "sigmoid",
    weight_norm: Literal["none", "mean", "sum"] = "none",
    weight: Literal["squared", "linear"] = "squared",
) -> Array:
    """Listwise LPO: ``-sum_{i,j: s_i > s_j} m_ij log sigma(beta (rho_i - rho_j))`` per prompt,
    ``m_ij = |s_i^2 - s_j^2|`` (``weight="linear"``: ``|s_i - s_j|``; see :func:`lpo_pair_weights`).

    ``logratios``, ``scores``: ``[B, K]``; ``mask``: ``[B, K]`` bool (False for the padding of
    ragged lists; masked entries may hold any value, NaN included). ``variant="lpo_abs"`` adds
    ``(1/K) sum_i f(-beta rho_i)`` over present responses with ``f`` = ``sigmoid`` (the paper's
    Table 1, bounded) or ``logsigmoid`` (its Eq. 8, unbounded), chosen by ``abs_term``.
    """
    if variant not in ("lpo", "lpo_abs"):
        raise ValueError(f"variant must be 'lpo' or 'lpo_abs'; got {variant!r}")
    mask_BxK = jnp.asarray(mask, bool)
    r_BxK = beta * jnp.where(mask_BxK, _f32(logratios), 0.0)  # implicit rewards
    m_BxKxK = lpo_pair_weights(scores, mask_BxK, weight_norm=weight_norm, weight=weight)
    z_BxKxK = r_BxK[:, :, None] - r_BxK[:, None, :]
    loss_B = -jnp.einsum("BIJ,BIJ->B", m_BxKxK, jax.nn.log_sigmoid(z_BxKxK))
    if variant == "lpo":
        return loss_B
    if abs_term == "sigmoid":
        f_BxK = jax.nn.sigmoid(-r_BxK)
    elif abs_term == "logsigmoid":
        f_BxK = jax.nn.log_sigmoid(-r_BxK)
    else:
        raise ValueError(f"abs_term must be 'sigmoid' or 'logsigmoid'; got {abs_term!r}")
    n_B = mask_BxK.sum(axis=1).astype(jnp.float32)
    return loss_B + _safe_div(jnp.where(mask_BxK, f_BxK, 0.0).sum(axis=1), n_B)


def infonca_loss(logratios: ArrayLike, scores: ArrayLike, mask: ArrayLike, *, beta: float, alpha: float = 1.0) -> Array:
    """InfoNCA: ``-sum_i softmax(s / alpha)_i log softmax(beta rho)_i`` over the present responses.

    A fully masked row gives 0.
    """
    mask_BxK = jnp.asarray(mask, bool)
    target_BxK = jax.nn.softmax(jnp.where(mask_BxK, _f32(scores) / alpha, _NEG), axis=-1)
    target_BxK = jnp.where(mask_BxK, target_BxK, 0.0)
    logq_BxK = jax.nn.log_softmax(jnp.where(mask_BxK, beta * _f32(logratios), _NEG), axis=-1)
    return -jnp.einsum("BK,BK->B", target_BxK, jnp.where(mask_BxK, logq_BxK, 0.0))


def lipo_lambda_loss(logratios: ArrayLike, scores: ArrayLike, mask: ArrayLike, *, beta: float) -> Array:
    """LiPO-lambda (Liu et al. 2024): ``-sum_{i,j: s_i > s_j} Delta_ij log sigma(z_i - z_j)``, ``z = beta rho``.

    ``Delta_ij = |G_i - G_j| |1/D(tau_i) - 1/D(tau_j)|`` with gains ``G = 2^s' - 1`` of the
    scores rescaled to ``[0, 1]`` per list (``s' = (s - min) / (max - min)``, 0 for a constant
    list), discount ``D(tau) = log2(1 + tau)`` and ``tau_i`` the rank of ``z_i`` among the
    present responses (1 = highest; ties broken by position). ``Delta`` is held constant in
    the gradient (``stop_gradient``), as LambdaRank's weights are.
    """
    mask_BxK = jnp.asarray(mask, bool)
    z_BxK = beta * jnp.where(mask_BxK, _f32(logratios), 0.0)
    s_BxK = _f32(scores)
    lo_B = jnp.min(jnp.where(mask_BxK, s_BxK, jnp.inf), axis=1)
    hi_B = jnp.max(jnp.where(mask_BxK, s_BxK, -jnp.inf), axis=1)
    span_B = jnp.where(jnp.isfinite(hi_B - lo_B), hi_B - lo_B, 0.0)
    s01_BxK = jnp.where(mask_BxK, _safe_div(s_BxK - lo_B[:, None], span_B[:, None]), 0.0)
    gain_BxK = jnp.exp2(s01_BxK) - 1.0
    # rank among present responses: 1 + how many present responses have a higher z (earlier index wins ties)
    zs_BxK = jax.lax.stop_gradient(z_BxK)
    k = z_BxK.shape[1]
    earlier_KxK = jnp.arange(k)[None, :] < jnp.arange(k)[:, None]  # [i, j]: j before i
    above_BxKxK = ((zs_BxK[:, None, :] > zs_BxK[:, :, None]) | ((zs_BxK[:, None, :] == zs_BxK[:, :, None]) & earlier_KxK))
    rank_BxK = 1.0 + jnp.sum(above_BxKxK & mask_BxK[:, None, :], axis=2).astype(jnp.float32)
    inv_disc_BxK = 1.0 / jnp.log2(1.0 + rank_BxK)
    s_m = jnp.where(mask_BxK, s_BxK, 0.0)
    ordered_BxKxK = (s_m[:, :, None] > s_m[:, None, :]) & mask_BxK[:, :, None] & mask_BxK[:, None, :]
    delta_BxKxK = (jnp.abs(gain_BxK[:, :, None] - gain_BxK[:, None, :])
                   * jnp.abs(inv_disc_BxK[:, :, None] - inv_disc_BxK[:, None, :]))
    delta_BxKxK = jax.lax.stop_gradient(jnp.where(ordered_BxKxK, delta_BxKxK, 0.0))
    log_sig_BxKxK = jax.nn.log_sigmoid(z_BxK[:, :, None] - z_BxK[:, None, :])
    return -jnp.einsum("BIJ,BIJ->B", delta_BxKxK, log_sig_BxKxK)
