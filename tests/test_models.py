"""Model ports against transformers (PyTorch, CPU) on tiny random models saved to a temp folder.

Parity covers Mistral with 1, 2 and 4 kv heads and a sliding window shorter than the sequence,
Phi with partial rotary 0.4 / 0.5 and ``qk_layernorm`` on and off, each with and without left
padding; then round trips, cached decoding, real sizes, causality and loader errors.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from repo_jax import models
from repo_jax.models import convert

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

T = 12
TOL = 1e-4


def _hf_mistral(kv_heads, window=4, tie=False):
    cfg = transformers.MistralConfig(
        vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=kv_heads, max_position_embeddings=64, sliding_window=window, tie_word_embeddings=tie,
        rope_theta=1000.0,
    )
    return cfg, transformers.MistralForCausalLM


def _hf_phi(prf, qk_ln):
    cfg = transformers.PhiConfig(
        vocab_size=96, hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=64, partial_rotary_factor=prf, qk_layernorm=qk_ln, resid_pdrop=0.0,
    )
    return cfg, transformers.PhiForCausalLM


def _save_random(hf_cfg, cls, folder):
    torch.manual_seed(0)
    hf = cls(hf_cfg).eval()
    with torch.no_grad():  # biases and norms off their init values, so the mapping of each is tested
        for name, p in hf.named_parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
            else:
                p.mul_(3.0)
    hf.save_pretrained(folder)
    return hf


def _inputs(left_pad: int):
    rng = np.random.default_rng(1)
    ids = rng.integers(1, 96, size=(2, T)).astype(np.int32)
    mask = np.ones((2, T), np.int32)
    mask[1, :left_pad] = 0
    ids[1, :left_pad] = 0
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0).astype(np.int32)
    return ids, mask, positions


def _hf_logits(hf, ids, mask, positions):
    with torch.no_grad():
        out = hf(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask),
                 position_ids=torch.tensor(positions, dtype=torch.long))
    return out.logits.float().numpy()


def _assert_parity(folder, hf, left_pad):
    model = models.from_pretrained(folder)
    ids, mask, positions = _inputs(left_pad)
    ours = np.asarray(model(ids, positions, mask))
    ref = _hf_logits(hf, ids, mask, positions)
    real = mask.astype(bool)  # padded query rows are meaningless on both sides
    diff = np.abs(ours - ref)[real].max()
    assert diff <= TOL, diff
    return model


@pytest.mark.parametrize("left_pad", [0, 5])
@pytest.mark.parametrize("kv_heads", [1, 2, 4])
def test_mistral_matches_transformers(kv_heads, left_pad, tmp_path):
    hf = _save_random(*_hf_mistral(kv_heads), tmp_path)
    model = _assert_parity(tmp_path, hf, left_pad)
    assert model.config.sliding_window == 4 < T


def test_sliding_window_is_applied(tmp_path):
    """The window changes the logits once the sequence is longer than it (levanter's Mistral never applied it)."""
    _save_random(*_hf_mistral(2, window=4), tmp_path)
    ids = _inputs(0)[0]
    windowed = np.asarray(models.from_pretrained(tmp_path)(ids))
    full = np.asarray(models.from_pretrained(tmp_path, sliding_window=None)(ids))
    np.testing.assert_allclose(windowed[:, :4], full[:, :4], atol=1e-5)
    assert np.abs(windowed[:, 4:] - full[:, 4:]).max() > 1e-3


@pytest.mark.parametrize("left_pad", [0, 5])
@pytest.mark.parametrize("prf,qk_ln", [(0.4, False), (0.5, False), (0.4, True), (0.5, True)])
def test_phi_matches_transformers(prf, qk_ln, left_pad, tmp_path):
    hf = _save_random(*_hf_phi(prf, qk_ln), tmp_path)
    _assert_parity(tmp_path, hf, left_pad)


def test_tied_llama_matches_transformers(tmp_path):
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    hf = _save_random(cfg, transformers.LlamaForCausalLM, tmp_path)
    model = _assert_parity(tmp_path, hf, 3)
    assert "lm_head" not in model.top and model.config.hf_model_type == "llama"


@pytest.mark.parametrize("arch", ["mistral", "phi"])
def test_round_trip_through_save_pretrained(arch, tmp_path):
    cfg = models.ModelConfig(arch=arch, hf_model_type=arch, vocab_size=96, hidden_size=32, intermediate_size=48,
                             num_layers=3, num_heads=4, num_kv_heads=2 if arch == "mistral" else 4, head_dim=8,
                             partial_rotary_factor=0.5 if arch == "phi" else 1.0, sliding_window=None,
                             hidden_act="silu" if arch == "mistral" else "gelu_new", qk_layernorm=arch == "phi")
    model = models.build(cfg, seed=3)
    models.save_pretrained(model, tmp_path, max_shard_bytes=20_000)  # forces several shards + index
    assert (tmp_path / "model.safetensors.index.json").is_file()
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ids, mask, positions = _inputs(0)
    np.testing.assert_allclose(_hf_logits(hf, ids, mask, positions), np.asarray(model(ids)), atol=TOL)
    again = models.from_pretrained(tmp_path)
    for (path, a), (_, b) in zip(nnx.to_flat_state(nnx.state(model)), nnx.to_flat_state(nnx.state(again))):
        np.testing.assert_array_equal(np.asarray(a[...]), np.asarray(b[...]), err_msg=str(path))


@pytest.mark.parametrize("unstacked", [False, True], ids=["stacked", "unstacked"])
@pytest.mark.parametrize("arch", ["mistral", "phi"])
def test_cached_decoding_equals_full_forward(arch, unstacked):
    cfg = models.ModelConfig(arch=arch, hf_model_type=arch, vocab_size=64, hidden_size=32, intermediate_size=48,
                             num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, sliding_window=5 if arch == "mistral" else None,
                             partial_rotary_factor=0.5 if arch == "phi" else 1.0)
    stacked = models.build(cfg, seed=1)
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 14)), jnp.int32)
    full = stacked(ids)  # the training layout's full forward is the reference for both layouts
    model = stacked.unstacked() if unstacked else stacked
    size = lambda m: sum(x.size for x in jax.tree.leaves(nnx.state(m)))
    assert model.is_unstacked == unstacked and size(model) == size(stacked)
    np.testing.assert_allclose(model(ids), full, atol=1e-5)  # either layout's full forward (lm-eval scores with it)
    p = 6  # prefill 6 tokens, then decode one at a time past the window
    cache = model.init_cache(2, 16)
    pos = jnp.broadcast_to(jnp.arange(14, dtype=jnp.int32), (2, 14))
    logits, cache = model.forward_with_cache(ids[:, :p], pos[:, :p], jnp.ones((2, p), jnp.int32), cache, 0)
    np.testing.assert_allclose(logits, full[:, :p], atol=1e-5)
    for t in range(p, 14):
        step, cache = model.forward_with_cache(ids[:, t : t + 1], pos[:, t : t + 1], jnp.ones((2, 1), jnp.int32), cache, t)
        np.testing.assert_allclose(step[:, 0], full[:, t], atol=1e-5, err_msg=f"token {t}")


