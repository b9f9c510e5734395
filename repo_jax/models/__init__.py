"""Flax NNX ports of Mistral / Llama and Phi-2, with HF safetensors and GGUF conversion.

``from_pretrained(path)`` loads an HF folder, a ``.gguf`` file or the alias ``smollm2``;
``save_pretrained(model, path)`` writes a folder transformers loads; ``build(config)`` makes a
randomly initialised model. See ``model.py`` for the forward entry points.
"""

from repo_jax.models.config import ModelConfig
from repo_jax.models.convert import from_pretrained, load_config, save_pretrained
from repo_jax.models.layers import KVCache, LayerKVCache
from repo_jax.models.model import CausalLM, DecodeLM, build, flops_per_token, param_count, param_specs

__all__ = [
    "CausalLM", "DecodeLM", "KVCache", "LayerKVCache", "ModelConfig", "build", "flops_per_token", "from_pretrained", "load_config",
    "param_count", "param_specs", "save_pretrained",
]
