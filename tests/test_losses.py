"""Loss kernels: hand-computed values and the properties listed in ALGORITHMS.md."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from repo_jax import losses


def _sig(x):
    return 1.0 / (1.0 + math.exp(-x))


def _logit(p):
    return math.log(p / (1 - p))


# ---------------------------------------------------------------- hand-computed values


def test_irepo_hand_values():
    a, b, p, beta = np.array([1.0, -0.5]), np.array([0.2, 0.5]), np.array([0.8, 0.3]), 0.5
    want = [(beta * (a[i] - b[i]) - _logit(p[i])) ** 2 for i in range(2)]
    np.testing.assert_allclose(losses.irepo_loss(a, b, p, beta=beta), want, rtol=1e-6)


def test_dpo_hand_values_with_label_smoothing():
    w, l, beta = np.array([0.3, -1.0]), np.array([-0.2, 0.4]), 2.0
    z = beta * (w - l)
    np.testing.assert_allclose(losses.dpo_loss(w, l, beta=beta), [-math.log(_sig(v)) for v in z], rtol=1e-6)
    eps = 0.1
    want = [-(1 - eps) * math.log(_sig(v)) - eps * math.log(_sig(-v)) for v in z]
    np.testing.assert_allclose(losses.dpo_loss(w, l, beta=beta, label_smoothing=eps), want, rtol=1e-6)


def test_soft_dpo_hand_values():
    a, b, p, beta = np.array([0.3]), np.array([0.1]), np.array([0.7]), 1.5
    z = beta * 0.2
    want = -(0.7 * math.log(_sig(z)) + 0.3 * math.log(_sig(-z)))
    np.testing.assert_allclose(losses.soft_dpo_loss(a, b, p, beta=beta), [want], rtol=1e-6)


def test_ipo_hand_values():
    np.testing.assert_allclose(losses.ipo_loss([1.0], [0.25], beta=0.5), [(0.75 - 1.0) ** 2], rtol=1e-6)


def test_lpo_hand_values():
    # one prompt, three responses with scores 3, 1, 2 and log-ratios 0.5, -0.2, 0.1
    rho, s, beta = np.array([[0.5, -0.2, 0.1]]), np.array([[3.0, 1.0, 2.0]]), 0.7
    pairs = [(0, 1), (0, 2), (2, 1)]  # (winner, loser)
    want = -sum(abs(s[0, i] ** 2 - s[0, j] ** 2) * math.log(_sig(beta * (rho[0, i] - rho[0, j]))) for i, j in pairs)
    mask = np.ones((1, 3), bool)
    np.testing.assert_allclose(losses.lpo_loss(rho, s, mask, beta=beta), [want], rtol=1e-6)
    abs_sig = sum(_sig(-beta * r) for r in rho[0]) / 3
    got = losses.lpo_loss(rho, s, mask, beta=beta, variant="lpo_abs")
    np.testing.assert_allclose(got, [want + abs_sig], rtol=1e-6)
    abs_logsig = sum(math.log(_sig(-beta * r)) for r in rho[0]) / 3
    got = losses.lpo_loss(rho, s, mask, beta=beta, variant="lpo_abs", abs_term="logsigmoid")
    np.testing.assert_allclose(got, [want + abs_logsig], rtol=1e-6)


def test_lpo_weight_norms():
    s, mask = np.array([[3.0, 1.0, 2.0]]), np.ones((1, 3), bool)
    m = np.asarray(losses.lpo_pair_weights(s, mask))
    assert m[0, 0, 1] == 8.0 and m[0, 0, 2] == 5.0 and m[0, 2, 1] == 3.0 and m.sum() == 16.0
    np.testing.assert_allclose(losses.lpo_pair_weights(s, mask, weight_norm="sum").sum(), 1.0, rtol=1e-6)
    np.testing.assert_allclose(losses.lpo_pair_weights(s, mask, weight_norm="mean").sum(), 3.0, rtol=1e-6)


def test_infonca_hand_values():
    rho, s, beta, alpha = np.array([[0.2, -0.1]]), np.array([[1.0, 0.0]]), 2.0, 0.5
    t = np.exp(s[0] / alpha) / np.exp(s[0] / alpha).sum()
    q = np.exp(beta * rho[0]) / np.exp(beta * rho[0]).sum()
    want = -(t * np.log(q)).sum()
    got = losses.infonca_loss(rho, s, np.ones((1, 2), bool), beta=beta, alpha=alpha)
    np.testing.assert_allclose(got, [want], rtol=1e-6)


# ---------------------------------------------------------------- properties (ALGORITHMS.md)


def test_irepo_zero_loss_and_gradient_at_target():
    p, beta = 0.8, 0.5
    b = 0.3
    a = b + _logit(p) / beta  # beta * delta_rho == logit(p)
    loss, grad = jax.value_and_grad(lambda x: losses.irepo_loss(x, b, p, beta=beta)[()])(jnp.float32(a))
    assert abs(float(loss)) < 1e-10 and abs(float(grad)) < 1e-5


def test_irepo_gradient_changes_sign_on_overshoot_unlike_dpo():
    p, beta = 0.8, 1.0
    target = _logit(p)
    g = jax.grad(lambda d: losses.irepo_loss(d, 0.0, p, beta=beta)[()])
    assert float(g(jnp.float32(target - 1.0))) < 0 < float(g(jnp.float32(target + 1.0)))
    gd = jax.grad(lambda d: losses.dpo_loss(d, 0.0, beta=beta)[()])
    assert float(gd(jnp.float32(target + 1.0))) < 0 and float(gd(jnp.float32(50.0))) < 0  # never vanishes


def test_irepo_half_preference_drives_margin_to_zero():
    g = jax.grad(lambda a: losses.irepo_loss(a, 0.0, 0.5, beta=0.3)[()])
    assert float(g(jnp.float32(0.0))) == 0.0
    assert float(g(jnp.float32(0.4))) > 0 and float(g(jnp.float32(-0.4))) < 0


def test_irepo_is_symmetric():
    a, b, p = np.array([0.4, -1.0]), np.array([0.1, 2.0]), np.array([0.9, 0.2])
    np.testing.assert_allclose(losses.irepo_loss(a, b, p, beta=0.2), losses.irepo_loss(b, a, 1 - p, beta=0.2), rtol=1e-5)


def test_irepo_with_constant_target_is_ipo():
    tau = 0.25
    w, l = np.array([0.5, -0.3, 2.0]), np.array([0.1, 0.6, -1.0])
    p = 1.0 / (1.0 + math.exp(-1.0 / (2 * tau)))  # logit(p) = 1 / (2 tau)
    np.testing.assert_allclose(
        losses.irepo_loss(w, l, np.full(3, p), beta=1.0, pref_eps=0.0), losses.ipo_loss(w, l, beta=tau), rtol=1e-5
    )


@pytest.mark.parametrize("pref", [0.0, 1.0])
def test_extreme_preferences_are_finite(pref):
    a, b = jnp.array([0.3]), jnp.array([-0.2])
    for fn in (lambda x: losses.irepo_loss(x, b, pref, beta=0.1), lambda x: losses.soft_dpo_loss(x, b, pref, beta=0.1)):
        val, grad = jax.value_and_grad(lambda x: fn(x).sum())(a)
        assert np.isfinite(val) and np.all(np.isfinite(grad))
    # the clip makes the iREPO target logit(1 - eps)
    np.testing.assert_allclose(losses.irepo_loss(a, b, 1.0, beta=1.0), (0.5 - _logit(1 - 1e-3)) ** 2, rtol=1e-5)


def test_lpo_with_two_responses_and_unit_weight_is_dpo():
    w, l, beta = np.array([0.3, -1.2, 0.0]), np.array([0.1, 0.4, 0.5]), 0.8
    rho = np.stack([w, l], 1)
    scores = np.tile([[1.0, 0.0]], (3, 1))  # |1 - 0| = 1
    got = losses.lpo_loss(rho, scores, np.ones((3, 2), bool), beta=beta)
    np.testing.assert_allclose(got, losses.dpo_loss(w, l, beta=beta), rtol=1e-6)
    # with scores, DPO scaled by |s_w^2 - s_l^2|
    scores = np.tile([[7.0, 4.0]], (3, 1))
    got = losses.lpo_loss(rho, scores, np.ones((3, 2), bool), beta=beta)
    np.testing.assert_allclose(got, 33.0 * losses.dpo_loss(w, l, beta=beta), rtol=1e-6)


def test_lpo_ties_contribute_no_loss_and_no_gradient():
    rho = jnp.array([[0.2, -0.4, 0.9]])
    s, mask = jnp.array([[5.0, 5.0, 2.0]]), jnp.ones((1, 3), bool)
    grad = jax.grad(lambda r: losses.lpo_loss(r, s, mask, beta=1.0).sum())(rho)
    # the tied pair (0, 1) drops out: loss equals the sum over the two untied pairs
    pair = lambda i, j: -21.0 * jax.nn.log_sigmoid(rho[0, i] - rho[0, j])  # 25 - 4
    np.testing.assert_allclose(losses.lpo_loss(rho, s, mask, beta=1.0)[0], pair(0, 2) + pair(1, 2), rtol=1e-6)
    all_tied = jnp.array([[3.0, 3.0, 3.0]])
    g_tied = jax.grad(lambda r: losses.lpo_loss(r, all_tied, mask, beta=1.0).sum())(rho)
    assert float(losses.lpo_loss(rho, all_tied, mask, beta=1.0)[0]) == 0.0 and np.all(g_tied == 0)
    assert np.all(np.isfinite(grad))


def test_lpo_masked_responses_contribute_nothing():
    rho = jnp.array([[0.2, -0.4, jnp.nan, 0.3]])
    s = jnp.array([[5.0, 1.0, jnp.nan, 2.0]])
    mask = jnp.array([[True, True, False, True]])
    short = losses.lpo_loss(rho[:, [0, 1, 3]], s[:, [0, 1, 3]], mask[:, [0, 1, 3]], beta=0.5, variant="lpo_abs")
    full, grad = jax.value_and_grad(lambda r: losses.lpo_loss(r, s, mask, beta=0.5, variant="lpo_abs").sum())(rho)
    np.testing.assert_allclose(full, short.sum(), rtol=1e-6)
    assert float(grad[0, 2]) == 0.0 and np.all(np.isfinite(grad))


def test_fully_masked_rows_are_zero_and_finite():
    rho, s, mask = jnp.ones((2, 3)), jnp.ones((2, 3)), jnp.zeros((2, 3), bool)
    for fn in (
        lambda r: losses.lpo_loss(r, s, mask, beta=1.0, variant="lpo_abs"),
        lambda r: losses.lpo_loss(r, s, mask, beta=1.0, weight_norm="mean"),
        lambda r: losses.infonca_loss(r, s, mask, beta=1.0),
    ):
        val, grad = jax.value_and_grad(lambda r: fn(r).sum())(rho)
        assert float(val) == 0.0 and np.all(grad == 0)


def test_lpo_permutation_and_shift_invariance():
    rng = np.random.default_rng(0)
    rho, s = rng.normal(size=(4, 5)), rng.integers(0, 10, size=(4, 5)).astype(np.float32)
    mask = rng.random((4, 5)) > 0.2
    base = losses.lpo_loss(rho, s, mask, beta=0.3)
    perm = rng.permutation(5)
    np.testing.assert_allclose(losses.lpo_loss(rho[:, perm], s[:, perm], mask[:, perm], beta=0.3), base, rtol=1e-5)
    np.testing.assert_allclose(losses.lpo_loss(rho + 3.0, s, mask, beta=0.3), base, rtol=1e-5)
    # LPO-abs is not shift invariant (its absolute term moves every implicit reward)
    a0 = losses.lpo_loss(rho, s, mask, beta=0.3, variant="lpo_abs")
    a1 = losses.lpo_loss(rho + 3.0, s, mask, beta=0.3, variant="lpo_abs")
    assert np.all(np.asarray(a1) < np.asarray(a0))


def test_infonca_shift_invariant_and_k2_limit():
    rho, s = np.array([[0.2, -0.1, 0.4]]), np.array([[2.0, 0.0, 1.0]])
    mask = np.ones((1, 3), bool)
    base = losses.infonca_loss(rho, s, mask, beta=1.0)
    np.testing.assert_allclose(losses.infonca_loss(rho - 5.0, s, mask, beta=1.0), base, rtol=1e-5)
    # alpha -> 0 puts all target mass on the best response: -log softmax(beta rho)_best
    sharp = losses.infonca_loss(rho, s, mask, beta=1.0, alpha=1e-3)
    np.testing.assert_allclose(sharp, -jax.nn.log_softmax(rho[0])[0:1], rtol=1e-5)


def test_losses_under_jit_and_vmap():
    rho, s, mask = jnp.ones((3, 2, 4)), jnp.arange(24.0).reshape(3, 2, 4), jnp.ones((3, 2, 4), bool)
    f = jax.jit(jax.vmap(lambda r, sc, m: losses.lpo_loss(r, sc, m, beta=0.1, variant="lpo_abs")))
    out = f(rho, s, mask)
    assert out.shape == (3, 2) and out.dtype == jnp.float32
    g = jax.jit(jax.vmap(lambda a, b, p: losses.irepo_loss(a, b, p, beta=0.1)))
    assert g(jnp.ones((3, 2)), jnp.zeros((3, 2)), jnp.full((3, 2), 0.6)).shape == (3, 2)


def test_bfloat16_inputs_compute_in_float32():
    out = losses.dpo_loss(jnp.ones(2, jnp.bfloat16), jnp.zeros(2, jnp.bfloat16), beta=0.1)
    assert out.dtype == jnp.float32


@pytest.mark.parametrize(
    "fn",
    [
        lambda a, b: losses.irepo_loss(a, b, jnp.array([0.3, 0.9]), beta=0.7),
        lambda a, b: losses.dpo_loss(a, b, beta=0.7, label_smoothing=0.1),
        lambda a, b: losses.soft_dpo_loss(a, b, jnp.array([0.3, 0.9]), beta=0.7),
        lambda a, b: losses.ipo_loss(a, b, beta=0.7),
        lambda a, b: losses.lpo_loss(
            jnp.stack([a, b, a * b], 1), jnp.array([[1.0, 4.0, 2.0], [3.0, 0.0, 3.0]]), jnp.ones((2, 3), bool), beta=0.7
        ),
        lambda a, b: losses.lpo_loss(
            jnp.stack([a, b], 1), jnp.array([[1.0, 4.0], [3.0, 0.0]]), jnp.ones((2, 2), bool),
            beta=0.7, variant="lpo_abs", abs_term="logsigmoid", weight_norm="sum",
        ),
        lambda a, b: losses.infonca_loss(jnp.stack([a, b], 1), jnp.array([[1.0, 4.0], [3.0, 0.0]]), jnp.ones((2, 2), bool), beta=0.7),
    ],
    ids=["irepo", "dpo", "soft_dpo", "ipo", "lpo", "lpo_abs", "infonca"],
)
def test_check_grads(fn):
    a, b = jnp.array([0.3, -0.2], jnp.float32), jnp.array([-0.1, 0.5], jnp.float32)
    check_grads(lambda x, y: fn(x, y).sum(), (a, b), order=2, modes=["rev", "fwd"], atol=1e-2, rtol=1e-2, eps=1e-3)


def test_lpo_linear_weight_hand_values():
    rho = jnp.array([[0.5, -0.2, 0.1]])
    s = jnp.array([[3.0, 1.0, 2.0]])
    mask = jnp.ones((1, 3), bool)
    lsig = lambda z: math.log(1 / (1 + math.exp(-z)))
    b = 0.5
    # pairs (0 > 1): |3-1| = 2, (0 > 2): 1, (2 > 1): 1
    want = -(2 * lsig(b * 0.7) + 1 * lsig(b * 0.4) + 1 * lsig(b * 0.3))
    got = losses.lpo_loss(rho, s, mask, beta=b, weight="linear")
    assert float(got[0]) == pytest.approx(want, rel=1e-6)
    with pytest.raises(ValueError, match="weight"):
        losses.lpo_loss(rho, s, mask, beta=b, weight="cubic")


def _lipo_lambda_loop(rho, s, mask, beta):
    """LiPO-lambda by a direct loop over the present responses' ordered pairs."""
    idx = [i for i in range(len(rho)) if mask[i]]
    z = {i: beta * rho[i] for i in idx}
    lo, hi = min(s[i] for i in idx), max(s[i] for i in idx)
    g = {i: 2 ** ((s[i] - lo) / (hi - lo) if hi > lo else 0.0) - 1 for i in idx}
    order = sorted(idx, key=lambda i: (-z[i], i))  # rank 1 = highest z, earlier index first on ties
    rank = {i: order.index(i) + 1 for i in idx}
    total = 0.0
    for i in idx:
        for j in idx:
            if s[i] > s[j]:
                delta = abs(g[i] - g[j]) * abs(1 / math.log2(1 + rank[i]) - 1 / math.log2(1 + rank[j]))
                total -= delta * math.log(1 / (1 + math.exp(-(z[i] - z[j]))))
    return total


