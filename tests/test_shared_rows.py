"""Shared-prefix rows (``train.layout: shared``) against one row per response (``rows``): the
same per-response log-probs, losses and gradients, on every architecture here (Mistral with a
sliding window shorter than the row and GQA, Phi with partial rotary and qk-layernorm, the real
SmolLM2), with ragged lists, padding examples, left padding, and on 8 devices as on 1."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from repo_jax import logprobs, models
from repo_jax import sharding as shd
from repo_jax.data.tokenize import collate_responses, collate_shared
from repo_jax.training import batch as bt
from repo_jax.training import objectives
from repo_jax.training import step as sp
from helpers import tiny_config

V = 64


def _items(seed, n, k, *, vocab=V, ragged=True, max_prompt=9, max_response=7):
    """``n`` examples with prompts of 1..max_prompt tokens and K responses of 1..max_response
    (a ragged list every third example), as the loop's train items."""
    r = np.random.default_rng(seed)
    out = []
    for i in range(n):
        kk = k - 1 if ragged and k > 2 and i % 3 == 0 else k
        out.append({"prompt_ids": r.integers(1, vocab, int(r.integers(1, max_prompt + 1))).tolist(),
                    "response_ids": [r.integers(1, vocab, int(r.integers(1, max_response + 1))).tolist() for _ in range(kk)],
                    "scores": r.integers(1, 11, kk).astype(float).tolist(), "pref": float(r.uniform(0.05, 0.95)),
                    "row": i})
    return out


def _both(items, b, k):
    """The same items in both layouts; the last example slot stays padding when ``b > len``."""
    rows = collate_responses(items, batch_size=b, num_responses=k, buckets=(64,))
    shared = collate_shared(items, batch_size=b, num_responses=k, buckets=(96,))
    return rows, shared


def _left_pad(shared, n):
    """The shared batch with ``n`` padding tokens moved to the left of every row."""
    out = dict(shared)
    for f in ("input_ids_BxT", "segment_ids_BxT", "positions_BxT"):
        out[f] = np.roll(shared[f], n, axis=1)
    assert (shared["segment_ids_BxT"][:, -n:] == -1).all()
    return out


def _model_logps(model, batch, chunk=16):
    h = model.hidden_states(**bt.model_inputs(batch))
    w, b = model.unembedding()
    k = bt.dims(batch)[1]
    tokens = {f: jnp.asarray(batch[f]) for f in bt.token_fields(batch)}
    return np.asarray(sp._local_logps_BxK(h, w, b, tokens, k, chunk))


ARCHS = {
    "mistral_window": dict(arch="mistral", hf_model_type="mistral", num_heads=4, num_kv_heads=2, sliding_window=5),
    "mistral_mha": dict(arch="mistral", hf_model_type="mistral", num_heads=4, num_kv_heads=4, sliding_window=None),
    "phi": dict(arch="phi", hf_model_type="phi", num_heads=4, num_kv_heads=4, partial_rotary_factor=0.5,
                qk_layernorm=True, hidden_act="gelu_new"),
    "llama3": dict(arch="mistral", hf_model_type="llama", num_heads=4, num_kv_heads=2, sliding_window=None,
                   rope_type="llama3", rope_factor=8.0, rope_original_max_position=16, tie_word_embeddings=True),
    "qwen2": dict(arch="mistral", hf_model_type="qwen2", num_heads=4, num_kv_heads=2, sliding_window=None,
                  qkv_bias=True),
    "qwen3": dict(arch="mistral", hf_model_type="qwen3", num_heads=4, num_kv_heads=2, sliding_window=None,
                  qk_norm=True),
}


@pytest.mark.parametrize("left_pad", [0, 5])
@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_logps_match_rows(arch, left_pad):
    cfg = models.ModelConfig(vocab_size=V, hidden_size=32, intermediate_size=48, num_layers=2, head_dim=8,
                             **ARCHS[arch])
    model = models.build(cfg, seed=3)
    for name in ("bq", "bk", "bv", "q_norm", "k_norm"):  # Qwen's biases and norms off their init values
        if name in model.layers:
            p = model.layers[name]
            p.set_value(p.get_value() + 0.3 * jax.random.normal(jax.random.key(7), p.get_value().shape))
    k = 3
    rows, shared = _both(_items(0, 5, k), 6, k)
    if left_pad:
        shared = _left_pad(shared, left_pad)
    want = _model_logps(model, rows) * rows["list_mask_BxK"]
    got = _model_logps(model, shared)
    assert np.abs(want).min(where=rows["list_mask_BxK"], initial=np.inf) > 1.0  # real log-probs, not zeros
    np.testing.assert_allclose(got, want, atol=2e-4, rtol=1e-5)
    assert (got[~shared["list_mask_BxK"]] == 0).all()


