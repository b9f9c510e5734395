"""Loss registry: small adapters from a batch of sequence log-ratios to a ``losses.py`` call.

Each entry says which batch fields the loss needs, whether it is pairwise (``K = 2``) or
listwise, how to call the kernel, and which ordered pairs ``(i, j)`` count as "``i`` should
beat ``j``" (for the implicit-reward margin and accuracy metrics). Adding a loss is adding an
entry; no kernel ever sees a loss name.

``sft`` (``python -m repo_jax.sft``) is the mean negative log-likelihood per response token of
each example (one response, ``K = 1``, reference log-probs 0), averaged over examples.

Conventions (see ``batch.py``): pairwise batches hold response ``a``/chosen at ``k = 0`` and
``b``/rejected at ``k = 1``; ``pref_B`` is P(a beats b).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from repo_jax import losses
from repo_jax.training import batch as bt
from repo_jax.training.config import LossConfig


@dataclasses.dataclass(frozen=True)
class Objective:
    """``loss(rho_BxK, batch, cfg) -> [B]``; ``order(batch) -> bool [B, K, K]``."""

    loss: Callable[[jax.Array, Mapping[str, Any], LossConfig], jax.Array]
    order: Callable[[Mapping[str, Any]], jax.Array]
    needs: tuple[str, ...] = ()
    pairwise: bool = True


def _list_mask(batch) -> jax.Array:
    if "list_mask_BxK" in batch:
        return jnp.asarray(batch["list_mask_BxK"], bool)
    b, k, _ = bt.dims(batch)
    return jnp.ones((b, k), bool)


def _no_pairs(batch) -> jax.Array:
    b, k, _ = bt.dims(batch)
    return jnp.zeros((b, k, k), bool)


def _nll_per_token(logps_BxK, batch) -> jax.Array:
    """SFT: minus the response's log-likelihood over its token count (``K = 1``; with
    ``ref_logps = 0`` the log-ratio is the log-likelihood)."""
    tokens_B = bt.response_tokens(batch)[:, 0]
    return -logps_BxK[:, 0] / jnp.maximum(tokens_B, 1.0)


def _chosen_first(batch) -> jax.Array:
    b = bt.dims(batch)[0]
    return jnp.broadcast_to(jnp.array([[False, True], [False, False]]), (b, 2, 2))


def _by_pref(batch) -> jax.Array:
    p_B = batch["pref_B"]
    a_wins, b_wins = p_B > 0.5, p_B < 0.5
    false = jnp.zeros_like(a_wins)
    return jnp.stack([jnp.stack([false, a_wins], -1), jnp.stack([b_wins, false], -1)], -2)


def _by_scores(batch) -> jax.Array:
    s_BxK, m_BxK = batch["scores_BxK"], _list_mask(batch)
    return (s_BxK[:, :, None] > s_BxK[:, None, :]) & m_BxK[:, :, None] & m_BxK[:, None, :]


LOSSES: dict[str, Objective] = {
    "irepo": Objective(
        loss=lambda r, b, c: losses.irepo_loss(r[:, 0], r[:, 1], b["pref_B"], beta=c.beta, pref_eps=c.pref_eps),
        order=_by_pref,
        needs=("pref_B",),
    ),
    "soft_dpo": Objective(
        loss=lambda r, b, c: losses.soft_dpo_loss(r[:, 0], r[:, 1], b["pref_B"], beta=c.beta),
        order=_by_pref,
        needs=("pref_B",),
    ),
    "dpo": Objective(
        loss=lambda r, b, c: losses.dpo_loss(r[:, 0], r[:, 1], beta=c.beta, label_smoothing=c.label_smoothing),
        order=_chosen_first,
    ),
    "ipo": Objective(loss=lambda r, b, c: losses.ipo_loss(r[:, 0], r[:, 1], beta=c.beta), order=_chosen_first),
    "lpo": Objective(
        loss=lambda r, b, c: losses.lpo_loss(
            r, b["scores_BxK"], _list_mask(b), beta=c.beta, variant=c.lpo_variant, abs_term=c.abs_term,
            weight_norm=c.weight_norm, weight=c.weight,
        ),
        order=_by_scores,
        needs=("scores_BxK",),
        pairwise=False,
    ),
    "lpo_abs": Objective(  # LPO-abs by name (same as lpo with loss.lpo_variant=lpo_abs)
        loss=lambda r, b, c: losses.lpo_loss(
            r, b["scores_BxK"], _list_mask(b), beta=c.beta, variant="lpo_abs", abs_term=c.abs_term,
            weight_norm=c.weight_norm, weight=c.weight,
        ),
        order=_by_scores,
        needs=("scores_BxK",),
        pairwise=False,
    ),
    "lipo_lambda": Objective(
        loss=lambda r, b, c: losses.lipo_lambda_loss(r, b["scores_BxK"], _list_mask(b), beta=c.beta),
        order=_by_scores,
        needs=("scores_BxK",),
        pairwise=False,
    ),
    "infonca": Objective(
        loss=lambda r, b, c: losses.infonca_loss(r, b["scores_BxK"], _list_mask(b), beta=c.beta, alpha=c.infonca_alpha),
        order=_by_scores,
        needs=("scores_BxK",),
        pairwise=False,
    ),
    "sft": Objective(loss=lambda r, b, c: _nll_per_token(r, b), order=_no_pairs, pairwise=False),
}


def get(name: str) -> Objective:
    if name not in LOSSES:
        raise KeyError(f"train.loss.name={name!r} is not a registered loss; choose one of {sorted(LOSSES)}")
    return LOSSES[name]


def metric_sums(objective: Objective, rho_BxK, batch, cfg: LossConfig, example_B) -> dict[str, jax.Array]:
    """Local sums (later ``psum``-ed, then divided) of the loss and the diagnostic metrics.

    ``loss_sum``/``examples``: masked sum of per-example losses and their count.
    ``margin_sum``/``acc_sum``/``pairs``: implicit-reward margin ``beta (rho_i - rho_j)`` and
    ``rho_i > rho_j`` over the ordered pairs "``i`` should beat ``j``".
    ``calib_sum``: ``|sigma(beta (rho_0 - rho_1)) - p_hat|`` where the batch has ``pref_B``.
    """
    rho_BxK = rho_BxK.astype(jnp.float32)
    ex_B = example_B.astype(jnp.float32)
    loss_B = objective.loss(rho_BxK, batch, cfg)
    # where() so a NaN in a masked-out example cannot leak into the sum
    out = {"loss_sum": jnp.sum(jnp.where(example_B, loss_B, 0.0)), "examples": jnp.sum(ex_B)}
    pairs_BxKxK = objective.order(batch) & example_B[:, None, None]
    r_BxK = cfg.beta * rho_BxK
    diff_BxKxK = r_BxK[:, :, None] - r_BxK[:, None, :]
    out["pairs"] = jnp.sum(pairs_BxKxK.astype(jnp.float32))
    out["margin_sum"] = jnp.sum(jnp.where(pairs_BxKxK, diff_BxKxK, 0.0))
    out["acc_sum"] = jnp.sum((pairs_BxKxK & (diff_BxKxK > 0)).astype(jnp.float32))
    if "pref_B" in batch:
        err_B = jnp.abs(jax.nn.sigmoid(r_BxK[:, 0] - r_BxK[:, 1]) - batch["pref_B"])
        out["calib_sum"] = jnp.sum(jnp.where(example_B, err_B, 0.0))
    return out


def finalize(sums: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    """Sums -> means (0 where nothing was counted)."""
    div = lambda a, b: jnp.where(b > 0, a / jnp.maximum(b, 1.0), 0.0)
    out = {
        "loss": div(sums["loss_sum"], sums["examples"]),
        "reward_margin": div(sums["margin_sum"], sums["pairs"]),
        "reward_accuracy": div(sums["acc_sum"], sums["pairs"]),
        "examples": sums["examples"],
    }
    if "calib_sum" in sums:
        out["calibration_error"] = div(sums["calib_sum"], sums["examples"])
    return out
