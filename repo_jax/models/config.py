"""Model configuration: one frozen dataclass for both architectures, read from and written to
HF ``config.json`` dicts (transformers-5 ``rope_parameters`` form and the older top-level form).
Reading files is the loaders' job (``convert.load_config``; GGUF metadata: ``gguf_io``), the
size arithmetic sits beside the parameter specs (``model.param_count``): this module imports
nothing from the package.

``arch`` picks the block: ``mistral`` (pre-norm RMSNorm, SwiGLU, grouped-query attention,
optional sliding window; also Llama-2/3.x, Qwen2/2.5 with ``qkv_bias`` and Qwen3 with
``qk_norm``) or ``phi`` (Phi-2: one LayerNorm feeding a parallel attention + MLP, partial
rotary, biases, ``gelu_new``). ``hf_model_type`` remembers the HF family (``llama``,
``mistral``, ``phi``, ``qwen2``, ``qwen3``) so ``save_pretrained`` writes what was read. Rotary
frequencies: ``rope_type`` ``default``, ``linear`` (divided by ``rope_factor``), ``dynamic`` (NTK:
the base grows with the batch's longest sequence past ``max_position_embeddings``), ``llama3``
(Llama-3.1's band-wise scaling by ``rope_factor`` with ``rope_low_freq_factor``,
``rope_high_freq_factor`` and ``rope_original_max_position``) or ``yarn`` (Qwen2.5 / Qwen3's long
context: ``rope_beta_fast``, ``rope_beta_slow``, ``rope_truncate``, and ``rope_attention_factor``
resolved from HF's ``attention_factor`` / ``mscale`` / ``mscale_all_dim`` at load).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal, NamedTuple

import jax.numpy as jnp

_HF_TYPES = {"llama": "mistral", "mistral": "mistral", "phi": "phi", "qwen2": "mistral", "qwen3": "mistral"}
_ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "phi": "PhiForCausalLM",
                  "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn")  # HF's rope_type values the ports compute
_ACTIVATIONS = ("silu", "gelu_new", "gelu_pytorch_tanh", "gelu")


class RopeScaling(NamedTuple):
    """HF's ``rope_parameters`` beyond theta (``ModelConfig.rope_scaling``; hashable, a static
    argument of the jitted programs). ``kind``: ``linear``, ``dynamic``, ``llama3`` or ``yarn``;
    ``original``: the pretraining context (``original_max_position_embeddings``; for ``dynamic``
    HF's ``max_position_embeddings``)."""

    kind: str
    factor: float
    original: int
    low_freq: float = 1.0  # llama3
    high_freq: float = 4.0
    beta_fast: float = 32.0  # yarn
    beta_slow: float = 1.0
    truncate: bool = True
    attention_factor: float = 1.0  # yarn: multiplies sin and cos


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """LoRA adapters on the layers' projections (``repo_jax.models.lora``); ``rank`` 0 = off.
    An adapted projection computes ``x W + (alpha / rank) * dropout(x) A B``.

    rank: the adapters' rank ``J``; 0 = no adapters (every weight trains).
    alpha: the adapters' scale is ``alpha / rank``.
    dropout: the dropout rate on the adapters' input ``x`` in training steps (0 = none).
    targets: regular expressions, each matched whole against a layer parameter's name
    (``wq``, ``w_down``, ...) or its HF module name (``self_attn.q_proj``, ``mlp.down_proj``,
    ``mlp.fc1``); ``attention`` (the default) is the four attention projections q, k, v, o,
    ``all-linear`` (PEFT's term) every projection of a layer, the MLP's too. On SmolLM2 at rank
    16, ``attention`` trains 1.4% of the parameters and an update takes 0.66x the full one's
    time, ``all-linear`` 3.6% and 0.80x (``bench train --lora``); the LoRA recipes use
    ``attention`` (docs/results.md section 6: at 30x the full fine-tuning rate it matched full
    fine-tuning at equal KL on the default task; ``all-linear`` at that rate overshot).
    """

    rank: int = 0
    alpha: float = 16.0
    targets: tuple[str, ...] = ("attention",)
    dropout: float = 0.0

    def __post_init__(self):
        if self.rank < 0:
            raise ValueError(f"model.lora.rank must be >= 0, got {self.rank}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"model.lora.dropout must be in [0, 1), got {self.dropout}")
        if self.rank and not self.targets:
            raise ValueError("model.lora.targets is empty: name the projections to adapt (e.g. [all-linear])")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank if self.rank else 0.0


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Everything that fixes the parameter shapes and the forward computation.

    ``param_dtype`` is the storage dtype of the weights, ``dtype`` the compute dtype of
    activations and matmul inputs (matmuls accumulate in float32; norms, softmax and logits are
    float32 whatever either says). ``remat`` is per-layer rematerialisation in the backward pass:
    ``none``, ``full`` (keep only each layer's input) or ``dots`` (keep matmul outputs).
    ``lora`` adds low-rank adapters to the layers (``repo_jax.models.lora``); HF's config knows
    nothing of them (``to_hf_dict`` leaves them out).
    """

    arch: Literal["mistral", "phi"] = "mistral"
    hf_model_type: str = "mistral"
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 14336
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int = 8
    head_dim: int = 128
    rope_theta: float = 10000.0
    partial_rotary_factor: float = 1.0
    norm_eps: float = 1e-5
    hidden_act: str = "silu"
    sliding_window: int | None = None
    tie_word_embeddings: bool = False
    qk_layernorm: bool = False
    qkv_bias: bool = False
    qk_norm: bool = False
    rope_type: str = "default"
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_position: int = 8192
    rope_beta_fast: float = 32.0
    rope_beta_slow: float = 1.0
    rope_truncate: bool = True
    rope_attention_factor: float = 1.0
    max_position_embeddings: int = 32768
    bos_token_id: int | None = 1
    eos_token_id: int | None = 2
    param_dtype: str = "float32"
    dtype: str = "float32"
    remat: Literal["none", "full", "dots"] = "none"
    lora: LoraConfig = LoraConfig()

    def __post_init__(self):
        if self.arch not in ("mistral", "phi"):
            raise ValueError(f"model config: arch must be 'mistral' or 'phi', got {self.arch!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"model config: num_attention_heads ({self.num_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_kv_heads})"
            )
        if self.hidden_act not in _ACTIVATIONS:
            raise ValueError(f"model config: hidden_act {self.hidden_act!r} is not one of {_ACTIVATIONS}")
        if self.rope_type not in ROPE_TYPES:
            raise ValueError(f"model config: rope_type {self.rope_type!r} is not one of {ROPE_TYPES}")
        if self.remat not in ("none", "full", "dots"):
            raise ValueError(f"model config: remat must be none, full or dots, got {self.remat!r}")

    @property
    def rotary_dim(self) -> int:
        """Leading head dimensions that are rotated (Phi-2 rotates 32 of 80)."""
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def rope_scaling(self):
        """What ``layers.rope_angles`` needs beyond theta and the rotary dims: a hashable
        :class:`RopeScaling`, or None for ``default``."""
        if self.rope_type == "default":
            return None
        original = self.max_position_embeddings if self.rope_type == "dynamic" else self.rope_original_max_position
        return RopeScaling(self.rope_type, self.rope_factor, original, self.rope_low_freq_factor,
                           self.rope_high_freq_factor, self.rope_beta_fast, self.rope_beta_slow, self.rope_truncate,
                           self.rope_attention_factor if self.rope_type == "yarn" else 1.0)

    @property
    def jnp_param_dtype(self):
        return jnp.dtype(self.param_dtype)

    @property
    def jnp_dtype(self):
        return jnp.dtype(self.dtype)

    def replace(self, **changes) -> ModelConfig:
        return dataclasses.replace(self, **changes)


def from_hf_dict(hf: dict[str, Any], *, where: str = "config.json", **overrides) -> ModelConfig:
    """A ``ModelConfig`` from a parsed HF ``config.json`` (either rope form)."""
    model_type = hf.get("model_type")
    if model_type not in _HF_TYPES:
        raise ValueError(f"{where}: model_type {model_type!r} is not supported (one of {sorted(_HF_TYPES)})")
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
        if key not in hf:
            raise ValueError(f"{where}: missing key {key!r}")
    rope = dict(hf.get("rope_scaling") or {}) | dict(hf.get("rope_parameters") or {})
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise ValueError(f"{where}: rope_type {rope_type!r} is not supported (one of {list(ROPE_TYPES)}; "
                         "'longrope' comes with Phi-3 checkpoints)")
    if hf.get("mlp_bias"):
        raise ValueError(f"{where}: mlp_bias is not supported (Llama-architecture checkpoints with MLP biases)")
    if hf.get("attention_bias") and model_type in ("llama", "mistral", "qwen3"):
        raise ValueError(f"{where}: attention_bias is not supported for {model_type} (the q, k, v biases of "
                         "qwen2 are; an o_proj bias is not)")
    if hf.get("use_sliding_window"):
        raise ValueError(f"{where}: use_sliding_window=true is not supported for {model_type} (a window on the "
                         f"layers from max_window_layers={hf.get('max_window_layers')} on)")
    arch = _HF_TYPES[model_type]
    heads = hf["num_attention_heads"]
    max_position = hf.get("max_position_embeddings", 2048)
    eps_key = "layer_norm_eps" if arch == "phi" else "rms_norm_eps"
    kw = dict(
        arch=arch,
        hf_model_type=model_type,
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
        rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
        partial_rotary_factor=float(rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))),
        norm_eps=float(hf.get(eps_key, 1e-5)),
        hidden_act=hf.get("hidden_act", "gelu_new" if arch == "phi" else "silu"),
        sliding_window=hf.get("sliding_window") if model_type == "mistral" else None,
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        qk_layernorm=bool(hf.get("qk_layernorm", False)),
        qkv_bias=model_type == "qwen2",
        qk_norm=model_type == "qwen3",
        max_position_embeddings=max_position,
        **_rope_fields(rope_type, rope, hf, max_position),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_id=hf.get("eos_token_id") if not isinstance(hf.get("eos_token_id"), list) else hf["eos_token_id"][0],
    )
    kw.update(overrides)
    return ModelConfig(**kw)


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def _rope_fields(rope_type: str, rope: dict[str, Any], hf: dict[str, Any], max_position: int) -> dict[str, Any]:
    """The ``rope_*`` fields from HF's rope parameters, defaults filled in as transformers does
    (the original context defaults to ``max_position_embeddings``; YaRN's factor to
    ``max_position_embeddings / original``, its attention factor to YaRN's ``mscale``)."""
    original = int(hf.get("original_max_position_embeddings") or rope.get("original_max_position_embeddings")
                   or max_position)
    factor = rope.get("factor")
    factor = float(max_position / original if factor is None and rope_type == "yarn" else factor or 1.0)
    out = dict(rope_type=rope_type, rope_factor=factor, rope_original_max_position=original,
               rope_low_freq_factor=float(rope.get("low_freq_factor", 1.0)),
               rope_high_freq_factor=float(rope.get("high_freq_factor", 4.0)))
    if rope_type == "yarn":
        attention = rope.get("attention_factor")
        if attention is None:
            mscale, mscale_all = rope.get("mscale"), rope.get("mscale_all_dim")
            attention = (yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all) if mscale and mscale_all
                         else yarn_mscale(factor))
        out.update(rope_beta_fast=float(rope.get("beta_fast") or 32.0), rope_beta_slow=float(rope.get("beta_slow") or 1.0),
                   rope_truncate=bool(rope.get("truncate", True)), rope_attention_factor=float(attention))
    return out


def to_hf_dict(cfg: ModelConfig) -> dict[str, Any]:
    """The HF ``config.json`` for ``cfg`` (transformers-5 form, readable by 4.x too)."""
    out: dict[str, Any] = {
        "architectures": [_ARCHITECTURES[cfg.hf_model_type]],
        "model_type": cfg.hf_model_type,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": cfg.hidden_act,
        "max_position_embeddings": cfg.max_position_embeddings,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_id,
        "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": cfg.rope_type, "rope_theta": cfg.rope_theta},
        "torch_dtype": cfg.param_dtype,
        "dtype": cfg.param_dtype,
    }
    if cfg.arch == "phi":
        out["rope_parameters"]["partial_rotary_factor"] = cfg.partial_rotary_factor
        out.update(partial_rotary_factor=cfg.partial_rotary_factor, layer_norm_eps=cfg.norm_eps,
                   qk_layernorm=cfg.qk_layernorm, resid_pdrop=0.0, embd_pdrop=0.0, attention_dropout=0.0)
    else:
        out.update(rms_norm_eps=cfg.norm_eps, attention_bias=False, mlp_bias=False)
        if cfg.hf_model_type == "mistral":
            out["sliding_window"] = cfg.sliding_window
        if cfg.hf_model_type in ("qwen2", "qwen3"):
            out.update(use_sliding_window=False, sliding_window=None, max_window_layers=cfg.num_layers)
    if cfg.rope_type != "default":
        scaling = {"rope_type": cfg.rope_type, "factor": cfg.rope_factor}
        if cfg.rope_type == "llama3":
            scaling.update(low_freq_factor=cfg.rope_low_freq_factor, high_freq_factor=cfg.rope_high_freq_factor,
                           original_max_position_embeddings=cfg.rope_original_max_position)
        if cfg.rope_type == "yarn":
            scaling.update(original_max_position_embeddings=cfg.rope_original_max_position,
                           beta_fast=cfg.rope_beta_fast, beta_slow=cfg.rope_beta_slow, truncate=cfg.rope_truncate,
                           attention_factor=cfg.rope_attention_factor)
        out["rope_parameters"].update(scaling)
        out["rope_scaling"] = scaling  # the transformers-4 key
    return out
