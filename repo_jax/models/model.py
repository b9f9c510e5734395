"""The causal LM module shared by both architectures: embeddings, a scanned stack of layers,
final norm and unembedding.

Parameters are ``nnx.Param`` arrays whose metadata ``out_sharding`` holds logical axis names;
layer parameters are stacked along a leading ``layers`` axis and the stack is a single
``jax.lax.scan`` (a 32-layer model compiles one layer), optionally rematerialised per layer.

Forward entry points (``B`` batch, ``T`` tokens, left padding allowed):

* ``model(input_ids_BxT, positions_BxT=None, attention_mask_BxT=None, segment_ids_BxT=None) ->
  logits_BxTxV`` (float32; segment ids give shared-prefix rows, see ``hidden_states``);
* ``model.hidden_states(...) -> h_BxTxD`` (final norm applied) and ``model.unembedding() ->
  (w_DxV, b_V | None)``: what the chunked log-prob kernel consumes;
* ``model.init_cache(B, S)`` and ``model.forward_with_cache(ids, positions, mask, cache, index)
  -> (logits, cache)``: prefill / one-token decode for the sampler; the ``T`` new tokens go to
  cache slots ``index .. index + T - 1``; attention is causal by position, not slot (the
  sampler's decode slots are a ring, see ``layers.make_cache_context``).

Decoding layout: ``model.unstacked()`` returns a :class:`DecodeLM`, the same model with one
parameter dict per layer (an ``nnx.List``) and a cache of per-layer buffers; its forward is a
Python loop over layers.
On CPU a decode step is bound by streaming the weights from memory, and a ``scan`` over the
stacked arrays materialises each layer's slice (a copy of every weight per token) and each
layer's cache slice; the unrolled form reads weights in place and updates each layer's cache
buffer in place (1.5x faster per decoded token for SmolLM2-135M at batch 16: 137 -> 90 ms). The
sampler uses it on CPU only (see ``sampling.decoding_model``). Training keeps the stacked
``scan`` (one layer compiled, remat per layer).

Without ``positions``, they count real tokens (``cumsum(mask) - 1``), so left padding never
shifts the rotary phase.
"""

from __future__ import annotations

import math
import types

import jax
import jax.numpy as jnp
from flax import nnx

from repo_jax import sharding as shd
from repo_jax.padding import positions_from_mask
from repo_jax.models import layers, mistral, phi
from repo_jax.models import lora as lora_lib
from repo_jax.models.config import ModelConfig
from repo_jax.models.spec import ParamSpec

ARCHS: dict[str, types.ModuleType] = {"mistral": mistral, "phi": phi}

_REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def param_specs(cfg: ModelConfig) -> tuple[dict[str, ParamSpec], dict[str, ParamSpec]]:
    """``(per-layer specs, top-level specs)`` of ``cfg``'s architecture."""
    arch = ARCHS[cfg.arch]
    return arch.layer_specs(cfg), arch.top_specs(cfg)


def param_count(cfg: ModelConfig) -> int:
    """Number of parameters (embeddings and head included), from the shapes alone."""
    layer, top = param_specs(cfg)
    count = sum(math.prod(s.shape) for s in top.values())
    return count + cfg.num_layers * sum(math.prod(s.shape) for s in layer.values())


def flops_per_token(cfg: ModelConfig, seq_len: int, *, training: bool = True) -> float:
    """Matmul FLOPs per token: ``2 * (weights touched) + attention``, times 3 with the backward.

    Attention scores and the weighted sum cost ``2 * 2 * T * N * H`` per token per layer for a
    full ``T x T`` score matrix (causal masking is not subtracted, as in the PaLM MFU convention).
    The embedding gather is free; the unembedding matmul counts. With LoRA the frozen weights
    take no weight gradient (forward + input gradient: 2 passes, not 3) and the adapters add
    their own ``2 * count`` per pass (3 passes).
    """
    n_matmul = param_count(cfg) - cfg.vocab_size * cfg.hidden_size * (0 if cfg.tie_word_embeddings else 1)
    window = min(seq_len, cfg.sliding_window or seq_len)
    attn = 4 * cfg.num_layers * window * cfg.num_heads * cfg.head_dim
    adapters = 2 * lora_lib.param_count(cfg)
    if not training:
        return float(2 * n_matmul + attn + adapters)
    return float((2 if cfg.lora.rank else 3) * 2 * n_matmul + 3 * attn + 3 * adapters)