def test_window_counts_positions_not_slots():
    """With the window shorter than a response's distance from the prompt's end in slots (but not
    in positions), the second response must still see the prompt's last tokens: equal to rows."""
    cfg = models.ModelConfig(vocab_size=V, hidden_size=32, intermediate_size=48, num_layers=2, head_dim=8,
                             **ARCHS["mistral_window"])
    model = models.build(cfg, seed=4)
    items = [{"prompt_ids": list(range(1, 8)), "response_ids": [list(range(10, 19)), list(range(20, 24))],
              "scores": [], "pref": 0.5, "row": 0}]
    rows, shared = _both(items, 1, 2)
    np.testing.assert_allclose(_model_logps(model, shared), _model_logps(model, rows), atol=2e-4, rtol=1e-5)


def test_smollm2_logps_match_rows(smollm2_path):
    model = models.from_pretrained(smollm2_path)
    items = _items(1, 2, 2, vocab=model.config.vocab_size, max_prompt=12, max_response=6)
    rows, shared = _both(items, 2, 2)
    np.testing.assert_allclose(_model_logps(model, shared, 64), _model_logps(model, rows, 64), atol=2e-3, rtol=1e-5)


# ---- losses and gradients through the train step's own functions ---------------------------------

CFG = tiny_config()
TV = CFG.model.overrides["vocab_size"]
LOSSES = [("irepo", 2), ("soft_dpo", 2), ("dpo", 2), ("ipo", 2), ("lpo", 4), ("lpo_abs", 4), ("infonca", 4),
          ("lipo_lambda", 4)]


@pytest.fixture(scope="module")
def tiny():
    """The tiny config's model (params and buffers, host arrays) and one batch pair per K: 6
    examples (ragged lists at K = 4) and 2 padding examples, with reference log-probs."""
    from repo_jax.training import optim
    from repo_jax.training import state as st

    mesh = shd.make_mesh(shd.MeshConfig(1, 1, 1), jax.devices()[:1])
    graphdef, state, _ = st.init_state(st.model_factory(CFG.model), optim.make_optimizer(CFG.optim), CFG.train, mesh)
    batches = {}
    for k in (2, 4):
        rows, shared = _both(_items(k, 6, k, vocab=TV, max_prompt=20, max_response=12), 8, k)
        ref = np.random.default_rng(k).normal(-30, 5, (8, k)).astype(np.float32)
        batches[k] = [{**b, "ref_logps_BxK": ref} for b in (rows, shared)]
    return graphdef, jax.tree.map(np.asarray, state.params), batches


def _loss_and_grads(graphdef, params, batch, train, devices):
    mesh = shd.make_mesh(shd.MeshConfig(1, devices, 1), jax.devices()[:devices])

    def f(p):
        h, w, b = sp._hidden_and_unembedding(graphdef, p, None, batch)
        sums = sp.loss_sums(h, w, b, batch, batch["ref_logps_BxK"], mesh=mesh, train=train)
        return sums["loss_sum"], sums

    with shd.mesh_rules(mesh, shd.TRAIN_RULES):
        batch = shd.global_batch(bt.cast(batch), mesh)
        (_, sums), grads = jax.jit(jax.value_and_grad(f, has_aux=True))(params)
    return jax.tree.map(np.asarray, objectives.finalize(sums)), jax.tree.map(np.asarray, grads)


@pytest.mark.parametrize("loss,k", LOSSES)
def test_losses_and_gradients_match_rows(tiny, loss, k):
    graphdef, params, batches = tiny
    train = dataclasses.replace(CFG.train, num_responses=k, loss=dataclasses.replace(CFG.train.loss, name=loss))
    (m_rows, g_rows), (m_shared, g_shared) = (_loss_and_grads(graphdef, params, b, train, 1) for b in batches[k])
    assert m_rows["loss"] != 0 and np.isfinite(m_rows["loss"])
    for key in m_rows:
        np.testing.assert_allclose(m_shared[key], m_rows[key], rtol=1e-4, atol=1e-5, err_msg=key)
    scale = max(float(np.max(np.abs(g))) for g in jax.tree.leaves(g_rows))
    assert scale > 0
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-4 * scale, rtol=1e-3), g_shared, g_rows)


