"""LoRA adapters (repo_jax.models.lora): the adapted model starts at the base exactly, only the
adapters train, their gradients equal the merged weights' gradients, the reference with adapters
off is the base, merging and the checkpoints, on tiny Mistral (GQA, sliding window) and Phi
(partial rotary, qk-layernorm) models."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from repo_jax import models
from repo_jax import sharding as shd
from repo_jax.models import lora
from repo_jax.models.config import LoraConfig, ModelConfig
from repo_jax.training import batch as bt
from repo_jax.training import optim
from repo_jax.training import state as st
from repo_jax.training import step as sp
from repo_jax.training.checkpoint import Checkpointer
from helpers import random_batch, tiny_config

FAST = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
V = 64
IDS = jnp.array([[1, 5, 9, 2, 7, 3, 3, 8, 11, 4], [6, 2, 2, 9, 1, 0, 5, 7, 13, 1]], jnp.int32)


def tiny(arch: str, **lora_kw) -> ModelConfig:
    common = dict(vocab_size=V, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, head_dim=8)
    if arch == "phi":
        cfg = ModelConfig(arch="phi", hf_model_type="phi", num_kv_heads=4, partial_rotary_factor=0.5,
                          hidden_act="gelu_new", qk_layernorm=True, **common)
    else:
        cfg = ModelConfig(num_kv_heads=2, sliding_window=5, **common)
    return cfg.replace(lora=LoraConfig(**lora_kw)) if lora_kw else cfg


def randomise_b(model, seed=1, scale=0.2):
    for i, d in enumerate(model.lora.values()):
        d["b"][...] = scale * jax.random.normal(jax.random.key(seed + i), d["b"].shape)
    return model


@pytest.mark.parametrize("arch", ["mistral", "phi"])
def test_fresh_adapters_give_the_base_logits_exactly(arch):
    base = models.build(tiny(arch), seed=0)
    adapted = lora.add_adapters(base, LoraConfig(rank=4, alpha=8, targets=("all-linear",)))
    assert lora.target_names(adapted.config) == (["wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down"]
                                                 if arch == "mistral" else ["wq", "wk", "wv", "wo", "w_fc1", "w_fc2"])
    np.testing.assert_array_equal(np.asarray(adapted(IDS)), np.asarray(base(IDS)))
    # built with LoRA from the start: B is zero, A is not, A spans the weight's input dims + rank
    fresh = models.build(tiny(arch, rank=4), seed=0)  # the default targets: attention
    assert lora.target_names(fresh.config) == ["wq", "wk", "wv", "wo"]
    assert fresh.lora["wo"]["a"].shape == (2, 4, 8, 4) and fresh.lora["wo"]["b"].shape == (2, 4, 32)
    assert float(jnp.abs(fresh.lora["wq"]["a"][...]).max()) > 0 and float(jnp.abs(fresh.lora["wq"]["b"][...]).max()) == 0
    np.testing.assert_array_equal(np.asarray(fresh(IDS)), np.asarray(models.build(tiny(arch), seed=0)(IDS)))


def test_targets_accept_our_names_hf_modules_and_presets_and_name_a_bad_one():
    assert lora.target_names(tiny("mistral", rank=2, targets=("attention",))) == ["wq", "wk", "wv", "wo"]
    assert lora.target_names(tiny("mistral", rank=2, targets=("self_attn.q_proj", "w_down"))) == ["wq", "w_down"]
    assert lora.target_names(tiny("phi", rank=2, targets=("mlp.fc.",))) == ["w_fc1", "w_fc2"]
    with pytest.raises(ValueError, match=r"'up_proj' matches no projection of a phi layer"):
        lora.target_names(tiny("phi", rank=2, targets=("up_proj",)))
    with pytest.raises(ValueError, match="dropout"):
        LoraConfig(rank=2, dropout=1.0)


@pytest.mark.parametrize("arch", ["mistral", "phi"])
def test_adapter_gradients_equal_the_merged_weights_gradients(arch):
    """A direct reference computation: the same loss as a function of ``(A, B)`` through the
    merged weights ``W + s A B`` of a plain model."""
    model = randomise_b(lora.add_adapters(models.build(tiny(arch), seed=0),
                                          LoraConfig(rank=3, alpha=6, targets=("all-linear",))))
    graphdef, adapters, rest = nnx.split(model, nnx.LoRAParam, ...)
    probe = jax.random.normal(jax.random.key(7), (2, IDS.shape[1], V))

    def via_adapters(ad):
        return jnp.sum(nnx.merge(graphdef, ad, rest)(IDS) * probe)

    plain = lora.merge(model)
    p_graph, p_state = nnx.split(plain)
    base_layers = {n: model.layers[n][...] for n in model.lora}

    def via_merged(ad):
        merged = lora.merged_layers(model.config, base_layers,
                                    {n: {"a": ad["lora"][n]["a"][...], "b": ad["lora"][n]["b"][...]} for n in model.lora})
        flat = [(p, v.replace(merged[p[1]]) if p[0] == "layers" and p[1] in merged else v)
                for p, v in nnx.to_flat_state(p_state)]
        return jnp.sum(nnx.merge(p_graph, nnx.from_flat_state(flat))(IDS) * probe)

    l1, g1 = jax.value_and_grad(via_adapters)(adapters)
    l2, g2 = jax.value_and_grad(via_merged)(adapters)
    np.testing.assert_allclose(float(l1), float(l2), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        assert float(jnp.abs(a).max()) > 0
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=2e-5)


def test_merge_folds_the_adapters_and_decoding_uses_it():
    model = randomise_b(lora.add_adapters(models.build(tiny("mistral"), seed=0),
                                          LoraConfig(rank=4, alpha=4, targets=("all-linear",))))
    merged = lora.merge(model)
    assert not merged.config.lora.rank and not hasattr(merged, "lora")
    assert merged.top["embed"][...] is model.top["embed"][...]  # untouched weights are shared, not copied
    np.testing.assert_allclose(np.asarray(merged(IDS)), np.asarray(model(IDS)), atol=2e-5)
    assert float(jnp.abs(merged(IDS) - models.build(tiny("mistral"), seed=0)(IDS)).max()) > 1e-2
    dec = model.unstacked()  # the decoding layout folds the adapters in
    np.testing.assert_allclose(np.asarray(dec(IDS)), np.asarray(model(IDS)), atol=2e-5)


def test_dropout_only_with_a_key():
    model = randomise_b(models.build(tiny("mistral", rank=4, dropout=0.5, targets=("all-linear",)), seed=0))
    h0 = model.hidden_states(IDS)
    np.testing.assert_array_equal(np.asarray(h0), np.asarray(model.hidden_states(IDS)))  # no key: deterministic
    h1 = model.hidden_states(IDS, dropout_key=jax.random.key(0))
    h2 = model.hidden_states(IDS, dropout_key=jax.random.key(1))
    assert float(jnp.abs(h1 - h0).max()) > 1e-3 and float(jnp.abs(h1 - h2).max()) > 1e-3


# ------------------------------------------------------------------------------ train state

CFG = tiny_config("model.lora.rank=4", "model.lora.alpha=8", "model.lora.targets=[all-linear]", "optim.lr=1e-2",
                  "optim.warmup_steps=0")


def _mesh(shape):
    return shd.make_mesh(shd.MeshConfig(*shape), jax.devices()[: int(np.prod(shape))])


def _state(cfg, mesh):
    tx = optim.make_optimizer(cfg.optim)
    model = st.model_factory(cfg.model, seed=0)()
    return st.state_from_model(model, tx, cfg.train, mesh)


def test_a_step_changes_only_the_adapters_and_the_optimiser_holds_only_theirs():
    mesh = _mesh((1, 1, 1))
    graphdef, state, shardings = _state(CFG, mesh)
    n_adapters = sum(x.size for x in jax.tree.leaves(state.params))
    n_base = sum(x.size for x in jax.tree.leaves(state.frozen))
    assert 0 < n_adapters < 0.2 * n_base
    assert {p[0] for p, _ in nnx.to_flat_state(state.params)} == {"lora"}
    assert sum(x.size for x in jax.tree.leaves(state.opt_state)) <= 2 * n_adapters + 16  # Adam's two moments
    base_before = jax.tree.map(np.array, state.frozen)
    adapters_before = jax.tree.map(np.array, state.params)
    step = sp.make_train_step(graphdef, CFG, mesh, shardings, compiler_options=FAST)
    frozen_arrays = jax.tree.leaves(state.frozen)
    for seed in (1, 2):  # step 1 moves B only (A's gradient is zero while B is), step 2 both
        state, m = step(state, shd.global_batch(bt.cast(random_batch(CFG, vocab=256, seed=seed)), mesh))
        assert np.isfinite(float(m["loss"])) and float(m["grad_norm"]) > 0 and int(m["skipped"]) == 0
    # the base is bitwise identical (the very same arrays: neither donated nor copied), the adapters moved
    assert all(a is b for a, b in zip(jax.tree.leaves(state.frozen), frozen_arrays))
    for a, b in zip(jax.tree.leaves(state.frozen), jax.tree.leaves(base_before)):
        np.testing.assert_array_equal(np.asarray(a), b)
    moved = [float(np.abs(np.asarray(a) - b).max()) for a, b in zip(jax.tree.leaves(state.params),
                                                                      jax.tree.leaves(adapters_before))]
    assert min(moved) > 0


def test_reference_with_adapters_off_is_the_base_model():
    """``train.reference=params`` with LoRA: the reference is the starting adapters (B = 0) on the
    same base arrays, whose log-probs equal the base model's, before and after updates."""
    cfg = dataclasses.replace(CFG, train=dataclasses.replace(CFG.train, reference="params"))
    mesh = _mesh((1, 1, 1))
    graphdef, state, shardings = _state(cfg, mesh)
    batch = shd.global_batch(bt.cast(random_batch(cfg, vocab=256, seed=3, ref_logps=False)), mesh)
    plain_cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, lora=LoraConfig()))
    p_graph, p_state, p_shardings = _state(plain_cfg, mesh)  # the same seed: the base alone
    base_fn = sp.make_reference_logprobs(p_graph, plain_cfg.train, mesh, p_shardings.params, compiler_options=FAST)
    want = np.asarray(base_fn(p_state.params, None, batch))
    ref_fn = sp.make_reference_logprobs(graphdef, cfg.train, mesh, shardings.params,
                                        frozen_shardings=shardings.frozen, compiler_options=FAST)
    np.testing.assert_array_equal(np.asarray(ref_fn(state.ref_params, state.frozen, batch)), want)
    step = sp.make_train_step(graphdef, cfg, mesh, shardings, compiler_options=FAST)
    state, m = step(state, batch)
    state, m = step(state, batch)
    np.testing.assert_array_equal(np.asarray(ref_fn(state.ref_params, state.frozen, batch)), want)
    assert float(np.abs(np.asarray(ref_fn(state.params, state.frozen, batch)) - want).max()) > 1e-4


