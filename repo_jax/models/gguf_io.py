"""GGUF files (llama.cpp) of the ``llama``, ``qwen2`` and ``qwen3`` architectures: config from
the metadata, tensors dequantised to float32 numpy with the ``gguf`` package, under their HF names.

llama.cpp stores a Llama's ``attn_q`` / ``attn_k`` rows permuted for its interleaved rotary
layout; they are permuted back to the HF "rotate half" layout here (as transformers' own GGUF
loader does). Qwen's use the "neox" layout, HF's own: no permutation.

Rope scaling: ``rope.scaling.type`` ``linear`` and ``yarn`` (factor, original context, YaRN's
betas) come as metadata; a Llama-3.x GGUF carries its ``llama3`` scaling as a ``rope_freqs``
tensor (one divisor per frequency), from which the band parameters are recovered
(:func:`llama3_from_freq_factors`) and checked to reproduce every divisor.
"""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path
from typing import Any

import numpy as np

from repo_jax.models.config import ModelConfig, yarn_mscale
from repo_jax.models.layers import rope_inv_freq

_TOP = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
        "output.weight": "lm_head.weight"}
_LAYER = {
    "attn_norm.weight": "input_layernorm.weight", "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight", "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight", "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight", "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias", "attn_k.bias": "self_attn.k_proj.bias",  # qwen2
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_q_norm.weight": "self_attn.q_norm.weight", "attn_k_norm.weight": "self_attn.k_norm.weight",  # qwen3
}
ARCHS = ("llama", "qwen2", "qwen3")
_ROPE_FREQS = "rope_freqs.weight"  # llama3 rope scaling, read into the config (not a parameter)
_SKIP_FIELDS = ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type", "tokenizer.ggml.scores")


def _reader(path: Path):
    import gguf

    return gguf.GGUFReader(str(path))


def _fields(reader) -> dict:
    out = {}
    for key, field in reader.fields.items():
        if key.startswith(_SKIP_FIELDS):
            continue
        try:
            out[key] = field.contents()
        except Exception:  # noqa: BLE001 -- exotic field types are irrelevant to the config
            continue
    return out


def _hf_name(gguf_name: str, where: Path) -> str:
    if gguf_name in _TOP:
        return _TOP[gguf_name]
    m = re.fullmatch(r"blk\.(\d+)\.(.+)", gguf_name)
    if not m or m.group(2) not in _LAYER:
        raise ValueError(f"{where}: unexpected GGUF tensor {gguf_name}")
    return f"model.layers.{m.group(1)}.{_LAYER[m.group(2)]}"


def _vocab_size(reader, fields) -> int:
    arch = fields.get("general.architecture")
    if f"{arch}.vocab_size" in fields:
        return int(fields[f"{arch}.vocab_size"])
    return len(reader.fields["tokenizer.ggml.tokens"].data)