@pytest.mark.parametrize("loss,k", [("irepo", 2), ("lpo", 4)])
def test_eight_devices_equal_one(tiny, loss, k):
    graphdef, params, batches = tiny
    train = dataclasses.replace(CFG.train, num_responses=k, loss=dataclasses.replace(CFG.train.loss, name=loss))
    (m1, g1), (m8, g8) = (_loss_and_grads(graphdef, params, batches[k][1], train, n) for n in (1, 8))
    for key in m1:
        np.testing.assert_allclose(m8[key], m1[key], rtol=1e-5, atol=1e-6, err_msg=key)
    scale = max(float(np.max(np.abs(g))) for g in jax.tree.leaves(g1))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5 * scale, rtol=1e-4), g8, g1)


def test_padding_examples_and_missing_responses_count_nothing(tiny):
    """Changing the tokens of a padding example or of a ragged list's missing slot changes no loss."""
    graphdef, params, batches = tiny
    train = dataclasses.replace(CFG.train, num_responses=4, loss=dataclasses.replace(CFG.train.loss, name="lpo"))
    shared = batches[4][1]
    assert not shared["example_mask_B"][-1] and not shared["list_mask_BxK"][0, -1]
    noisy = dict(shared)
    noisy["input_ids_BxT"] = shared["input_ids_BxT"].copy()
    noisy["input_ids_BxT"][-1] = 7  # a padding example's row
    m0, _ = _loss_and_grads(graphdef, params, shared, train, 1)
    m1, _ = _loss_and_grads(graphdef, params, noisy, train, 1)
    assert m0 == m1


def test_flop_accounting_counts_the_same_work_in_both_layouts():
    """``benchmarks.flops``: both layouts of the same items need the same useful FLOPs (the prompt
    once, attention pairs of real tokens), and the shared layout runs fewer padded ones."""
    from repo_jax.benchmarks import flops

    cfg = models.ModelConfig(vocab_size=V, hidden_size=32, intermediate_size=48, num_layers=2, head_dim=8,
                             **ARCHS["mistral_window"])
    rows, shared = _both(_items(5, 6, 4), 8, 4)
    fr, fs = flops.forward_flops(cfg, rows), flops.forward_flops(cfg, shared)
    assert fr["useful"] == fs["useful"] and fr["real_tokens"] == fs["real_tokens"]
    assert fs["padded"] < fr["padded"] and fs["useful"] < fs["padded"]
    # one example by hand: a 3-token prompt, responses of 2 and 1 tokens, no window
    one = collate_shared([{"prompt_ids": [1, 2, 3], "response_ids": [[4, 5], [6]], "row": 0}], batch_size=1,
                         num_responses=2, buckets=(8,))
    full = dataclasses.replace(cfg, sliding_window=None)
    body, unembed = flops._params(full)
    pairs = 6 + (4 + 5) + 4  # prompt causal 1+2+3; response 0: 4 and 5 keys; response 1: 4 keys
    want = 2 * (body * 6 + unembed * 3) + 4 * full.num_layers * full.num_heads * full.head_dim * pairs
    assert flops.forward_flops(full, one)["useful"] == want


def test_epoch_order_groups_by_length_and_is_a_seeded_permutation():
    from repo_jax import padding
    from repo_jax.loop.rounds import epoch_order

    lengths = np.random.default_rng(0).integers(80, 200, 37)
    a = epoch_order(lengths, 8, 5, group_by_length=True)
    assert sorted(a.tolist()) == list(range(37)) and (a == epoch_order(lengths, 8, 5, group_by_length=True)).all()
    assert not (a == epoch_order(lengths, 8, 6, group_by_length=True)).all()
    batches = [a[i:i + 8] for i in range(0, 37, 8)]
    assert len(batches[-1]) == 5  # the short batch last, so step j is always items [8j, 8j + 8)
    spans = [np.ptp(lengths[x]) for x in batches[:-1]]
    plain = epoch_order(lengths, 8, 5, group_by_length=False)
    plain_spans = [np.ptp(lengths[plain[i:i + 8]]) for i in range(0, 32, 8)]
    assert max(spans) < min(plain_spans)
    pad = lambda order: sum(padding.fit(max(lengths[order[i:i + 8]]), padding.ladder(208)) for i in range(0, 37, 8))
    assert pad(a) < pad(plain)
