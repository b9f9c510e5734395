"""Held-out metrics of the implicit reward ``r = beta * (log pi(y|x) - log pi_ref(y|x))`` against a
list's scores (jitted; the host only gathers the lists' log-ratios ``rho_NxK``).

* ``kendall_tau``: Kendall's tau-b between ``r`` and the scores of each list (pairs of present
  responses; ``sum sign(ds) sign(dr) / sqrt(#(ds != 0) #(dr != 0))``), averaged over the lists
  whose scores are not all tied. A list whose rewards are all tied (the starting policy, where
  ``r = 0``) ranks nothing and counts 0.
* ``pair_accuracy``: over every pair with ``s_i > s_j`` in every list, the fraction with
  ``r_i > r_j`` (strictly: a tie is not a win; 0 at the start).
* ``reward_margin``: the mean of ``r_i - r_j`` over the same pairs.

Dimension letters: N lists (the held-out split), K responses per list, M pairs.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


@functools.partial(jax.jit, static_argnames=("beta",))
def ranking_metrics(rho_NxK, scores_NxK, mask_NxK, *, beta: float) -> dict[str, jax.Array]:
    r_NxK = beta * rho_NxK.astype(jnp.float32)
    both_NxKxK = mask_NxK[:, :, None] & mask_NxK[:, None, :]
    upper_KxK = jnp.triu(jnp.ones(both_NxKxK.shape[1:], bool), 1)
    pairs_NxKxK = both_NxKxK & upper_KxK
    ds_NxKxK = jnp.sign(scores_NxK[:, :, None] - scores_NxK[:, None, :]) * pairs_NxKxK
    dr_NxKxK = jnp.sign(r_NxK[:, :, None] - r_NxK[:, None, :]) * pairs_NxKxK
    num_N = jnp.einsum("nij,nij->n", ds_NxKxK, dr_NxKxK)
    ns_N, nr_N = jnp.sum(ds_NxKxK != 0, (1, 2)), jnp.sum(dr_NxKxK != 0, (1, 2))
    tau_N = jnp.where(nr_N > 0, num_N / jnp.sqrt(jnp.maximum(ns_N * nr_N, 1)), 0.0)
    ranked_N = ns_N > 0
    better_NxKxK = both_NxKxK & (scores_NxK[:, :, None] > scores_NxK[:, None, :])
    diff_NxKxK = r_NxK[:, :, None] - r_NxK[:, None, :]
    n_pairs = jnp.maximum(jnp.sum(better_NxKxK), 1)
    return {
        "kendall_tau": jnp.sum(jnp.where(ranked_N, tau_N, 0.0)) / jnp.maximum(jnp.sum(ranked_N), 1),
        "pair_accuracy": jnp.sum(better_NxKxK & (diff_NxKxK > 0)) / n_pairs,
        "reward_margin": jnp.sum(jnp.where(better_NxKxK, diff_NxKxK, 0.0)) / n_pairs,
    }


def gather_pairs(rho_NxK, scores_NxK, pairs_Mx3):
    """``(rho_Mx2, scores_Mx2)``: the ``(chosen, rejected)`` columns of each pair's list."""
    n, i, j = pairs_Mx3[:, 0], pairs_Mx3[:, 1], pairs_Mx3[:, 2]
    take = lambda x: jnp.stack([x[n, i], x[n, j]], axis=1)
    return take(rho_NxK), take(scores_NxK)