def test_eight_devices_equal_one():
    cfg = CFG
    batches = [random_batch(cfg, vocab=256, seed=s) for s in (1, 2)]
    out = []
    for shape in ((1, 1, 1), (2, 2, 2)):
        mesh = _mesh(shape)
        graphdef, state, shardings = _state(cfg, mesh)
        if shape == (2, 2, 2):  # A like the weight's input dims, B like its output dims
            assert tuple(shardings.params["lora"]["wq"]["a"].spec) == (None, "fsdp", None)
            assert tuple(shardings.params["lora"]["wq"]["b"].spec) == (None, None, "tensor", None)
        step = sp.make_train_step(graphdef, cfg, mesh, shardings, compiler_options=FAST)
        for b in batches:
            state, m = step(state, shd.global_batch(bt.cast(b), mesh))
        out.append((jax.tree.map(np.asarray, state.params), (float(m["loss"]), float(m["grad_norm"]))))
    np.testing.assert_allclose(out[0][1], out[1][1], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(out[0][0]), jax.tree.leaves(out[1][0])):
        # Adam's first steps divide by sqrt(v) of tiny A gradients: float noise of the sharded
        # sums shows in a few elements, at up to a few % of one update (lr = 1e-2)
        np.testing.assert_allclose(a, b, atol=5e-4)