def from_gguf_fields(fields: dict[str, Any], *, n_vocab: int, tied: bool, where: str) -> ModelConfig:
    """A ``ModelConfig`` from GGUF metadata (``general.architecture`` one of ``ARCHS``)."""
    arch = fields.get("general.architecture")
    if arch not in ARCHS:
        raise ValueError(f"{where}: GGUF architecture {arch!r} is not supported (one of {list(ARCHS)})")

    def get(key, default=None):
        if f"{arch}.{key}" in fields:
            return fields[f"{arch}.{key}"]
        if default is None:
            raise ValueError(f"{where}: GGUF metadata key '{arch}.{key}' is missing")
        return default

    heads = int(get("attention.head_count"))
    d = int(get("embedding_length"))
    kind = str(get("rope.scaling.type", "none"))
    if kind not in ("none", "linear", "yarn"):
        raise ValueError(f"{where}: GGUF rope scaling type {kind!r} is not supported (none, linear, yarn)")
    rope: dict[str, Any] = {}
    if kind != "none":
        for key in ("attn_factor", "yarn_ext_factor", "yarn_attn_factor", "yarn_log_multiplier"):
            if f"{arch}.rope.scaling.{key}" in fields:
                raise ValueError(f"{where}: GGUF key '{arch}.rope.scaling.{key}' is not supported (its attention "
                                 "scaling has no transformers equivalent here): load the HF folder instead")
        factor = float(get("rope.scaling.factor"))
        rope = dict(rope_type=kind, rope_factor=factor)
        if kind == "yarn":
            rope.update(rope_original_max_position=int(get("rope.scaling.original_context_length")),
                        rope_beta_fast=float(get("rope.scaling.yarn_beta_fast", 32.0)),
                        rope_beta_slow=float(get("rope.scaling.yarn_beta_slow", 1.0)),
                        rope_attention_factor=yarn_mscale(factor))
    return ModelConfig(
        arch="mistral",
        hf_model_type=arch,
        vocab_size=n_vocab,
        hidden_size=d,
        intermediate_size=int(get("feed_forward_length")),
        num_layers=int(get("block_count")),
        num_heads=heads,
        num_kv_heads=int(get("attention.head_count_kv", heads)),
        head_dim=int(get("attention.key_length", get("rope.dimension_count", d // heads))),
        rope_theta=float(get("rope.freq_base", 10000.0)),
        norm_eps=float(f'{float(get("attention.layer_norm_rms_epsilon")):.7g}'),  # stored as float32
        tie_word_embeddings=tied,
        qkv_bias=arch == "qwen2",
        qk_norm=arch == "qwen3",
        max_position_embeddings=int(get("context_length", 2048)),
        bos_token_id=fields.get("tokenizer.ggml.bos_token_id"),
        eos_token_id=fields.get("tokenizer.ggml.eos_token_id"),
        **rope,
    )


def llama3_from_freq_factors(cfg: ModelConfig, factors: np.ndarray, where: str) -> ModelConfig:
    """``cfg`` with the ``llama3`` rope scaling whose per-frequency divisors are ``factors``
    (llama.cpp's ``rope_freqs``: 1 in the high band, ``factor`` in the low band, ``1 / ((1 - s) /
    factor + s)`` between, ``s`` linear in ``1 / wavelength``). Only where the band's edges fall
    is fixed by the divisors, so ``low_freq_factor`` is taken as 1 and the rest solved for; the
    result must reproduce every divisor (rtol 1e-4), else the tensor is refused."""
    factors = np.asarray(factors, np.float64).reshape(-1)
    inv = rope_inv_freq(cfg.rotary_dim, cfg.rope_theta).astype(np.float64)
    if factors.shape != inv.shape:
        raise ValueError(f"{where}: rope_freqs has {factors.size} values, the rotary dims need {inv.size}")
    factor = float(factors.max())
    if factor <= 1.0 + 1e-6:
        return cfg
    x = inv / (2 * math.pi)  # 1 / wavelength
    s = (1.0 / factors - 1.0 / factor) / (1.0 - 1.0 / factor)  # 0: low band, 1: high band
    mid = (s > 1e-4) & (s < 1 - 1e-4)
    if mid.sum() >= 2:  # s = a x + b; low = 1 gives original = -a / b, high = 1 - 1 / b
        a, b = np.polyfit(x[mid], s[mid], 1)
        original, high = -a / b, 1.0 - 1.0 / b
    elif mid.sum() == 1:  # one point in the band: Llama-3.1's high = 4 x low places its edges
        original, high = float((3.0 * s[mid][0] + 1.0) / x[mid][0]), 4.0
    else:  # no point in the band: any edges between the scaled and the kept frequencies do
        kept, scaled = x[s >= 1 - 1e-4], x[s <= 1e-4]
        original, high = 1.0 / scaled.max(), 4.0
        if kept.size:  # the band's edges 1 / original and 4 / original between the two groups
            original = math.sqrt(original * 4.0 / kept.min())
    out = dataclasses.replace(cfg, rope_type="llama3", rope_factor=round(factor, 6), rope_low_freq_factor=1.0,
                              rope_high_freq_factor=float(round(high, 6)),
                              rope_original_max_position=int(round(original)))
    got = rope_inv_freq(out.rotary_dim, out.rope_theta, out.rope_scaling)
    if not np.allclose(got, inv / factors, rtol=1e-4, atol=0):
        raise ValueError(f"{where}: the rope_freqs tensor is not a llama3 rope scaling (largest relative "
                         f"difference {np.abs(got / (inv / factors) - 1).max():.2g}): load the HF folder instead")
    return out


def read_config(path: str | Path) -> ModelConfig:
    path = Path(path)
    reader = _reader(path)
    fields = _fields(reader)
    tied = not any(t.name == "output.weight" for t in reader.tensors)
    cfg = from_gguf_fields(fields, n_vocab=_vocab_size(reader, fields), tied=tied, where=str(path))
    freqs = [t for t in reader.tensors if t.name == _ROPE_FREQS]
    if freqs:
        if cfg.rope_type != "default":
            raise ValueError(f"{path}: both a rope_freqs tensor and rope.scaling.type {cfg.rope_type!r}")
        cfg = llama3_from_freq_factors(cfg, np.asarray(freqs[0].data, np.float32), str(path))
    return cfg


class GGUFTensors:
    """Tensors of a GGUF file by HF name; ``get`` dequantises one tensor on demand."""

    def __init__(self, path: str | Path, cfg: ModelConfig):
        self.path = Path(path)
        self.cfg = cfg
        self._reader = _reader(self.path)
        self._by_name = {_hf_name(t.name, self.path): t for t in self._reader.tensors if t.name != _ROPE_FREQS}

    def names(self) -> list[str]:
        return list(self._by_name)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(int(s) for s in reversed(self._by_name[name].shape))

    def get(self, name: str) -> np.ndarray:
        import gguf

        t = self._by_name[name]
        w = gguf.dequantize(t.data, t.tensor_type).astype(np.float32, copy=False)
        w = w.reshape(self.shape(name))
        if self.cfg.hf_model_type == "llama" and name.endswith("self_attn.q_proj.weight"):
            w = _unpermute(w, self.cfg.num_heads)
        elif self.cfg.hf_model_type == "llama" and name.endswith("self_attn.k_proj.weight"):
            w = _unpermute(w, self.cfg.num_kv_heads)
        return w


def _unpermute(w: np.ndarray, heads: int) -> np.ndarray:
    """Inverse of llama.cpp's ``permute``: interleaved rotary pairs -> two halves per head."""
    half = w.shape[0] // heads // 2
    return w.reshape(heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