@pytest.mark.parametrize("name,count", [("phi-2", 2_779_683_840), ("mistral-7b-v0.1", 7_241_732_096),
                                        ("llama-3.1-8b", 8_030_261_248), ("qwen2.5-7b", 7_615_616_512),
                                        ("qwen3-8b", 8_190_735_360)])
def test_real_sizes_by_eval_shape(name, count):
    cfg = models.load_config(f"configs/models/{name}.json")
    abstract = nnx.eval_shape(lambda: models.build(cfg))
    total = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
    assert total == count == models.param_count(cfg)
    assert models.flops_per_token(cfg, 2048) > 6 * count * 0.9


def test_both_config_json_forms():
    base = json.loads(open("configs/models/phi-2.json").read())
    from repo_jax.models.config import from_hf_dict, to_hf_dict

    old = from_hf_dict(base)
    new_form = {k: v for k, v in base.items() if k not in ("rope_theta", "partial_rotary_factor")}
    new_form["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.4}
    assert from_hf_dict(new_form) == old
    assert old.rotary_dim == 32 and old.head_dim == 80
    assert from_hf_dict(to_hf_dict(old)) == old
    with pytest.raises(ValueError, match="rope_type 'longrope'"):
        from_hf_dict({**base, "rope_scaling": {"rope_type": "longrope", "factor": 2.0}})


def test_gradient_is_causal():
    """The loss at position t has zero gradient with respect to the embeddings of later tokens."""
    cfg = models.ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                             num_kv_heads=2, head_dim=8)
    model = models.build(cfg, seed=2)
    ids = jnp.arange(10, 22, dtype=jnp.int32)[None]  # distinct tokens: one embedding row per position
    t = 5

    graphdef, state = nnx.split(model)

    def loss(state):
        return jax.nn.log_softmax(nnx.merge(graphdef, state)(ids)[0, t])[3]

    g = jax.grad(loss)(state)["top"]["embed"][...]
    row_norm = np.abs(np.asarray(g)).sum(axis=1)
    assert (row_norm[10 : 10 + t + 1] > 0).all()
    assert (row_norm[10 + t + 1 : 22] == 0).all()