def test_checkpoint_holds_the_adapters_not_the_base(tmp_path):
    mesh = _mesh((1, 1, 1))
    graphdef, state, shardings = _state(CFG, mesh)
    abstract = jax.eval_shape(lambda s: s, state)
    with Checkpointer(tmp_path / "ck") as ck:
        ck.save(1, state, loop={"x": 1}, force=True)
        ck.wait()
        assert ck.saved_items(1) == {"state", "loop"}
        restored, loop = ck.restore(abstract, shardings)
    assert restored.frozen is None and loop == {"x": 1}
    for a, b in zip(jax.tree.leaves(restored.params), jax.tree.leaves(state.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    saved = sum(p.stat().st_size for p in (tmp_path / "ck" / "1" / "state").rglob("*") if p.is_file())
    base_bytes = sum(x.nbytes for x in jax.tree.leaves(state.frozen))
    assert saved < base_bytes / 2  # far less than the base
    with Checkpointer(tmp_path / "ck2", save_base=True) as ck:  # loop.lora_merge=every_round
        ck.save(1, state, loop={}, force=True)
        ck.wait()
        restored, _ = ck.restore(abstract, shardings)
    for a, b in zip(jax.tree.leaves(restored.frozen), jax.tree.leaves(state.frozen)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_base_checksum_is_exact_and_layout_free():
    mesh = _mesh((1, 1, 1))
    _, state, _ = _state(CFG, mesh)
    c1 = lora.checksum(state.frozen)
    _, state8, _ = _state(CFG, _mesh((2, 2, 2)))
    assert lora.checksum(state8.frozen) == c1  # the same weights on another layout
    bumped = jax.tree.map(lambda x: x, state.frozen)
    w = bumped["layers"]["wq"]
    w.set_value(w.get_value().at[1, 3, 0, 2].add(1e-6))  # one weight, by one float step or so
    assert lora.checksum(bumped) != c1


def test_fold_keeps_the_policy_and_restarts_the_adapters():
    mesh = _mesh((1, 1, 1))
    graphdef, state, shardings = _state(CFG, mesh)
    state = state.replace(params=jax.tree.map(lambda x: x + 0.05, state.params))  # B != 0
    batch = shd.global_batch(bt.cast(random_batch(CFG, vocab=256, seed=5)), mesh)
    ref_fn = sp.make_reference_logprobs(graphdef, CFG.train, mesh, shardings.params,
                                        frozen_shardings=shardings.frozen, compiler_options=FAST)
    before = np.asarray(ref_fn(state.params, state.frozen, batch))
    tx = optim.make_optimizer(CFG.optim)
    folded = jax.jit(lambda s: st.fold_adapters(graphdef, s, tx, jax.random.key(3)))(state)
    np.testing.assert_allclose(np.asarray(ref_fn(folded.params, folded.frozen, batch)), before, rtol=1e-5, atol=1e-4)
    assert max(float(jnp.abs(x.get_value()).max()) for p, x in nnx.to_flat_state(folded.params) if p[-1] == "b") == 0.0
    # the base now holds the old adapters' product
    assert float(jnp.abs(folded.frozen["layers"]["wq"].get_value() - state.frozen["layers"]["wq"].get_value()).max()) > 0


# ------------------------------------------------------------------------------ PEFT export


def _hf_base(arch, folder):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    if arch == "phi":
        cfg = transformers.PhiConfig(vocab_size=96, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, max_position_embeddings=64, partial_rotary_factor=0.5,
                                     resid_pdrop=0.0)
        hf = transformers.PhiForCausalLM(cfg)
    elif arch == "qwen2":  # biases on q, k, v beside the adapters
        hf = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
            vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64))
    elif arch == "qwen3":  # q / k norms after the adapted projections
        hf = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(
            vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=12, max_position_embeddings=64))
    else:
        cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
        hf = transformers.LlamaForCausalLM(cfg)
    with torch.no_grad():
        for p in hf.parameters():
            p.mul_(3.0) if p.dim() > 1 else p.add_(0.1 * torch.randn_like(p))
    hf.eval().save_pretrained(folder)
    return hf


