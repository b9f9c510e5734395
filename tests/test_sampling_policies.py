"""The token choice: exact distributions, the candidates fast path against the full exact path,
and each row's token independent of the rows beside it (what mesh/one-device equality needs)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from repo_jax.sampling import policies as sp

V = 300


def _peaked(rng, b):  # a few likely tokens: top-p 0.9 lies inside the 64 candidates
    x = rng.normal(size=(b, V)).astype(np.float32)
    x[:, :5] += np.array([6.0, 5.5, 5.0, 4.0, 3.0], np.float32)
    return x


def _flat(rng, b):  # near-uniform: the nucleus holds ~270 of 300 tokens, past the candidates
    return (0.05 * rng.normal(size=(b, V))).astype(np.float32)


def _draw(logits_BxV, policy, seed=0, live_B=None):
    keys = jax.random.split(jax.random.key(seed), logits_BxV.shape[0])
    f = jax.jit(lambda x, k, l: sp.choose_tokens(x, k, policy, l))
    live = jnp.ones(logits_BxV.shape[0], bool) if live_B is None else live_B
    return [np.asarray(a) for a in f(jnp.asarray(logits_BxV), keys, live)]


def _target(row_V, policy):
    """The distribution sampling must follow: temperature, then transformers' top-k / top-p."""
    z = jnp.asarray(row_V)[None] / policy.temperature
    return np.asarray(jax.nn.softmax(sp.filter_logits(z, top_k=policy.top_k, top_p=policy.top_p), -1))[0]


@pytest.mark.parametrize("kind", ["peaked", "flat"])
@pytest.mark.parametrize("policy", [sp.SamplingPolicy(0.7), sp.SamplingPolicy(1.0, top_p=0.9),
                                    sp.SamplingPolicy(0.8, top_k=40, top_p=0.95), sp.SamplingPolicy(1.0, top_k=100)])
def test_draws_follow_the_filtered_distribution(kind, policy):
    rng = np.random.default_rng(0)
    row = (_peaked if kind == "peaked" else _flat)(rng, 1)[0]
    n = 40_000
    token, model_lp, sample_lp = _draw(np.repeat(row[None], n, 0), policy)
    p = _target(row, policy)
    freq = np.bincount(token, minlength=V) / n
    assert (freq[p == 0] == 0).all()  # nothing outside the kept set
    assert np.all(np.abs(freq - p) <= 5 * np.sqrt(p * (1 - p) / n) + 2e-4)
    np.testing.assert_allclose(sample_lp, np.log(p[token]), atol=2e-5)
    np.testing.assert_allclose(model_lp, np.asarray(jax.nn.log_softmax(row))[token], atol=2e-5)


def test_each_rows_token_ignores_its_neighbours():
    """A row gets the same token from the candidates, the gathered subset and the all-rows exact
    path: what it draws depends on its own logits and key only."""
    rng = np.random.default_rng(1)
    policy = sp.SamplingPolicy(1.0, top_p=0.9)
    flat, peaked = _flat(rng, 64), _peaked(rng, 64)
    keys = jax.random.split(jax.random.key(3), 64)
    run = jax.jit(lambda x, k: sp.choose_tokens(x, k, policy, jnp.ones(x.shape[0], bool))[:2])
    all_flat = run(jnp.asarray(flat), keys)  # 64 rows need the exact path: every row
    mixed = np.where((np.arange(64) % 16 == 0)[:, None], flat, peaked)  # 4 rows: the subset
    some_flat = run(jnp.asarray(mixed), keys)
    sel = np.arange(64) % 16 == 0
    for a, b in zip(all_flat, some_flat):
        np.testing.assert_allclose(np.asarray(a)[sel], np.asarray(b)[sel], atol=1e-6)
    all_peaked = run(jnp.asarray(peaked), keys)  # no row needs it: the candidates alone
    for a, b in zip(all_peaked, some_flat):
        np.testing.assert_allclose(np.asarray(a)[~sel], np.asarray(b)[~sel], atol=1e-6)
    alone = run(jnp.asarray(flat[16:17]), keys[16:17])
    np.testing.assert_allclose(np.asarray(alone[0])[0], np.asarray(all_flat[0])[16])


def test_finished_rows_leave_live_rows_alone():
    rng = np.random.default_rng(2)
    policy = sp.SamplingPolicy(1.0, top_p=0.9)
    x = jnp.asarray(_flat(rng, 8))
    jaxpr = str(jax.make_jaxpr(lambda x, k, l: sp.choose_tokens(x, k, policy, l))(
        x, jax.random.split(jax.random.key(0), 8), jnp.zeros(8, bool)))
    assert "cond" in jaxpr  # the exact path sits behind a branch
    live = np.array([1, 0, 0, 0, 0, 0, 0, 0], bool)
    tok, _, lp = _draw(np.asarray(x), policy, live_B=jnp.asarray(live))
    ref_tok, _, ref_lp = _draw(np.asarray(x), policy)
    assert tok[0] == ref_tok[0] and np.isclose(lp[0], ref_lp[0])


def test_greedy_argmax_first_of_ties():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(16, 1000)).astype(np.float32)
    x[3, [10, 700]] = 50.0  # a tie across blocks: the first index wins, as jnp.argmax
    x[4, [300, 301]] = 50.0  # a tie inside one block
    x[5, 999] = 50.0  # in the padded last block
    np.testing.assert_array_equal(np.asarray(sp._argmax(jnp.asarray(x))), np.argmax(x, -1))
    token, _, sample_lp = _draw(x, sp.SamplingPolicy(0.0))
    np.testing.assert_array_equal(token, np.argmax(x, -1))
    assert (sample_lp == 0).all()
