"""Sampler logic on a tiny stand-in NNX model implementing the models' KV-cache interface.

The stand-in (a 2-layer Llama with RoPE and GQA) keeps these tests independent of the model
ports; parity against transformers and the real ports lives in ``test_sampling_models.py``.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from repo_jax import sampling
from repo_jax.sharding import MeshConfig, make_mesh
from helpers import count_compiles

V = 64
CALLS: list[tuple[int, int]] = []  # (batch, T) of each traced forward_with_cache


@flax.struct.dataclass
class TinyCache:
    k_LxBxSxGxH: jax.Array
    v_LxBxSxGxH: jax.Array
    pos_BxS: jax.Array

    def repeat(self, k):
        return TinyCache(*(jnp.repeat(x, k, axis=a) for x, a in zip(jax.tree.leaves(self), (1, 1, 0))))

    def take(self, rows_B):
        return TinyCache(*(jnp.take(x, rows_B, axis=a) for x, a in zip(jax.tree.leaves(self), (1, 1, 0))))

    def put(self, rows_B, other):
        put = lambda x, y, a: x.at[(slice(None),) * a + (rows_B,)].set(y)
        return TinyCache(*(put(x, y, a) for x, y, a in zip(jax.tree.leaves(self), jax.tree.leaves(other), (1, 1, 0))))


def _rope(x_BxTxNxH, pos_BxT):
    h = x_BxTxNxH.shape[-1]
    freq_H2 = 1.0 / (10000.0 ** (jnp.arange(0, h, 2) / h))
    ang_BxTxH2 = pos_BxT[..., None].astype(jnp.float32) * freq_H2
    sin, cos = jnp.sin(ang_BxTxH2)[:, :, None], jnp.cos(ang_BxTxH2)[:, :, None]
    x1, x2 = jnp.split(x_BxTxNxH, 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


class TinyLM(nnx.Module):
    """Stand-in with the ports' contract: ``__call__``, ``init_cache``, ``forward_with_cache``."""

    def __init__(self, *, vocab=V, d=32, n=4, g=2, h=8, layers=2, seed=0):
        r = nnx.Rngs(seed)
        init = nnx.initializers.normal(0.5)
        self.n, self.g, self.h, self.layers = n, g, h, layers
        self.embed = nnx.Param(init(r.params(), (vocab, d)), eager_sharding=False, out_sharding=("vocab", "embed"))
        self.wq = nnx.Param(init(r.params(), (layers, d, n, h)) / d**0.5, eager_sharding=False, out_sharding=("layers", "embed", "q_heads", "head_dim"))
        self.wk = nnx.Param(init(r.params(), (layers, d, g, h)) / d**0.5, eager_sharding=False, out_sharding=("layers", "embed", "kv_heads", "head_dim"))
        self.wv = nnx.Param(init(r.params(), (layers, d, g, h)) / d**0.5, eager_sharding=False, out_sharding=("layers", "embed", "kv_heads", "head_dim"))
        self.wo = nnx.Param(init(r.params(), (layers, n, h, d)) / d**0.5, eager_sharding=False, out_sharding=("layers", "q_heads", "head_dim", "embed"))
        self.w1 = nnx.Param(init(r.params(), (layers, d, 2 * d)) / d**0.5, eager_sharding=False, out_sharding=("layers", "embed", "mlp"))
        self.w2 = nnx.Param(init(r.params(), (layers, 2 * d, d)) / d**0.5, eager_sharding=False, out_sharding=("layers", "mlp", "embed"))
        self.head = nnx.Param(init(r.params(), (d, vocab)) * 4, eager_sharding=False, out_sharding=("embed", "vocab"))

    def init_cache(self, batch_size, max_len, dtype=None):
        shape = (self.layers, batch_size, max_len, self.g, self.h)
        return TinyCache(
            jnp.zeros(shape, dtype or jnp.float32),
            jnp.zeros(shape, dtype or jnp.float32),
            jnp.full((batch_size, max_len), -1, jnp.int32),
        )

    def __call__(self, input_ids_BxT, positions_BxT=None, attention_mask_BxT=None):
        b, t = input_ids_BxT.shape
        if attention_mask_BxT is None:
            attention_mask_BxT = jnp.ones((b, t), jnp.int32)
        if positions_BxT is None:
            positions_BxT = jnp.maximum(jnp.cumsum(attention_mask_BxT, axis=1) - 1, 0)
        cache = self.init_cache(b, t)
        return self.forward_with_cache(input_ids_BxT, positions_BxT, attention_mask_BxT, cache, jnp.int32(0))[0]

    def forward_with_cache(self, input_ids_BxT, positions_BxT, attention_mask_BxT, cache, index, *, last_only=False):
        CALLS.append(tuple(input_ids_BxT.shape))
        b, t = input_ids_BxT.shape
        x_BxTxD = self.embed[...][input_ids_BxT]
        pos_new_BxT = jnp.where(attention_mask_BxT > 0, positions_BxT, -1).astype(jnp.int32)
        pos_BxS = jax.lax.dynamic_update_slice(cache.pos_BxS, pos_new_BxT, (0, index))
        allowed_BxTxS = (pos_BxS[:, None, :] >= 0) & (pos_BxS[:, None, :] <= positions_BxT[:, :, None])
        k_all, v_all = cache.k_LxBxSxGxH, cache.v_LxBxSxGxH
        for l in range(self.layers):
            hn = x_BxTxD / jnp.sqrt(jnp.mean(x_BxTxD**2, -1, keepdims=True) + 1e-6)
            q = _rope(jnp.einsum("BTD,DNH->BTNH", hn, self.wq[l]), positions_BxT)
            k = _rope(jnp.einsum("BTD,DGH->BTGH", hn, self.wk[l]), positions_BxT)
            v = jnp.einsum("BTD,DGH->BTGH", hn, self.wv[l])
            k_all = jax.lax.dynamic_update_slice(k_all, k[None].astype(k_all.dtype), (l, 0, index, 0, 0))
            v_all = jax.lax.dynamic_update_slice(v_all, v[None].astype(v_all.dtype), (l, 0, index, 0, 0))
            q = q.reshape(b, t, self.g, self.n // self.g, self.h)
            s = jnp.einsum("BTGQH,BSGH->BGQTS", q, k_all[l]) / self.h**0.5
            s = jnp.where(allowed_BxTxS[:, None, None], s, -1e30)
            o = jnp.einsum("BGQTS,BSGH->BTGQH", jax.nn.softmax(s, -1), v_all[l]).reshape(b, t, self.n, self.h)
            x_BxTxD = x_BxTxD + jnp.einsum("BTNH,NHD->BTD", o, self.wo[l])
            hn = x_BxTxD / jnp.sqrt(jnp.mean(x_BxTxD**2, -1, keepdims=True) + 1e-6)
            x_BxTxD = x_BxTxD + jax.nn.gelu(hn @ self.w1[l]) @ self.w2[l]
        x_BxTxD = x_BxTxD[:, -1:] if last_only else x_BxTxD
        logits = jnp.einsum("BTD,DV->BTV", x_BxTxD, self.head[...]).astype(jnp.float32)
        return logits, TinyCache(k_all, v_all, pos_BxS)


@pytest.fixture(scope="module")
def model():
    return TinyLM()


PROMPTS = [[5, 9, 2, 33, 17], [1, 2], [7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 3]]


@nnx.jit
def _forward(model, ids_BxT):
    return model(ids_BxT)


def _greedy_reference(model, prompt, n):
    """Greedy decoding by re-running the full (causal) forward on the growing sequence."""
    seq = np.zeros((1, len(prompt) + n), np.int32)  # right-padded: causal, so padding is unseen
    seq[0, : len(prompt)] = prompt
    for i in range(len(prompt), len(prompt) + n):
        seq[0, i] = int(jnp.argmax(_forward(model, jnp.asarray(seq))[0, i - 1]))
    return seq[0, len(prompt) :].tolist()


def test_greedy_matches_full_forward_and_logps(model):
    out = sampling.sample(model, [PROMPTS[0]], max_new_tokens=12)
    toks = out.tokens_BxS[0].tolist()
    assert toks == _greedy_reference(model, PROMPTS[0], 12)
    # cached per-token log-probs equal a full forward on the concatenated sequence
    seq = jnp.asarray([PROMPTS[0] + toks], jnp.int32)
    logp = jax.nn.log_softmax(_forward(model, seq)[0], -1)
    p = len(PROMPTS[0])
    ref = np.array([logp[p - 1 + i, t] for i, t in enumerate(toks)])
    np.testing.assert_allclose(out.logps_BxS[0], ref, atol=1e-5)
    assert (out.sample_logps_BxS == 0).all() and out.lengths_B.tolist() == [12]


def test_mixed_length_batch_equals_each_alone(model):
    batch = sampling.generate(model, PROMPTS, max_new_tokens=10)
    alone = [sampling.generate(model, [p], max_new_tokens=10)[0] for p in PROMPTS]
    assert batch == alone


def test_eos_stops_rows_and_loop(model):
    free = sampling.generate(model, PROMPTS, max_new_tokens=16)
    first = next(i for i, t in enumerate(free[0]) if i >= 2 and t not in free[0][:i])
    eos = free[0][first]  # a token prompt 0 first emits at step `first` >= 2
    out = sampling.sample(model, PROMPTS, max_new_tokens=16, eos_id=[eos, 10_000], pad_id=-1)
    for row, logps, n, ref in zip(out.tokens_BxS, out.logps_BxS, out.lengths_B, free):
        cut = ref.index(eos) + 1 if eos in ref else len(ref)
        assert n == cut and row[:n].tolist() == ref[:cut] and (row[n:] == -1).all()
        assert (logps[n:] == 0).all() and (logps[:n] < 0).all()
    # all rows stop at their eos: the loop stops once the longest row is done
    assert out.num_steps == max(out.lengths_B) - 1
    alone = sampling.sample(model, [PROMPTS[0]], max_new_tokens=16, eos_id=eos)
    assert alone.num_steps == first and alone.lengths_B.tolist() == [first + 1]
    assert sampling.generate(model, [PROMPTS[0]], max_new_tokens=16, eos_id=eos) == [free[0][: first + 1]]


def test_filter_logits_top_p_known_distribution():
    probs = jnp.asarray([[0.05, 0.4, 0.1, 0.3, 0.15]])
    logits = jnp.log(probs)
    kept = lambda p: np.isfinite(np.asarray(sampling.filter_logits(logits, top_p=p)))[0].tolist()
    assert kept(0.4) == [False, True, False, False, False]  # 0.4 reaches 0.4
    assert kept(0.5) == [False, True, False, True, False]  # 0.4 < 0.5 <= 0.7
    assert kept(0.7) == [False, True, False, True, False]
    assert kept(0.71) == [False, True, False, True, True]
    assert kept(0.99) == [True, True, True, True, True]
    assert kept(0.01) == [False, True, False, False, False]
    topk = np.isfinite(np.asarray(sampling.filter_logits(logits, top_k=2)))[0].tolist()
    assert topk == [False, True, False, True, False]


def test_top_k_1_is_greedy_and_seeds(model):
    greedy = sampling.generate(model, PROMPTS, max_new_tokens=8)
    assert sampling.generate(model, PROMPTS, max_new_tokens=8, temperature=1.0, top_k=1, seed=3) == greedy
    a = sampling.sample(model, PROMPTS, max_new_tokens=8, temperature=1.0, seed=1)
    b = sampling.sample(model, PROMPTS, max_new_tokens=8, temperature=1.0, seed=1)
    c = sampling.sample(model, PROMPTS, max_new_tokens=8, temperature=1.0, seed=2)
    np.testing.assert_array_equal(a.tokens_BxS, b.tokens_BxS)
    assert (a.tokens_BxS != c.tokens_BxS).any()
    # temperature 1 without filtering samples from the model itself
    np.testing.assert_allclose(a.sample_logps_BxS, a.logps_BxS, atol=1e-5)
    t = sampling.sample(model, PROMPTS, max_new_tokens=8, temperature=1.0, top_p=0.9, top_k=20, seed=1)
    # filtering renormalises over fewer tokens: a sampled token is at least as likely as before
    assert (t.sample_logps_BxS <= 1e-6).all() and (t.sample_logps_BxS >= t.logps_BxS - 1e-5).all()


def test_num_samples_prefills_once(model):
    CALLS.clear()
    out = sampling.sample(model, PROMPTS[:2], max_new_tokens=6, temperature=1.0, num_samples=3, seed=0)
    prefill = [c for c in CALLS if c[1] > 1]
    decode = [c for c in CALLS if c[1] == 1]
    assert prefill == [(2, 8)] and decode == [(6, 1)]  # B=2 prompts prefilled once; 6 rows decode
    assert out.tokens_BxS.shape == (6, 6) and out.prompt_index_B.tolist() == [0, 0, 0, 1, 1, 1]
    assert len({tuple(r) for r in out.tokens_BxS[:3].tolist()}) > 1  # the samples differ
    # every row continues its own prompt: its model log-probs match a full forward
    for r in range(6):
        prompt = PROMPTS[out.prompt_index_B[r]]
        seq = jnp.asarray([prompt + out.tokens_BxS[r].tolist()], jnp.int32)
        logp = jax.nn.log_softmax(_forward(model, seq)[0], -1)
        ref = [logp[len(prompt) - 1 + i, t] for i, t in enumerate(out.tokens_BxS[r])]
        np.testing.assert_allclose(out.logps_BxS[r], ref, atol=1e-5)


def test_buckets_limit_compiles(model):
    sampling.clear_cache()
    with count_compiles("_generate_program") as compiles:
        for n_prompts in (1, 2, 3, 4):
            for plen in (3, 5, 7):
                sampling.generate(model, [[1] * plen] * n_prompts, max_new_tokens=5)
        sampling.generate(model, [[2, 3]], max_new_tokens=7)
    # batch buckets {1, 2, 4} x prompt bucket {8} x new-token bucket {8}
    assert compiles["n"] == 3
    assert sampling.bucket(5) == 8 and sampling.bucket(1) == 1 and sampling.bucket(3, [4, 16]) == 4


def test_sharded_matches_single_device(model):
    if len(jax.devices()) < 8:
        pytest.skip("needs 8 devices")
    single = sampling.sample(model, PROMPTS, max_new_tokens=10)
    mesh = jax.make_mesh((4, 1, 2), ("data", "fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 3)
    sharded = sampling.sample(model, PROMPTS, max_new_tokens=10, mesh=mesh)
    np.testing.assert_array_equal(single.tokens_BxS, sharded.tokens_BxS)
    np.testing.assert_allclose(single.logps_BxS, sharded.logps_BxS, atol=1e-5)
    # parameters were laid out by their logical names (sampling layout: tensor-sharded heads)
    shardings = sampling.param_shardings(nnx.state(model), mesh)
    assert shardings["wq"].spec == jax.P(None, None, "tensor", None)


MIXED = [[5, 9, 2, 33, 17], [1, 2], [7, 8, 9, 10, 11, 12, 3], [4], [60, 61, 62]]


@pytest.mark.parametrize(
    "n_prompts,num_samples,batch_buckets", [(2, 4, None), (1, 8, None), (3, 2, None), (5, 1, (5,))],
    ids=["2x4", "1x8", "3x2", "5x1"],
)
def test_any_rows_fit_the_batch_axes(model, n_prompts, num_samples, batch_buckets):
    """Prompt rows that do not divide over the batch axes (4 and 8 devices) still give one
    device's tokens. 2x4 and 1x8 prefill each prompt 2 or 4 (4 or 8) times; 3x2 prefills its 4
    slots (one filler) once (twice); 5x1 grows its bucket of 5 by 3 filler slots on both meshes."""
    if len(jax.devices()) < 8:
        pytest.skip("needs 8 devices")
    kw = dict(max_new_tokens=6, num_samples=num_samples, temperature=0.8, top_p=0.9, seed=7, eos_id=[3, 20],
              batch_buckets=batch_buckets)
    one = sampling.sample(model, MIXED[:n_prompts], **kw)
    assert len(set(one.lengths_B.tolist())) > 1  # some rows stop early
    for cfg in (MeshConfig(data=2, fsdp=2, tensor=2), MeshConfig(data=2, fsdp=4, tensor=1)):
        many = sampling.sample(model, MIXED[:n_prompts], **kw, mesh=make_mesh(cfg, jax.devices()[:8]))
        np.testing.assert_array_equal(one.tokens_BxS, many.tokens_BxS)
        np.testing.assert_array_equal(one.lengths_B, many.lengths_B)
        np.testing.assert_allclose(one.logps_BxS, many.logps_BxS, atol=1e-5)
        np.testing.assert_allclose(one.sample_logps_BxS, many.sample_logps_BxS, atol=1e-5)


def test_explicit_mesh_is_refused(model):
    mesh = jax.make_mesh((1, 1, 1), ("data", "fsdp", "tensor"))  # Explicit axes, JAX's default
    with pytest.raises(ValueError, match="sampling needs a mesh with Auto axis types"):
        sampling.sample(model, PROMPTS, max_new_tokens=4, mesh=mesh)


@pytest.mark.parametrize("mesh_data", [None, 8])
def test_compacting_finished_rows_keeps_every_token(model, mesh_data):
    """64 rows of which most stop early: the decode batch halves (64 -> 32 -> 16) as rows finish,
    on one device and with the rows over 8 devices, and every row's tokens, lengths and log-probs
    are those of the uncompacted call."""
    if mesh_data and len(jax.devices()) < 8:
        pytest.skip("needs 8 devices")
    mesh = None if not mesh_data else make_mesh(MeshConfig(data=mesh_data, fsdp=1, tensor=1), jax.devices()[:8])
    assert sampling._stage_rows(64, 8, min_rows=16, max_compactions=3) == (64, 32, 16)
    kw = dict(max_new_tokens=24, num_samples=8, temperature=1.0, seed=5, eos_id=[3, 20, 40, 41, 42], mesh=mesh)
    CALLS.clear()
    full = sampling.sample(model, MIXED[:4] + MIXED[:4], max_compactions=0, **kw)
    assert {c[0] for c in CALLS if c[1] == 1} == {64}
    CALLS.clear()
    packed = sampling.sample(model, MIXED[:4] + MIXED[:4], **kw)
    assert {c[0] for c in CALLS if c[1] == 1} == {64, 32, 16}  # one decode body per stage size
    lengths = np.sort(full.lengths_B)
    assert lengths[32] < 24 and lengths[-1] == 24  # half the rows end early, some run to the end
    np.testing.assert_array_equal(full.tokens_BxS, packed.tokens_BxS)
    np.testing.assert_array_equal(full.lengths_B, packed.lengths_B)
    np.testing.assert_allclose(full.logps_BxS, packed.logps_BxS, atol=1e-5)
    np.testing.assert_allclose(full.sample_logps_BxS, packed.sample_logps_BxS, atol=1e-5)


def test_nucleus_past_the_candidates_same_tokens_on_a_mesh(model, monkeypatch):
    """With 4 candidates per row most nuclei of the tiny model reach past them: rows take the
    exact path (alone, on a gathered subset or all together, as the step's rows demand), and one
    device and 8 devices still give the same tokens."""
    if len(jax.devices()) < 8:
        pytest.skip("needs 8 devices")
    from repo_jax.sampling import policies as sampling_policies

    monkeypatch.setattr(sampling_policies, "CANDIDATES", 4)
    sampling.clear_cache()
    kw = dict(max_new_tokens=8, num_samples=4, temperature=1.0, top_p=0.9, seed=11, eos_id=[3])
    try:
        one = sampling.sample(model, MIXED, **kw)
        many = sampling.sample(model, MIXED, **kw, mesh=make_mesh(MeshConfig(data=4, fsdp=2, tensor=1), jax.devices()[:8]))
    finally:
        sampling.clear_cache()
    np.testing.assert_array_equal(one.tokens_BxS, many.tokens_BxS)
    np.testing.assert_allclose(one.sample_logps_BxS, many.sample_logps_BxS, atol=1e-5)
    assert (one.sample_logps_BxS <= 1e-6).all() and (one.sample_logps_BxS >= one.logps_BxS - 1e-5).all()


@pytest.mark.parametrize("mesh_cfg,group", [(None, None), (None, 3), (MeshConfig(data=2, fsdp=4, tensor=1), None)],
                         ids=["one-device", "group-3", "fsdp4-data2"])
def test_refilled_slots_give_the_tokens_of_one_batch(model, mesh_cfg, group):
    """12 prompts of mixed lengths x 4 samples through 16 decode slots: rows that stop early (eos)
    free their slots, queued prompts are prefilled into them, and every (prompt, sample) gets the
    tokens, lengths and log-probs of the call that decodes all 48 rows at once (one device)."""
    if mesh_cfg and len(jax.devices()) < 8:
        pytest.skip("needs 8 devices")
    mesh = None if mesh_cfg is None else make_mesh(mesh_cfg, jax.devices()[:8])
    prompts = [MIXED[i % 5][: 1 + (i * 7) % 6] + [i + 1] for i in range(12)]
    kw = dict(max_new_tokens=12, num_samples=4, temperature=0.8, top_p=0.9, seed=5, eos_id=[3, 20, 40, 41])
    whole = sampling.sample(model, prompts, **kw)
    CALLS.clear()
    refilled = sampling.sample(model, prompts, slots=16, prefill_group=group, mesh=mesh, **kw)
    assert {c[0] for c in CALLS if c[1] == 1} <= {16, 8}  # decode batches: the slots (then compactions)
    assert len({c[0] for c in CALLS if c[1] > 1}) == 1 and max(c[0] for c in CALLS if c[1] > 1) < 12
    assert (whole.lengths_B < 12).sum() > 8 and (whole.lengths_B == 12).any()  # rows end at mixed steps
    np.testing.assert_array_equal(whole.tokens_BxS, refilled.tokens_BxS)
    np.testing.assert_array_equal(whole.lengths_B, refilled.lengths_B)
    np.testing.assert_array_equal(whole.prompt_index_B, refilled.prompt_index_B)
    np.testing.assert_allclose(whole.logps_BxS, refilled.logps_BxS, atol=1e-5)
    np.testing.assert_allclose(whole.sample_logps_BxS, refilled.sample_logps_BxS, atol=1e-5)
    assert refilled.num_steps > max(whole.lengths_B) - 1  # the 16 slots took more steps than one batch


def test_waves_with_row_offsets_give_the_tokens_of_one_call(model):
    """A round sampled in 3 waves (prompts [a, b) with row_offset a x K, as the loop does while
    its served judges work) draws the tokens of one call on every prompt; without the offset
    the waves would repeat the first rows' random keys."""
    prompts = [MIXED[i % 5][: 1 + (i * 7) % 6] + [i + 1] for i in range(10)]
    kw = dict(max_new_tokens=10, num_samples=3, temperature=0.9, seed=11, eos_id=[3, 20], slots=12)
    whole = sampling.sample(model, prompts, **kw)
    parts = [sampling.sample(model, prompts[a:b], row_offset=a * 3, **kw) for a, b in ((0, 3), (3, 7), (7, 10))]
    np.testing.assert_array_equal(np.concatenate([p.tokens_BxS for p in parts]), whole.tokens_BxS)
    np.testing.assert_array_equal(np.concatenate([p.lengths_B for p in parts]), whole.lengths_B)
    np.testing.assert_allclose(np.concatenate([p.logps_BxS for p in parts]), whole.logps_BxS, atol=1e-5)
    plain = sampling.sample(model, prompts[3:7], **kw)  # no offset: other tokens
    assert not np.array_equal(plain.tokens_BxS, whole.tokens_BxS[9:21])


def test_refilled_greedy_rows_equal_each_alone(model):
    """Greedy with refill: every prompt's answer is the one it gets alone."""
    prompts = [MIXED[i % 5] + [i + 1] for i in range(7)]
    refilled = sampling.generate(model, prompts, max_new_tokens=10, eos_id=[3, 20], slots=2, prefill_group=1)
    assert refilled == [sampling.generate(model, [p], max_new_tokens=10, eos_id=[3, 20])[0] for p in prompts]


def test_shared_prefix_is_prefilled_once(model):
    """Prompts with a common 10-token head (a chat template's system turn): the head is prefilled
    once (a batch-1 forward) and each prompt's rest after it; tokens and log-probs as without."""
    head = [7, 8, 9, 10, 11, 12, 13, 14, 15, 16]
    prompts = [head + MIXED[i % 5][: 1 + i % 3] for i in range(6)]
    kw = dict(max_new_tokens=10, num_samples=2, temperature=0.8, seed=2, eos_id=[3, 20])
    plain = sampling.sample(model, prompts, share_prefix=False, **kw)
    CALLS.clear()
    shared = sampling.sample(model, prompts, **kw)
    assert sorted(c for c in CALLS if c[1] > 1) == [(1, 12), (8, 8)]  # head (bucket 12), then the rests
    refilled = sampling.sample(model, prompts, slots=4, prefill_group=1, **kw)
    outs = [shared, refilled]
    if len(jax.devices()) >= 8:  # the head's rows over the mesh too
        mesh = make_mesh(MeshConfig(data=2, fsdp=4, tensor=1), jax.devices()[:8])
        outs.append(sampling.sample(model, prompts, slots=8, mesh=mesh, **kw))
    for out in outs:
        np.testing.assert_array_equal(plain.tokens_BxS, out.tokens_BxS)
        np.testing.assert_array_equal(plain.lengths_B, out.lengths_B)
        np.testing.assert_allclose(plain.logps_BxS, out.logps_BxS, atol=1e-5)
    assert sampling._common_prefix([head + [1], head[:9]]) == 8 and sampling._common_prefix([[1] * 5, [1] * 5]) == 0


def test_a_temperature_per_prompt_gives_each_row_its_policy(model):
    """Greedy prompts and sampled ones in one refilled call (an evaluation's answers and KL
    samples): each greedy row is the greedy call's, each sampled row the uniform-temperature
    call's (same rows, same keys); 0.5 has an exact reciprocal, so the logits scale alike."""
    prompts = [MIXED[i % 5][: 2 + i % 4] + [i + 1] for i in range(8)]
    temps = [0.0 if i % 3 else 0.5 for i in range(8)]
    kw = dict(max_new_tokens=10, eos_id=[3, 20], seed=4, slots=4, prefill_group=1)
    mixed = sampling.sample(model, prompts, temperature=temps, **kw)
    greedy = sampling.sample(model, prompts, temperature=0.0, **kw)
    hot = sampling.sample(model, prompts, temperature=0.5, **kw)
    assert not (greedy.tokens_BxS == hot.tokens_BxS).all()  # the two policies differ on these prompts
    for i, t in enumerate(temps):
        want = hot if t else greedy
        np.testing.assert_array_equal(mixed.tokens_BxS[i], want.tokens_BxS[i], err_msg=f"prompt {i}")
        np.testing.assert_allclose(mixed.logps_BxS[i], want.logps_BxS[i], atol=1e-5)
        np.testing.assert_allclose(mixed.sample_logps_BxS[i], want.sample_logps_BxS[i], atol=1e-5)
    with pytest.raises(ValueError, match="one value >= 0 per prompt"):
        sampling.sample(model, prompts, temperature=[0.5], max_new_tokens=4)