def test_remat_and_bf16_forward():
    cfg = models.ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                             num_kv_heads=2, head_dim=8)
    ids = jnp.arange(1, 9, dtype=jnp.int32)[None]
    base = models.build(cfg, seed=4)
    remat = models.build(cfg.replace(remat="full"), seed=4)
    grad = lambda m: jax.grad(lambda s: nnx.merge(nnx.graphdef(m), s)(ids).sum())(nnx.state(m))
    for a, b in zip(jax.tree.leaves(grad(base)), jax.tree.leaves(grad(remat))):
        np.testing.assert_allclose(a, b, atol=1e-5)
    bf16 = models.build(cfg.replace(param_dtype="bfloat16", dtype="bfloat16"), seed=4)
    assert bf16.layers["wq"][...].dtype == jnp.bfloat16
    out = bf16(ids)
    assert out.dtype == jnp.float32 and np.abs(np.asarray(out) - np.asarray(base(ids))).max() < 0.05


def test_sharded_load_places_parameters(tmp_path):
    _save_random(*_hf_mistral(2), tmp_path)
    mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 3)
    model = models.from_pretrained(tmp_path, mesh=mesh)
    wq = model.layers["wq"][...]
    assert wq.sharding.spec == jax.P(None, "fsdp", "tensor", None)
    assert wq.addressable_shards[0].data.shape == (2, 16, 2, 8)
    ids = _inputs(0)[0]
    np.testing.assert_allclose(np.asarray(model(ids)), np.asarray(models.from_pretrained(tmp_path)(ids)), atol=1e-5)


def test_loader_errors_name_the_tensor(tmp_path):
    from repo_jax.models import safetensors_io

    hf = _save_random(*_hf_mistral(2), tmp_path)
    tensors = {k: v.numpy() for k, v in hf.state_dict().items()}

    def write(d):
        for f in tmp_path.glob("*.safetensors"):
            f.unlink()
        safetensors_io.write_folder(tmp_path, [(k, v.shape, v.dtype, lambda v=v: v) for k, v in d.items()])

    write({k: v for k, v in tensors.items() if k != "model.layers.1.mlp.up_proj.weight"})
    with pytest.raises(ValueError, match=r"missing tensor model\.layers\.1\.mlp\.up_proj\.weight"):
        models.from_pretrained(tmp_path)
    write({**tensors, "model.layers.0.mlp.extra.weight": np.zeros(3, np.float32)})
    with pytest.raises(ValueError, match=r"unexpected tensor model\.layers\.0\.mlp\.extra\.weight"):
        models.from_pretrained(tmp_path)
    write({**tensors, "model.norm.weight": np.zeros(31, np.float32)})
    with pytest.raises(ValueError, match=r"model\.norm\.weight has shape \(31,\), the config implies \(32,\)"):
        models.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="config.json"):
        models.from_pretrained(tmp_path / "nowhere")