@pytest.mark.parametrize("case", [
    ([0.3, -0.1, 0.8, 0.2], [7.0, 2.0, 5.0, 5.0], [1, 1, 1, 1]),   # a tie in the scores
    ([0.3, 0.3, -0.4, 9e9], [1.0, 4.0, 2.0, 0.0], [1, 1, 1, 0]),   # a tie in z; a masked response
    ([0.1, 0.2, 0.3, 0.4], [3.0, 3.0, 3.0, 3.0], [1, 1, 1, 1]),    # all tied: no pair
])
def test_lipo_lambda_matches_a_loop_over_pairs(case):
    rho, s, m = case
    got = losses.lipo_lambda_loss(jnp.array([rho]), jnp.array([s]), jnp.array([m], bool), beta=0.7)
    assert float(got[0]) == pytest.approx(_lipo_lambda_loop(rho, s, m, 0.7), rel=1e-5, abs=1e-7)


def test_lipo_lambda_gradient_holds_the_weights_constant():
    rho = jnp.array([[0.3, -0.1, 0.8]])
    s = jnp.array([[7.0, 2.0, 5.0]])
    mask = jnp.ones((1, 3), bool)
    beta = 0.7
    # the weights at this point, frozen: the gradient is that of a fixed-weight pairwise sum
    z = np.asarray(beta * rho[0])
    rank = 1 + np.array([(z > z[i]).sum() for i in range(3)])
    g = 2 ** ((np.asarray(s[0]) - 2.0) / 5.0) - 1
    inv = 1 / np.log2(1 + rank)
    w = np.array([[abs(g[i] - g[j]) * abs(inv[i] - inv[j]) if s[0, i] > s[0, j] else 0.0 for j in range(3)]
                  for i in range(3)])
    fixed = lambda r: -jnp.sum(w * jax.nn.log_sigmoid(beta * (r[:, :, None] - r[:, None, :]))[0])
    got = jax.grad(lambda r: losses.lipo_lambda_loss(r, s, mask, beta=beta).sum())(rho)
    np.testing.assert_allclose(got, jax.grad(fixed)(rho), rtol=1e-5)
    assert float(jnp.abs(got).sum()) > 0