@pytest.mark.parametrize("arch", ["llama", "phi", "qwen2", "qwen3"])
def test_exported_adapter_loads_in_peft_to_our_logits(arch, tmp_path):
    """Our adapter folder through ``peft.PeftModel.from_pretrained`` on the HF base gives our
    adapted logits within 1e-4, with every tensor of the file loaded (PEFT only warns about a
    tensor it cannot place), and ``merge_and_unload`` agrees with our merged export."""
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    from safetensors.numpy import load_file

    hf = _hf_base(arch, tmp_path / "base")
    ours = models.from_pretrained(str(tmp_path / "base"), lora=LoraConfig(rank=4, alpha=12, targets=("all-linear",)))
    ours = randomise_b(ours, scale=0.3)
    lora.save_peft(ours, tmp_path / "adapter", base_model=str(tmp_path / "base"))
    ids = np.random.default_rng(0).integers(1, 96, (2, 11)).astype(np.int32)
    want = np.asarray(ours(ids))
    # and back through our own loader (base from base_model_name_or_path)
    np.testing.assert_allclose(np.asarray(models.from_pretrained(str(tmp_path / "adapter"))(ids)), want, atol=1e-5)

    pm = peft.PeftModel.from_pretrained(hf, str(tmp_path / "adapter")).eval()
    written = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    live = {n.replace(".default", ""): p for n, p in pm.named_parameters() if "lora_" in n}
    assert set(live) == set(written) and len(written) == 2 * 2 * len(lora.target_names(ours.config))
    for name, value in written.items():
        np.testing.assert_array_equal(live[name].detach().numpy(), value)
    with torch.no_grad():
        got = pm(input_ids=torch.tensor(ids, dtype=torch.long)).logits.numpy()
    assert np.abs(got - want).max() <= 1e-4
    merged = pm.merge_and_unload()
    models.save_pretrained(ours, tmp_path / "merged")  # our HF export merges the adapters in
    with torch.no_grad():
        peft_merged = merged(input_ids=torch.tensor(ids, dtype=torch.long)).logits.numpy()
    np.testing.assert_allclose(np.asarray(models.from_pretrained(str(tmp_path / "merged"))(ids)), peft_merged, atol=1e-4)