def test_convert_cli_round_trips_a_folder(tmp_path, capsys):
    from repo_jax import convert as convert_cli

    hf = _save_random(*_hf_phi(0.4, False), tmp_path / "src")
    assert convert_cli.main([str(tmp_path / "src"), str(tmp_path / "dst"), "--no-tokenizer", "--check"]) == 0
    assert "max |logit difference| after the round trip = 0" in capsys.readouterr().out
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "dst", dtype=torch.float32).eval()
    ids, mask, positions = _inputs(0)
    np.testing.assert_allclose(_hf_logits(again, ids, mask, positions), _hf_logits(hf, ids, mask, positions), atol=1e-6)
    assert convert.expected_tensors(models.load_config(tmp_path / "dst")).keys() == set(hf.state_dict())


# ---- real weights ------------------------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_gguf_matches_transformers_gguf_loader(smollm2_path):
    """Ours and transformers each dequantise the same GGUF (transformers through its own loader,
    including its un-permutation of q/k), then run a real chat prompt.

    Tolerance: both sides compute in float32 with different matmul orders over 30 layers; the
    logits span about 40 units, so 2e-3 absolute (~5e-5 relative) is float32 round-off, while a
    wrong mapping or rotary layout shifts them by whole units.
    """
    from repo_jax.assets import load_tokenizer
    from repo_jax.generate import encode_prompt

    tok = load_tokenizer(smollm2_path)
    ids = np.asarray([encode_prompt(tok, "Give me three tips for staying healthy.")], np.int32)
    ours = np.asarray(models.from_pretrained(smollm2_path)(ids))[0]
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        str(smollm2_path.parent), gguf_file=smollm2_path.name, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(ids, dtype=torch.long)).logits[0].float().numpy()
    diff = np.abs(ours - ref).max()
    assert diff < 2e-3, diff
    assert ours[-1].argmax() == ref[-1].argmax()
    assert np.ptp(ref[-1]) > 10  # the logits are informative, not a flat row


@pytest.mark.parametrize("spec,sa,sb", [("BTD,DF->BTF", (2, 3, 4), (4, 5)), ("BGQTH,BGSH->BGQTS", (2, 3, 2, 4, 5), (2, 3, 6, 5))])
def test_matmul_gradients_and_backward_precision(spec, sa, sb):
    from repo_jax.models import layers

    r = np.random.default_rng(0)
    a, b = (jnp.asarray(r.standard_normal(s), jnp.float32) for s in (sa, sb))
    ours = jax.grad(lambda a, b: jnp.sum(jnp.sin(layers.matmul(spec, a, b, jnp.float32))), argnums=(0, 1))(a, b)
    ref = jax.grad(lambda a, b: jnp.sum(jnp.sin(jnp.einsum(spec, a, b))), argnums=(0, 1))(a, b)
    for x, y in zip(ours, ref):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-5)
    # bf16 compute: every dot of the backward pass takes bf16 inputs and accumulates in float32;
    # gradients come back in the parameters' dtype.
    loss = lambda a, b: jnp.sum(layers.matmul(spec, a, b, jnp.bfloat16) ** 2)
    def dots_in(jaxpr):
        for e in jaxpr.eqns:
            if e.primitive.name == "dot_general":
                yield e
            for v in e.params.values():
                inner = getattr(v, "jaxpr", v)
                if hasattr(inner, "eqns"):
                    yield from dots_in(inner)

    dots = list(dots_in(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(a, b).jaxpr))
    assert len(dots) == 3
    for e in dots:
        assert [v.aval.dtype for v in e.invars] == [jnp.bfloat16, jnp.bfloat16] and e.outvars[0].aval.dtype == jnp.float32
    da, db = jax.grad(loss, argnums=(0, 1))(a, b)
    assert da.dtype == db.dtype == jnp.float32


