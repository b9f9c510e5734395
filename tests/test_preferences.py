"""Zermelo / Bradley-Terry fitting, p_hat, pair selection and list-to-pair builders."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from repo_jax import preferences as prefs


def _bt_mle_newton(counts, iters=100):
    """Direct maximum likelihood of Bradley-Terry in float64 (Newton on log-strengths, sum 0)."""
    d = counts.shape[0]
    theta = np.zeros(d)
    n = counts + counts.T
    for _ in range(iters):
        p = 1 / (1 + np.exp(-(theta[:, None] - theta[None, :])))
        grad = counts.sum(1) - (n * p).sum(1)
        w = n * p * (1 - p)
        hess = -np.diag(w.sum(1)) + w
        # fix the gauge (sum theta = 0) with a constraint row
        a = np.vstack([np.hstack([hess, np.ones((d, 1))]), np.hstack([np.ones((1, d)), np.zeros((1, 1))])])
        step = np.linalg.solve(a, np.concatenate([-grad, [0.0]]))[:d]
        theta += step
        if np.abs(step).max() < 1e-12:
            break
    return theta - theta.mean()


def test_two_items_give_the_empirical_fraction():
    counts = jnp.array([[0.0, 7.0], [2.0, 0.0]])
    w = prefs.zermelo(counts)
    np.testing.assert_allclose(prefs.p_hat(w, 0, 1), 7 / 9, rtol=1e-5)
    np.testing.assert_allclose(jnp.exp(jnp.log(w).mean()), 1.0, rtol=1e-6)  # geometric mean 1
    # with a pseudo-count alpha: (7 + a) / (9 + 2a)
    w = prefs.zermelo(counts, pseudo_count=0.5)
    np.testing.assert_allclose(prefs.p_hat(w, 0, 1), 7.5 / 10, rtol=1e-5)


def test_logit_of_p_hat_is_log_strength_difference():
    counts = jnp.array([[0, 3, 5], [2, 0, 4], [1, 2, 0.0]])
    w = prefs.zermelo(counts)
    p = prefs.p_hat_matrix(w)
    logit = jnp.log(p) - jnp.log1p(-p)
    np.testing.assert_allclose(logit, jnp.log(w)[:, None] - jnp.log(w)[None, :], atol=1e-4)


def test_agrees_with_direct_maximum_likelihood():
    rng = np.random.default_rng(0)
    counts = rng.integers(1, 20, size=(5, 5)).astype(np.float64)
    np.fill_diagonal(counts, 0)
    theta = _bt_mle_newton(counts)
    log_w = prefs.zermelo(jnp.asarray(counts), tol=1e-7, return_log=True)
    np.testing.assert_allclose(log_w, theta, atol=2e-4)


def test_recovers_true_strengths_from_many_simulated_annotators():
    rng = np.random.default_rng(1)
    true_theta = np.array([1.5, 0.5, 0.0, -0.5, -1.5])
    p_true = 1 / (1 + np.exp(-(true_theta[:, None] - true_theta[None, :])))
    errs = []
    for h in (10, 100, 10_000):
        # each annotator votes once on each unordered pair
        upper = rng.random((h, 5, 5)) < p_true
        votes = np.triu(upper, 1).astype(np.float32)
        votes = votes + np.transpose(np.triu(~upper, 1), (0, 2, 1)).astype(np.float32)
        counts = prefs.counts_from_probs(votes)
        iu = np.triu_indices(5, 1)
        np.testing.assert_allclose((counts + counts.T)[iu], h)  # n_ij + n_ji = H
        log_w = prefs.zermelo(counts, pseudo_count=0.5, return_log=True)
        errs.append(float(np.abs(np.asarray(log_w) - (true_theta - true_theta.mean())).max()))
    assert errs[-1] < 0.05, errs
    assert errs[-1] < errs[0], errs


def test_batched_equals_unbatched_and_jits():
    rng = np.random.default_rng(2)
    counts = rng.integers(0, 9, size=(3, 4, 4)).astype(np.float32)
    counts[:, np.arange(4), np.arange(4)] = 0
    batched = jax.jit(lambda c: prefs.zermelo(c, pseudo_count=0.5))(counts)
    for p in range(3):
        np.testing.assert_allclose(batched[p], prefs.zermelo(counts[p], pseudo_count=0.5), rtol=1e-5)


def test_unanimous_votes_stay_finite():
    # item 0 always beats 1 and 2; item 2 never wins
    counts = jnp.array([[0, 5, 5], [0, 0, 5], [0, 0, 0.0]])
    w = prefs.zermelo(counts, pseudo_count=0.5)
    assert np.all(np.isfinite(w)) and w[0] > w[1] > w[2]
    w0 = prefs.zermelo(counts, pseudo_count=0.0, iters=500)  # boundary MLE: still finite numbers
    assert np.all(np.isfinite(np.log(w0)))


def test_counts_from_soft_probabilities():
    p = jnp.array([[[0.0, 0.8], [0.2, 0.0]], [[0.0, 0.4], [0.6, 0.0]], [[0.5, 1.0], [0.0, 0.5]]])
    c = prefs.counts_from_probs(p)
    np.testing.assert_allclose(c, [[0, 2.2], [0.8, 0]], rtol=1e-6)


def test_select_best_vs_worst_and_all_pairs():
    w = jnp.array([[0.5, 2.0, 1.0], [1.0, 1.0, 1.0]])
    a, b, p = prefs.select_pairs(w)
    assert a.tolist() == [1, 0] and b.tolist() == [0, 1]
    np.testing.assert_allclose(p, [2.0 / 2.5, 0.5], rtol=1e-6)
    a, b, p = prefs.select_pairs(w, "all_pairs")
    assert a.shape == (2, 3) and a[0].tolist() == [0, 0, 1] and b[0].tolist() == [1, 2, 2]
    np.testing.assert_allclose(p[0], [0.5 / 2.5, 0.5 / 1.5, 2 / 3], rtol=1e-6)
    with pytest.raises(ValueError, match="mode"):
        prefs.select_pairs(w, "nope")


def test_list_to_pair_builders():
    s = jnp.array([[3.0, 9.0, 1.0, 9.0], [2.0, 2.0, 0.0, 0.0]])
    m = jnp.array([[True, True, True, False], [True, True, False, False]])
    c, r, v = prefs.pairs_best_vs_random(s, m, jax.random.key(0))
    assert c[0] == 1 and int(r[0]) in (0, 2) and bool(v[0])
    assert not bool(v[1])  # the two present responses tie
    c, r, v = prefs.pairs_best_vs_others(s, m)
    assert v[0].tolist() == [True, False, True, False] and c[0, 0] == 1
    assert not v[1].any()
    c, r, v = prefs.pairs_all(s, m)
    got = {(int(a), int(b)) for a, b, ok in zip(c[0], r[0], v[0]) if ok}
    assert got == {(1, 0), (0, 2), (1, 2)}
    assert not v[1].any()
    # best-vs-random draws among all lower-scored responses
    seen = {int(prefs.pairs_best_vs_random(s, m, jax.random.key(k))[1][0]) for k in range(20)}
    assert seen == {0, 2}