def _init(spec: ParamSpec, shape, key, dtype):
    if spec.init == "ones":
        return jnp.ones(shape, dtype)
    if spec.init == "zeros":
        return jnp.zeros(shape, dtype)
    return (0.02 * jax.random.normal(key, shape, jnp.float32)).astype(dtype)


class _LanguageModel(nnx.Module):
    """What both layouts share: the top-level parameters (embedding, final norm, unembedding),
    the attention context, the full forward (``__call__``, ``hidden_states``) and
    ``forward_with_cache``; a layout supplies its layers (``_layers_full``, ``_layers_cached``)
    and its cache (``init_cache``)."""

    config: ModelConfig

    def _top(self):
        return {k: v[...] for k, v in self.top.items()}

    def unembedding(self):
        """``(w_DxV, b_V or None)`` in the parameter dtype."""
        return ARCHS[self.config.arch].unembedding(self.config, self._top())

    def _embed(self, input_ids_BxT):
        # The lookup reads the table gathered over ``embed`` (as FSDP gathers every weight), still
        # split over ``vocab``: from an ``embed``-sharded table into batch-sharded rows XLA cannot
        # partition the gather, and replicates the whole table with an "involuntary full
        # rematerialization" warning.
        table_VxD = shd.constrain(self.top["embed"][...], ("vocab", None))
        x = jnp.take(table_VxD, input_ids_BxT, axis=0).astype(self.config.jnp_dtype)
        return shd.constrain(x, ("batch", "length", "act_embed"))

    def _context(self, positions_BxT, key_pos_BxS, index, segment_ids_BxT=None):
        cfg = self.config
        return layers.make_context(
            positions_BxT, key_pos_BxS, index,
            rotary_dim=cfg.rotary_dim, theta=cfg.rope_theta, window=cfg.sliding_window, segment_ids_BxT=segment_ids_BxT,
            rope_scaling=cfg.rope_scaling,
        )

    def _cache_context(self, positions_BxT, key_pos_BxS):
        cfg = self.config
        return layers.make_cache_context(positions_BxT, key_pos_BxS, rotary_dim=cfg.rotary_dim,
                                         theta=cfg.rope_theta, window=cfg.sliding_window,
                                         rope_scaling=cfg.rope_scaling)

    def logits(self, h_BxTxD):
        """Float32 logits of hidden states (the full ``[B, T, V]``: use ``logprobs`` for training)."""
        w_DxV, b_V = self.unembedding()
        logits = layers.matmul("BTD,DV->BTV", h_BxTxD, w_DxV, h_BxTxD.dtype)
        return logits if b_V is None else logits + b_V.astype(jnp.float32)

    def hidden_states(self, input_ids_BxT, positions_BxT=None, attention_mask_BxT=None, segment_ids_BxT=None,
                      dropout_key=None):
        """Final hidden states ``[B, T, D]`` (after the final norm), compute dtype.

        ``segment_ids_BxT`` (with ``positions_BxT``): shared-prefix rows, one prompt (segment 0)
        then several responses (segments 1, 2, ...) attending block-causally (see
        :func:`layers.make_context`); ``-1`` marks padding when ``attention_mask_BxT`` is None.
        ``dropout_key``: applies ``config.lora.dropout`` to the adapters' inputs (training);
        without it the forward is deterministic."""
        if segment_ids_BxT is not None and attention_mask_BxT is None:
            attention_mask_BxT = (segment_ids_BxT >= 0).astype(jnp.int32)
        mask, positions = _defaults(input_ids_BxT, positions_BxT, attention_mask_BxT)
        ctx = self._context(positions, layers.key_positions(positions, mask), 0, segment_ids_BxT)
        x = self._layers_full(self._embed(input_ids_BxT), ctx, dropout_key)
        return ARCHS[self.config.arch].final_norm(self.config, self._top(), x)

    def __call__(self, input_ids_BxT, positions_BxT=None, attention_mask_BxT=None, segment_ids_BxT=None):
        return self.logits(self.hidden_states(input_ids_BxT, positions_BxT, attention_mask_BxT, segment_ids_BxT))

    def forward_with_cache(self, input_ids_BxT, positions_BxT, attention_mask_BxT, cache, index,
                           *, last_only: bool = False):
        """Runs ``T`` new tokens at cache slots ``index ..``; returns float32 logits and the new cache.

        ``last_only``: logits of the last position only (``[B, 1, V]``), what a prefill needs;
        spares the ``T x V`` unembedding of the prompt.
        """
        index = jnp.asarray(index, jnp.int32)
        new_pos_BxT = layers.key_positions(positions_BxT, attention_mask_BxT)
        pos_BxS = jax.lax.dynamic_update_slice(cache.pos_BxS, new_pos_BxT, (jnp.int32(0), index))
        ctx = self._cache_context(positions_BxT, pos_BxS)
        x, cache = self._layers_cached(self._embed(input_ids_BxT), ctx, cache.replace(pos_BxS=pos_BxS), index)
        x = x[:, -1:] if last_only else x
        h = ARCHS[self.config.arch].final_norm(self.config, self._top(), x)
        return self.logits(h), cache