def _tiny(**kw):
    return dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=64, **kw)


_ROPES = {
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16},
    "linear": {"rope_type": "linear", "factor": 2.0},
    # past max_position_embeddings (8 here, T tokens fed) the base grows with the longest sequence
    "dynamic": {"rope_type": "dynamic", "factor": 3.0},
    # Qwen2.5 / Qwen3's long-context form; the ramp's band falls inside head_dim 16 at this theta
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16},
    "yarn-mscale": {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 32, "beta_fast": 16,
                    "beta_slow": 2, "mscale": 0.9, "mscale_all_dim": 0.5, "truncate": False},
}


@pytest.mark.parametrize("left_pad", [0, 5])
@pytest.mark.parametrize("rope", list(_ROPES))
def test_scaled_rope_llama_matches_transformers(rope, left_pad, tmp_path):
    """Llama-3.1's rope scaling (low / high frequency bands around an original context of 16 here,
    so all three bands occur at head_dim 16), linear, dynamic NTK and YaRN scaling, tied
    embeddings as Llama-3.2."""
    rope = _ROPES[rope]
    tiny = _tiny(head_dim=16, tie_word_embeddings=True) | ({"max_position_embeddings": 8}
                                                           if rope["rope_type"] == "dynamic" else {})
    cfg = transformers.LlamaConfig(**tiny, rope_theta=10000.0 if "yarn" in rope["rope_type"] else 500000.0,
                                   rope_scaling=dict(rope))
    hf = _save_random(cfg, transformers.LlamaForCausalLM, tmp_path)
    model = _assert_parity(tmp_path, hf, left_pad)
    assert model.config.rope_type == rope["rope_type"]
    plain = models.from_pretrained(tmp_path, rope_type="default")
    ids = _inputs(0)[0]
    assert np.abs(np.asarray(plain(ids)) - np.asarray(model(ids))).max() > 1e-3  # the scaling matters here


@pytest.mark.parametrize("left_pad", [0, 5])
@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_qwen_matches_transformers(family, left_pad, tmp_path):
    """Qwen2 / Qwen2.5 (biases on q, k, v) and Qwen3 (RMSNorm of each head's q and k before the
    rotary embedding, head_dim other than hidden / heads)."""
    if family == "qwen2":
        cfg, cls = transformers.Qwen2Config(**_tiny(), rope_theta=1000000.0), transformers.Qwen2ForCausalLM
    else:
        cfg, cls = transformers.Qwen3Config(**_tiny(head_dim=12), rope_theta=1000000.0), transformers.Qwen3ForCausalLM
    hf = _save_random(cfg, cls, tmp_path)
    model = _assert_parity(tmp_path, hf, left_pad)
    layer = model.layers
    assert ("bq" in layer) == (family == "qwen2") and ("q_norm" in layer) == (family == "qwen3")
    models.save_pretrained(model, tmp_path / "again")  # and back: transformers reads our folder to its logits
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "again", dtype=torch.float32).eval()
    ids, mask, positions = _inputs(0)
    np.testing.assert_allclose(_hf_logits(back, ids, mask, positions), _hf_logits(hf, ids, mask, positions), atol=TOL)


@pytest.mark.parametrize("field, value, message", [
    ("rope_scaling", {"rope_type": "longrope", "factor": 4.0}, "rope_type 'longrope' is not supported"),
    ("mlp_bias", True, "mlp_bias is not supported"),
    ("use_sliding_window", True, "use_sliding_window=true is not supported"),
])
def test_unsupported_fields_fail_naming_them(field, value, message, tmp_path):
    hf = {"model_type": "qwen2", **_tiny(), field: value}
    (tmp_path / "config.json").write_text(json.dumps(hf))
    with pytest.raises(ValueError, match=message):
        convert.load_config(tmp_path)
