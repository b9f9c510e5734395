"""GGUF files of the Llama-3.x, Qwen2 and Qwen3 families, written by the ``gguf`` package from tiny
random transformers models under llama.cpp's tensor names and metadata keys, load to the
logits transformers computes from the same weights: q/k/v biases (``attn_q.bias``), per-head
q/k norms (``attn_q_norm.weight``), Llama's permuted q/k rows, and rope scaling as llama.cpp
stores it (a ``rope_freqs`` tensor for ``llama3``; ``rope.scaling.*`` keys for ``yarn``)."""

from __future__ import annotations

import numpy as np
import pytest

from repo_jax import models
from test_models import TOL, _hf_logits, _inputs, _save_random, _tiny

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

_TOP = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight"}
_LAYER = {"input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
          "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
          "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
          "self_attn.q_proj.bias": "attn_q.bias", "self_attn.k_proj.bias": "attn_k.bias",
          "self_attn.v_proj.bias": "attn_v.bias", "self_attn.q_norm.weight": "attn_q_norm.weight",
          "self_attn.k_norm.weight": "attn_k_norm.weight", "mlp.gate_proj.weight": "ffn_gate.weight",
          "mlp.up_proj.weight": "ffn_up.weight", "mlp.down_proj.weight": "ffn_down.weight"}


def _permute(w, heads):
    """llama.cpp's conversion of a Llama's q/k rows to its interleaved rotary layout."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(path, family, cfg, hf, *, head_dim=None, rope_keys=None, extra=()):
    w = gguf.GGUFWriter(str(path), family)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    if head_dim:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    for key, value in (rope_keys or {}).items():
        getattr(w, f"add_rope_scaling_{key}")(value)
    for name, p in hf.state_dict().items():
        arr = p.detach().numpy().astype(np.float32)
        if name in _TOP:
            if name == "lm_head.weight" and cfg.tie_word_embeddings:
                continue
            target = _TOP[name]
        else:
            i, rest = name.removeprefix("model.layers.").split(".", 1)
            target = f"blk.{i}.{_LAYER[rest]}"
            if family == "llama" and rest in ("self_attn.q_proj.weight", "self_attn.k_proj.weight"):
                arr = _permute(arr, cfg.num_attention_heads if "q_proj" in rest else cfg.num_key_value_heads)
        w.add_tensor(target, arr)
    for name, arr in extra:
        w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _assert_gguf_parity(path, hf):
    model = models.from_pretrained(str(path))
    ids, mask, positions = _inputs(3)
    diff = np.abs(np.asarray(model(ids, positions, mask)) - _hf_logits(hf, ids, mask, positions))[mask.astype(bool)]
    assert diff.max() <= TOL, diff.max()
    return model


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_qwen_gguf_matches_transformers(family, tmp_path):
    """Qwen's rotary layout is HF's: no permutation; qwen2's biases, qwen3's q/k norms and head_dim."""
    if family == "qwen2":
        cfg, cls = transformers.Qwen2Config(**_tiny(), rope_theta=1000000.0), transformers.Qwen2ForCausalLM
    else:
        cfg, cls = transformers.Qwen3Config(**_tiny(head_dim=12), rope_theta=1000000.0), transformers.Qwen3ForCausalLM
    hf = _save_random(cfg, cls, tmp_path / "hf")
    model = _assert_gguf_parity(write_gguf(tmp_path / "m.gguf", family, cfg, hf,
                                           head_dim=12 if family == "qwen3" else None), hf)
    assert model.config.hf_model_type == family and model.config.head_dim == (12 if family == "qwen3" else 8)


def _llama3_freqs(rope, head_dim, theta):
    """The divisors llama.cpp's converter writes as ``rope_freqs`` for a Llama-3.1 config."""
    inv = 1.0 / theta ** (np.arange(0, head_dim, 2) / head_dim)
    out = []
    for freq in inv:
        wavelen = 2 * np.pi / freq
        if wavelen < rope["original_max_position_embeddings"] / rope["high_freq_factor"]:
            out.append(1.0)
        elif wavelen > rope["original_max_position_embeddings"] / rope["low_freq_factor"]:
            out.append(rope["factor"])
        else:
            smooth = (rope["original_max_position_embeddings"] / wavelen - rope["low_freq_factor"]) / (
                rope["high_freq_factor"] - rope["low_freq_factor"])
            out.append(1 / ((1 - smooth) / rope["factor"] + smooth))
    return np.asarray(out, np.float32)


