"""Phi-2 decoder block: one LayerNorm feeding attention and MLP in parallel
(``x + attn(ln(x)) + mlp(ln(x))``), partial rotary embeddings (the first
``partial_rotary_factor * head_dim`` features of each head), biases on every projection,
optional LayerNorm on queries and keys (``qk_layernorm``), ``gelu_new`` MLP, a final LayerNorm
and an ``lm_head`` with bias.
"""

from __future__ import annotations

from repo_jax import sharding as shd
from repo_jax.models import layers
from repo_jax.models.config import ModelConfig
from repo_jax.models.spec import ParamSpec


def layer_specs(cfg: ModelConfig) -> dict[str, ParamSpec]:
    d, n, g, h, f = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.intermediate_size
    out = {
        "ln_scale": ParamSpec((d,), ("norm",), "ones", "input_layernorm.weight"),
        "ln_bias": ParamSpec((d,), ("norm",), "zeros", "input_layernorm.bias"),
        "wq": ParamSpec((d, n, h), ("embed", "q_heads", "head_dim"), "normal", "self_attn.q_proj.weight", 1),
        "bq": ParamSpec((n, h), ("q_heads", "head_dim"), "zeros", "self_attn.q_proj.bias", 0),
        "wk": ParamSpec((d, g, h), ("embed", "kv_heads", "head_dim"), "normal", "self_attn.k_proj.weight", 1),
        "bk": ParamSpec((g, h), ("kv_heads", "head_dim"), "zeros", "self_attn.k_proj.bias", 0),
        "wv": ParamSpec((d, g, h), ("embed", "kv_heads", "head_dim"), "normal", "self_attn.v_proj.weight", 1),
        "bv": ParamSpec((g, h), ("kv_heads", "head_dim"), "zeros", "self_attn.v_proj.bias", 0),
        "wo": ParamSpec((n, h, d), ("q_heads", "head_dim", "embed"), "normal", "self_attn.dense.weight", 2),
        "bo": ParamSpec((d,), ("embed",), "zeros", "self_attn.dense.bias"),
        "w_fc1": ParamSpec((d, f), ("embed", "mlp"), "normal", "mlp.fc1.weight", 1),
        "b_fc1": ParamSpec((f,), ("mlp",), "zeros", "mlp.fc1.bias"),
        "w_fc2": ParamSpec((f, d), ("mlp", "embed"), "normal", "mlp.fc2.weight", 1),
        "b_fc2": ParamSpec((d,), ("embed",), "zeros", "mlp.fc2.bias"),
    }
    if cfg.qk_layernorm:  # HF sizes these hidden_size // num_heads, i.e. head_dim
        for who in ("q", "k"):
            out[f"{who}_norm_scale"] = ParamSpec((h,), ("norm",), "ones", f"self_attn.{who}_layernorm.weight")
            out[f"{who}_norm_bias"] = ParamSpec((h,), ("norm",), "zeros", f"self_attn.{who}_layernorm.bias")
    return out


def top_specs(cfg: ModelConfig) -> dict[str, ParamSpec]:
    d, v = cfg.hidden_size, cfg.vocab_size
    out = {
        "embed": ParamSpec((v, d), ("vocab", "embed"), "normal", "model.embed_tokens.weight"),
        "final_ln_scale": ParamSpec((d,), ("norm",), "ones", "model.final_layernorm.weight"),
        "final_ln_bias": ParamSpec((d,), ("norm",), "zeros", "model.final_layernorm.bias"),
        "lm_head_bias": ParamSpec((v,), ("vocab",), "zeros", "lm_head.bias"),
    }
    if not cfg.tie_word_embeddings:
        out["lm_head"] = ParamSpec((d, v), ("embed", "vocab"), "normal", "lm_head.weight", 1)
    return out


def block(cfg: ModelConfig, p, x_BxTxD, attend):
    """One parallel layer: attention (``attend(q, k, v) -> (o, cache)``, the model's) and the MLP
    both read one LayerNorm of the residual and add to it; returns ``(x, cache)``."""
    dt = cfg.jnp_dtype
    proj = lambda name, spec: (p[name], spec, layers.adapter_of(p, name, cfg.lora))
    h_BxTxD = layers.layer_norm(x_BxTxD, p["ln_scale"], p["ln_bias"], cfg.norm_eps, dt)
    # attention and the MLP read the same normalised input: one projection call for q, k, v, fc1
    q, k, v, fc1_BxTxF = layers.project_shared(h_BxTxD, [
        proj("wq", "BTD,DNH->BTNH"), proj("wk", "BTD,DGH->BTGH"), proj("wv", "BTD,DGH->BTGH"),
        proj("w_fc1", "BTD,DF->BTF")], dt)
    q, k, v = q + p["bq"].astype(dt), k + p["bk"].astype(dt), v + p["bv"].astype(dt)
    if cfg.qk_layernorm:
        q = layers.layer_norm(q, p["q_norm_scale"], p["q_norm_bias"], cfg.norm_eps, dt)
        k = layers.layer_norm(k, p["k_norm_scale"], p["k_norm_bias"], cfg.norm_eps, dt)
    o_BxTxNxH, cache_kv = attend(q, k, v)
    attn_BxTxD = layers.out_proj(o_BxTxNxH, p["wo"], dt, layers.adapter_of(p, "wo", cfg.lora)) + p["bo"].astype(dt)

    fc1_BxTxF = fc1_BxTxF + p["b_fc1"].astype(dt)
    fc1_BxTxF = shd.constrain(layers.activation(cfg.hidden_act)(fc1_BxTxF), ("batch", "length", "act_mlp"))
    w_fc2, spec, adapter = proj("w_fc2", "BTF,FD->BTD")
    mlp_BxTxD = layers.project(fc1_BxTxF, w_fc2, spec, dt, adapter) + p["b_fc2"].astype(dt)
    return shd.constrain(x_BxTxD + attn_BxTxD + mlp_BxTxD, ("batch", "length", "act_embed")), cache_kv


def final_norm(cfg: ModelConfig, top, x_BxTxD):
    return layers.layer_norm(x_BxTxD, top["final_ln_scale"], top["final_ln_bias"], cfg.norm_eps, cfg.jnp_dtype)


def unembedding(cfg: ModelConfig, top):
    w_DxV = top["embed"].T if cfg.tie_word_embeddings else top["lm_head"]
    return w_DxV, top["lm_head_bias"]
