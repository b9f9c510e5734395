"""Chunked sequence log-probs equal the naive ones, values and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from repo_jax import logprobs
from repo_jax.benchmarks.logprobs import sequence_logprobs_naive

B, T, D, V = 3, 10, 16, 37


def _inputs(seed=0, with_bias=True, dtype=jnp.float32):
    k = jax.random.split(jax.random.key(seed), 4)
    h = jax.random.normal(k[0], (B, T, D), dtype)
    w = (jax.random.normal(k[1], (D, V)) / np.sqrt(D)).astype(dtype)
    b = jax.random.normal(k[2], (V,), dtype) if with_bias else None
    targets = jax.random.randint(k[3], (B, T), 0, V)
    # prompt mask (first tokens not response) and right padding (last tokens absent)
    pos = jnp.arange(T)[None, :]
    prompt_len = jnp.array([[2], [4], [0]])
    length = jnp.array([[10], [7], [5]])
    mask = (pos >= prompt_len) & (pos < length)
    return h, w, b, targets, mask


@pytest.mark.parametrize("chunk", [1, 2, 3, 4, 5, 10, 64])
@pytest.mark.parametrize("with_bias", [True, False])
def test_values_and_gradients_match_naive(chunk, with_bias):
    h, w, b, targets, mask = _inputs(with_bias=with_bias)
    cot = jnp.array([0.7, -1.3, 2.0])  # a non-trivial cotangent per sequence

    def loss(fn, h, w, b):
        return jnp.dot(fn(h, w, targets, mask, b), cot)

    chunked = lambda h, w, t, m, b: logprobs.sequence_logprobs(h, w, t, m, b, chunk_size=chunk)
    got, got_g = jax.value_and_grad(lambda *a: loss(chunked, *a), argnums=(0, 1, 2) if with_bias else (0, 1))(h, w, b)
    want, want_g = jax.value_and_grad(
        lambda *a: loss(sequence_logprobs_naive, *a), argnums=(0, 1, 2) if with_bias else (0, 1)
    )(h, w, b)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(
        chunked(h, w, targets, mask, b), sequence_logprobs_naive(h, w, targets, mask, b), atol=1e-5, rtol=1e-6
    )
    for g1, g2 in zip(got_g, want_g):
        np.testing.assert_allclose(g1, g2, atol=1e-5, rtol=1e-5)


def test_masked_positions_have_zero_hidden_gradient():
    h, w, b, targets, mask = _inputs()
    g = jax.grad(lambda h: logprobs.sequence_logprobs(h, w, targets, mask, b, chunk_size=3).sum())(h)
    assert np.all(np.asarray(g)[~np.asarray(mask)] == 0)


def test_token_logprobs_are_log_probabilities():
    h, w, b, targets, _ = _inputs()
    tok = logprobs.token_logprobs(h, w, targets, b, chunk_size=4)
    assert tok.shape == (B, T) and tok.dtype == jnp.float32
    all_v = jnp.stack([logprobs.token_logprobs(h, w, jnp.full((B, T), v), b, chunk_size=4) for v in range(V)], -1)
    np.testing.assert_allclose(jnp.exp(all_v).sum(-1), 1.0, rtol=1e-5)


def test_jit_and_bfloat16_inputs():
    h, w, b, targets, mask = _inputs(dtype=jnp.bfloat16)
    f = jax.jit(jax.value_and_grad(lambda h, w: logprobs.sequence_logprobs(h, w, targets, mask, b, chunk_size=4).sum(), (0, 1)))
    val, (gh, gw) = f(h, w)
    assert gh.dtype == jnp.bfloat16 and gw.dtype == jnp.bfloat16 and val.dtype == jnp.float32
    ref = sequence_logprobs_naive(h.astype(jnp.float32), w.astype(jnp.float32), targets, mask, b.astype(jnp.float32))
    np.testing.assert_allclose(val, ref.sum(), rtol=2e-2)


def test_chunked_peak_memory_is_smaller():
    # compiled temporary memory of the chunked fwd+bwd stays well below the naive one
    b, t, d, v = 2, 256, 32, 4096
    args = (
        jax.ShapeDtypeStruct((b, t, d), jnp.float32),
        jax.ShapeDtypeStruct((d, v), jnp.float32),
        jax.ShapeDtypeStruct((b, t), jnp.int32),
        jax.ShapeDtypeStruct((b, t), jnp.bool_),
    )

    def grad_of(fn):
        return jax.jit(jax.grad(lambda h, w, tg, m: fn(h, w, tg, m).sum(), argnums=(0, 1)))

    chunked = grad_of(lambda *a: logprobs.sequence_logprobs(*a, chunk_size=16)).lower(*args).compile()
    naive = grad_of(sequence_logprobs_naive).lower(*args).compile()
    mem_c = chunked.memory_analysis().temp_size_in_bytes
    mem_n = naive.memory_analysis().temp_size_in_bytes
    assert mem_c * 4 < mem_n, (mem_c, mem_n)


def test_forward_logsumexp_is_stable_and_exact():
    r = np.random.default_rng(0)
    logits = jnp.asarray(r.standard_normal((2, 3, 5000)) * 300.0 + 1e4, jnp.float32)  # exp would overflow unshifted
    np.testing.assert_allclose(logprobs.logsumexp(logits), jax.nn.logsumexp(logits, axis=-1), rtol=1e-6)
    masked = logits.at[:, :, ::2].set(-jnp.inf)  # filtered (top-k / top-p) rows
    np.testing.assert_allclose(logprobs.logsumexp(masked), jax.nn.logsumexp(masked, axis=-1), rtol=1e-6)