@pytest.mark.parametrize("arch", ["llama", "phi", "qwen2", "qwen3"])
def test_a_peft_saved_adapter_loads_into_our_model(arch, tmp_path):
    """The other direction: an adapter trained and saved by ``peft`` itself (random ``B``, all
    linear layers) loads through ``models.from_pretrained(adapter folder)`` (its base from
    ``base_model_name_or_path``) to PEFT's logits; a tensor missing from the file is an error
    naming it, not a silent zero."""
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    from safetensors.torch import load_file, save_file

    hf = _hf_base(arch, tmp_path / "base")
    modules = (["q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"] if arch == "phi"
               else ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    pm = peft.get_peft_model(hf, peft.LoraConfig(r=4, lora_alpha=6, target_modules=modules, lora_dropout=0.1))
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.copy_(0.3 * torch.randn_like(p))
    pm.save_pretrained(tmp_path / "adapter")
    cfg_path = tmp_path / "adapter" / "adapter_config.json"
    pc = json.loads(cfg_path.read_text())
    pc["base_model_name_or_path"] = str(tmp_path / "base")
    cfg_path.write_text(json.dumps(pc))
    ids = np.random.default_rng(0).integers(1, 96, (2, 11)).astype(np.int32)
    with torch.no_grad():
        want = pm.eval()(input_ids=torch.tensor(ids, dtype=torch.long)).logits.numpy()
    ours = models.from_pretrained(str(tmp_path / "adapter"))
    assert ours.config.lora.rank == 4 and ours.config.lora.scale == 1.5 and ours.config.lora.dropout == 0.1
    assert np.abs(np.asarray(ours(ids)) - want).max() <= 1e-4
    tensors = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    dropped = sorted(tensors)[3]
    save_file({k: v for k, v in tensors.items() if k != dropped}, str(tmp_path / "adapter" / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match="missing tensor base_model.model.model.layers"):
        models.from_pretrained(str(tmp_path / "adapter"))