class CausalLM(_LanguageModel):
    """Mistral/Llama or Phi-2, chosen by ``config.arch``, in the training layout: every layer
    parameter stacked along a leading ``layers`` axis, the stack one ``scan``."""

    is_unstacked = False

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.config = config
        layer, top = param_specs(config)
        dt = config.jnp_param_dtype
        self.top = nnx.Dict({
            name: nnx.Param(_init(s, s.shape, rngs.params(), dt), eager_sharding=False, out_sharding=s.names)
            for name, s in top.items()
        })
        n = config.num_layers
        self.layers = nnx.Dict({
            name: nnx.Param(_init(s, (n, *s.shape), rngs.params(), dt), eager_sharding=False,
                            out_sharding=("layers", *s.names))
            for name, s in layer.items()
        })
        if config.lora.rank:
            self.lora = lora_lib.make_adapters(config, rngs.params())

    def unstacked(self) -> "DecodeLM":
        """The decoding layout of this model (a copy of the weights, one dict per layer; see the
        module doc; LoRA adapters folded in). Call it outside ``jit``."""
        return DecodeLM(lora_lib.merge(self))

    def _scan(self, x_BxTxD, ctx, kv, index, dropout_key=None):
        """The layers as one ``scan``; ``kv``: ``None``, or the stacked ``(k, v)`` cache buffers,
        written at slots ``index ..`` layer by layer and returned. LoRA adapters ride in each
        layer's dict (``p["lora"]``), with a per-layer dropout key when ``dropout_key`` is given."""
        cfg, dt = self.config, self.config.jnp_dtype
        block = ARCHS[cfg.arch].block

        def body(carry, xs):
            x, kv = carry
            p, layer = xs
            if kv is None:
                attend = lambda q, k, v: (layers.attention(q, k, v, ctx, dt), None)
            else:
                attend = lambda q, k, v: layers.attention_cached_stack(q, k, v, ctx, kv, layer, index, dt)
            return block(cfg, p, x, attend), None

        if cfg.remat != "none":
            body = jax.checkpoint(body, policy=_REMAT_POLICIES[cfg.remat], prevent_cse=False)
        params = {k: v[...] for k, v in self.layers.items()}
        if cfg.lora.rank:
            params["lora"] = lora_lib.layer_adapters(self)
            if dropout_key is not None and cfg.lora.dropout:
                params["lora_key"] = jax.random.split(dropout_key, cfg.num_layers)
        xs = (params, jnp.arange(cfg.num_layers, dtype=jnp.int32))
        (x_BxTxD, kv), _ = jax.lax.scan(body, (x_BxTxD, kv), xs)
        return x_BxTxD, kv

    def _layers_full(self, x_BxTxD, ctx, dropout_key=None):
        return self._scan(x_BxTxD, ctx, None, 0, dropout_key)[0]

    def init_cache(self, batch_size: int, max_len: int, dtype=None) -> layers.KVCache:
        """Zeros: stacked ``[L, B, G, S, H]`` key and value buffers."""
        cfg = self.config
        return layers.KVCache.zeros(cfg.num_layers, batch_size, max_len, cfg.num_kv_heads, cfg.head_dim,
                                    dtype or cfg.jnp_dtype)

    def _layers_cached(self, x_BxTxD, ctx, cache: layers.KVCache, index):
        x_BxTxD, (k, v) = self._scan(x_BxTxD, ctx, (cache.k_LxBxGxSxH, cache.v_LxBxGxSxH), index)
        return x_BxTxD, cache.replace(k_LxBxGxSxH=k, v_LxBxGxSxH=v)


