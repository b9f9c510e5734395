"""Mistral / Llama / Qwen decoder block: pre-norm RMSNorm, grouped-query attention with rotary
embeddings (and Mistral's sliding window when ``sliding_window`` is set), SwiGLU MLP; Qwen2's
q, k, v biases (``qkv_bias``) and Qwen3's per-head RMSNorm of q and k (``qk_norm``).

Parameter layout (one layer; stacked with a leading ``layers`` axis) and the HF tensors they
come from are listed in ``layer_specs`` / ``top_specs`` (see ``spec.ParamSpec``).
"""

from __future__ import annotations

from repo_jax import sharding as shd
from repo_jax.models import layers
from repo_jax.models.config import ModelConfig
from repo_jax.models.spec import ParamSpec


def layer_specs(cfg: ModelConfig) -> dict[str, ParamSpec]:
    d, n, g, h, f = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.intermediate_size
    out = {
        "attn_norm": ParamSpec((d,), ("norm",), "ones", "input_layernorm.weight"),
        "wq": ParamSpec((d, n, h), ("embed", "q_heads", "head_dim"), "normal", "self_attn.q_proj.weight", 1),
        "wk": ParamSpec((d, g, h), ("embed", "kv_heads", "head_dim"), "normal", "self_attn.k_proj.weight", 1),
        "wv": ParamSpec((d, g, h), ("embed", "kv_heads", "head_dim"), "normal", "self_attn.v_proj.weight", 1),
        "wo": ParamSpec((n, h, d), ("q_heads", "head_dim", "embed"), "normal", "self_attn.o_proj.weight", 2),
        "mlp_norm": ParamSpec((d,), ("norm",), "ones", "post_attention_layernorm.weight"),
        "w_gate": ParamSpec((d, f), ("embed", "mlp"), "normal", "mlp.gate_proj.weight", 1),
        "w_up": ParamSpec((d, f), ("embed", "mlp"), "normal", "mlp.up_proj.weight", 1),
        "w_down": ParamSpec((f, d), ("mlp", "embed"), "normal", "mlp.down_proj.weight", 1),
    }
    if cfg.qkv_bias:  # Qwen2 / Qwen2.5
        out["bq"] = ParamSpec((n, h), ("q_heads", "head_dim"), "zeros", "self_attn.q_proj.bias", 0)
        out["bk"] = ParamSpec((g, h), ("kv_heads", "head_dim"), "zeros", "self_attn.k_proj.bias", 0)
        out["bv"] = ParamSpec((g, h), ("kv_heads", "head_dim"), "zeros", "self_attn.v_proj.bias", 0)
    if cfg.qk_norm:  # Qwen3: RMSNorm over each head's features, before the rotary embedding
        out["q_norm"] = ParamSpec((h,), ("norm",), "ones", "self_attn.q_norm.weight")
        out["k_norm"] = ParamSpec((h,), ("norm",), "ones", "self_attn.k_norm.weight")
    return out


def top_specs(cfg: ModelConfig) -> dict[str, ParamSpec]:
    d, v = cfg.hidden_size, cfg.vocab_size
    out = {
        "embed": ParamSpec((v, d), ("vocab", "embed"), "normal", "model.embed_tokens.weight"),
        "final_norm": ParamSpec((d,), ("norm",), "ones", "model.norm.weight"),
    }
    if not cfg.tie_word_embeddings:
        out["lm_head"] = ParamSpec((d, v), ("embed", "vocab"), "normal", "lm_head.weight", 1)
    return out


def block(cfg: ModelConfig, p, x_BxTxD, attend):
    """One decoder layer: pre-norm attention through ``attend(q, k, v) -> (o, cache)`` (the
    model's, with or without a KV cache), then a pre-norm SwiGLU MLP; returns ``(x, cache)``."""
    dt = cfg.jnp_dtype
    proj = lambda name, spec: (p[name], spec, layers.adapter_of(p, name, cfg.lora))
    h_BxTxD = layers.rms_norm(x_BxTxD, p["attn_norm"], cfg.norm_eps, dt)
    q, k, v = layers.project_shared(h_BxTxD, [proj("wq", "BTD,DNH->BTNH"), proj("wk", "BTD,DGH->BTGH"),
                                              proj("wv", "BTD,DGH->BTGH")], dt)
    if cfg.qkv_bias:
        q, k, v = q + p["bq"].astype(dt), k + p["bk"].astype(dt), v + p["bv"].astype(dt)
    if cfg.qk_norm:
        q, k = layers.rms_norm(q, p["q_norm"], cfg.norm_eps, dt), layers.rms_norm(k, p["k_norm"], cfg.norm_eps, dt)
    o_BxTxNxH, cache_kv = attend(q, k, v)
    x_BxTxD = x_BxTxD + layers.out_proj(o_BxTxNxH, p["wo"], dt, layers.adapter_of(p, "wo", cfg.lora))
    x_BxTxD = shd.constrain(x_BxTxD, ("batch", "length", "act_embed"))

    h_BxTxD = layers.rms_norm(x_BxTxD, p["mlp_norm"], cfg.norm_eps, dt)
    gate_BxTxF, up_BxTxF = layers.project_shared(h_BxTxD, [proj("w_gate", "BTD,DF->BTF"), proj("w_up", "BTD,DF->BTF")], dt)
    up_BxTxF = shd.constrain(layers.activation(cfg.hidden_act)(gate_BxTxF) * up_BxTxF, ("batch", "length", "act_mlp"))
    w_down, spec, adapter = proj("w_down", "BTF,FD->BTD")
    x_BxTxD = x_BxTxD + layers.project(up_BxTxF, w_down, spec, dt, adapter)
    return shd.constrain(x_BxTxD, ("batch", "length", "act_embed")), cache_kv


def final_norm(cfg: ModelConfig, top, x_BxTxD):
    return layers.rms_norm(x_BxTxD, top["final_norm"], cfg.norm_eps, cfg.jnp_dtype)


def unembedding(cfg: ModelConfig, top):
    """``(w_DxV, b_V)``; tied checkpoints (SmolLM2) unembed with the embedding matrix."""
    w_DxV = top["embed"].T if cfg.tie_word_embeddings else top["lm_head"]
    return w_DxV, None