@pytest.mark.parametrize("rope", [
    {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
    {"factor": 32.0, "low_freq_factor": 2.0, "high_freq_factor": 8.0, "original_max_position_embeddings": 400},
], ids=["llama-3.1", "wide-band"])
def test_llama3_gguf_rope_freqs_matches_transformers(rope, tmp_path):
    """Llama-3.x (tied embeddings as 3.2): the ``rope_freqs`` divisors become the llama3 scaling
    that reproduces them; the HF folder we save from it gives transformers the same logits."""
    rope = {"rope_type": "llama3", **rope}
    theta = 500000.0 if rope["factor"] == 8.0 else 10000.0  # one frequency in the band, or two
    cfg = transformers.LlamaConfig(**_tiny(head_dim=16, tie_word_embeddings=True), rope_theta=theta,
                                   rope_scaling=dict(rope))
    hf = _save_random(cfg, transformers.LlamaForCausalLM, tmp_path / "hf")
    freqs = _llama3_freqs(rope, 16, theta)
    in_band = (freqs > 1.0001) & (freqs < rope["factor"] * 0.9999)
    assert in_band.sum() == (1 if theta == 500000.0 else 2) and rope["factor"] in freqs
    model = _assert_gguf_parity(write_gguf(tmp_path / "m.gguf", "llama", cfg, hf, head_dim=16,
                                           extra=[("rope_freqs.weight", freqs)]), hf)
    c = model.config
    assert (c.rope_type, c.rope_factor, c.tie_word_embeddings) == ("llama3", rope["factor"], True)
    if rope["low_freq_factor"] == 1.0:  # Llama-3.1's own parameters come back exactly
        assert (c.rope_high_freq_factor, c.rope_original_max_position) == (4.0, 16)
    models.save_pretrained(model, tmp_path / "again")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "again", dtype=torch.float32).eval()
    ids, mask, positions = _inputs(3)
    np.testing.assert_allclose(_hf_logits(back, ids, mask, positions)[mask.astype(bool)],
                               _hf_logits(hf, ids, mask, positions)[mask.astype(bool)], atol=TOL)

    noisy = freqs * np.linspace(1.0, 1.3, freqs.size, dtype=np.float32)  # not a llama3 scaling
    write_gguf(tmp_path / "bad.gguf", "llama", cfg, hf, head_dim=16, extra=[("rope_freqs.weight", noisy)])
    with pytest.raises(ValueError, match="rope_freqs tensor is not a llama3 rope scaling"):
        models.from_pretrained(str(tmp_path / "bad.gguf"))


def test_qwen2_yarn_gguf_matches_transformers(tmp_path):
    """Qwen2.5's long-context YaRN as llama.cpp's converter writes it (type, factor, original context)."""
    rope = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}
    cfg = transformers.Qwen2Config(**_tiny(), rope_theta=10000.0, rope_scaling=dict(rope))
    hf = _save_random(cfg, transformers.Qwen2ForCausalLM, tmp_path / "hf")
    keys = {"type": gguf.RopeScalingType.YARN, "factor": 4.0, "orig_ctx_len": 16}
    model = _assert_gguf_parity(write_gguf(tmp_path / "m.gguf", "qwen2", cfg, hf, rope_keys=keys), hf)
    assert (model.config.rope_type, model.config.rope_original_max_position) == ("yarn", 16)
    write_gguf(tmp_path / "bad.gguf", "qwen2", cfg, hf, rope_keys={**keys, "yarn_log_mul": 0.1})
    with pytest.raises(ValueError, match="rope.scaling.yarn_log_multiplier"):
        models.from_pretrained(str(tmp_path / "bad.gguf"))