class DecodeLM(_LanguageModel):
    """The decoding layout of a :class:`CausalLM`: one parameter dict per layer (an ``nnx.List``),
    a :class:`~repo_jax.models.layers.LayerKVCache` of per-layer buffers, the layers a Python loop
    (see the module doc); the same ``init_cache`` / ``forward_with_cache`` contract. Logical
    sharding names are kept, minus the ``layers`` axis."""

    is_unstacked = True

    def __init__(self, model: CausalLM):
        self.config = model.config
        names = lambda v: v.get_metadata().get("out_sharding")
        self.top = nnx.Dict({k: nnx.Param(v[...], eager_sharding=False, out_sharding=names(v))
                             for k, v in model.top.items()})
        self.layers = nnx.List([
            nnx.Dict({k: nnx.Param(v[...][i], eager_sharding=False, out_sharding=tuple(names(v) or ())[1:] or None)
                      for k, v in model.layers.items()})
            for i in range(model.config.num_layers)
        ])

    def unstacked(self) -> "DecodeLM":
        return self

    def init_cache(self, batch_size: int, max_len: int, dtype=None) -> layers.LayerKVCache:
        """Zeros: ``L`` separate ``[B, G, S, H]`` key and value buffers."""
        cfg = self.config
        return layers.LayerKVCache.zeros(cfg.num_layers, batch_size, max_len, cfg.num_kv_heads, cfg.head_dim,
                                         dtype or cfg.jnp_dtype)

    def _layer_params(self):
        return [{k: v[...] for k, v in layer.items()} for layer in self.layers]

    def _layers_full(self, x_BxTxD, ctx, dropout_key=None):
        cfg, dt = self.config, self.config.jnp_dtype
        attend = lambda q, k, v: (layers.attention(q, k, v, ctx, dt), None)
        for p in self._layer_params():
            x_BxTxD, _ = ARCHS[cfg.arch].block(cfg, p, x_BxTxD, attend)
        return x_BxTxD

    def _layers_cached(self, x_BxTxD, ctx, cache: layers.LayerKVCache, index):
        cfg, dt = self.config, self.config.jnp_dtype
        block = ARCHS[cfg.arch].block
        ks, vs = [], []
        for i, p in enumerate(self._layer_params()):
            kv = (cache.k_layers[i], cache.v_layers[i])
            attend = lambda q, k, v, kv=kv: layers.attention_cached(q, k, v, ctx, kv, index, dt)
            x_BxTxD, (k_i, v_i) = block(cfg, p, x_BxTxD, attend)
            ks.append(k_i)
            vs.append(v_i)
        return x_BxTxD, cache.replace(k_layers=tuple(ks), v_layers=tuple(vs))


def _defaults(input_ids_BxT, positions_BxT, attention_mask_BxT):
    if attention_mask_BxT is None:
        attention_mask_BxT = jnp.ones(input_ids_BxT.shape, jnp.int32)
    if positions_BxT is None:
        positions_BxT = positions_from_mask(attention_mask_BxT)
    return attention_mask_BxT, positions_BxT


def build(config: ModelConfig, *, seed: int = 0) -> CausalLM:
    """A randomly initialised model (``nnx.eval_shape(lambda: build(cfg))`` for the abstract one)."""
    return CausalLM(config, rngs=nnx.Rngs(seed))
