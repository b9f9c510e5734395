"""GGUF files (llama.cpp) of the ``llama``, ``qwen2`` and ``qwen3`` architectures: config from
the metadata, tensors dequantised to float32 numpy with the ``gguf`` package, under their HF names.

llama.cpp stores a Llama's ``attn_q`` / ``attn_k`` rows permuted for its interleaved rotary
layout; they are permuted back to the HF "rotate half" layout here (as transformers' own GGUF
loader does). Qwen's use the "neox" layout, HF's own: no permutation. A Llama-3.1 GGUF carries
its rope scaling as a ``rope_freqs`` tensor, not as fields: refused (load the HF folder).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np

from repo_jax.models.config import ModelConfig

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
    )


def read_config(path: str | Path) -> ModelConfig:
    path = Path(path)
    reader = _reader(path)
    fields = _fields(reader)
    tied = not any(t.name == "output.weight" for t in reader.tensors)
    if any(t.name == "rope_freqs.weight" for t in reader.tensors):
        raise ValueError(f"{path}: the GGUF carries rope scaling as a rope_freqs tensor (llama.cpp's form of "
                         "Llama-3.1's rope_type llama3), which is not supported: load the HF folder instead")
    return from_gguf_fields(fields, n_vocab=_vocab_size(reader, fields), tied=tied, where=str(path))


class GGUFTensors:
    """Tensors of a GGUF file by HF name; ``get`` dequantises one tensor on demand."""

    def __init__(self, path: str | Path, cfg: ModelConfig):
        self.path = Path(path)
        self.cfg = cfg
        self._reader = _reader(self.path)
        self._by_name = {_hf_name(t.name, self.path): t for t in self._reader.tensors}

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
