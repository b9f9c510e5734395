"""A tiny stand-in language model with the models' training interface, for tests and planning.

``hidden_states(ids, positions, mask) -> [B, T, D]``, ``unembedding() -> (w_DxV, b_V)``,
``__call__ -> logits``; stacked layers with a leading ``layers`` axis, every parameter an
``nnx.Param`` carrying logical axis names. It lets the training core be tested without the
full model ports (it is not a faithful Llama: no RoPE, a plain causal attention).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


def _param(init, key, shape, names, scale=1.0, dtype=jnp.float32):
    return nnx.Param((init(key, shape) * scale).astype(dtype), eager_sharding=False, out_sharding=names)


class TinyLM(nnx.Module):
    def __init__(self, *, vocab=64, d=32, n=4, h=8, f=64, layers=2, bias=True, seed=0, param_dtype=jnp.float32):
        r = nnx.Rngs(seed)
        init = nnx.initializers.normal(1.0)
        self.n, self.h = n, h
        self.embed = _param(init, r.params(), (vocab, d), ("vocab", "embed"), 0.5, param_dtype)
        self.wqkv = _param(init, r.params(), (layers, 3, d, n, h), ("layers", None, "embed", "q_heads", "head_dim"), d**-0.5, param_dtype)
        self.wo = _param(init, r.params(), (layers, n, h, d), ("layers", "q_heads", "head_dim", "embed"), (n * h) ** -0.5, param_dtype)
        self.w1 = _param(init, r.params(), (layers, d, f), ("layers", "embed", "mlp"), d**-0.5, param_dtype)
        self.w2 = _param(init, r.params(), (layers, f, d), ("layers", "mlp", "embed"), f**-0.5, param_dtype)
        self.norm = nnx.Param(jnp.ones((layers, 2, d), param_dtype), eager_sharding=False, out_sharding=("layers", None, "norm"))
        self.final_norm = nnx.Param(jnp.ones((d,), param_dtype), eager_sharding=False, out_sharding=("norm",))
        self.head = _param(init, r.params(), (d, vocab), ("embed", "vocab"), d**-0.5, param_dtype)
        self.head_bias = nnx.Param(jnp.zeros((vocab,), param_dtype), eager_sharding=False, out_sharding=("vocab",)) if bias else None

    @staticmethod
    def _rms(x, scale):
        x32 = x.astype(jnp.float32)
        return (x32 * jax.lax.rsqrt(jnp.mean(x32**2, -1, keepdims=True) + 1e-6) * scale).astype(x.dtype)

    def hidden_states(self, input_ids_BxT, positions_BxT=None, attention_mask_BxT=None):
        b, t = input_ids_BxT.shape
        if attention_mask_BxT is None:
            attention_mask_BxT = jnp.ones((b, t), jnp.int32)
        x_BxTxD = self.embed[...][input_ids_BxT]
        causal_TxS = jnp.tril(jnp.ones((t, t), bool))
        allowed_BxTxS = causal_TxS[None] & (attention_mask_BxT[:, None, :] > 0)

        def layer(x_BxTxD, p):
            wqkv, wo, w1, w2, norm = p
            hn = self._rms(x_BxTxD, norm[0])
            q, k, v = (jnp.einsum("BTD,DNH->BTNH", hn, wqkv[i]) for i in range(3))
            s_BxNxTxS = jnp.einsum("BTNH,BSNH->BNTS", q, k) / self.h**0.5
            s_BxNxTxS = jnp.where(allowed_BxTxS[:, None], s_BxNxTxS.astype(jnp.float32), -1e30)
            a = jax.nn.softmax(s_BxNxTxS, -1).astype(v.dtype)
            x_BxTxD = x_BxTxD + jnp.einsum("BNTS,BSNH,NHD->BTD", a, v, wo)
            hn = self._rms(x_BxTxD, norm[1])
            return x_BxTxD + jax.nn.gelu(hn @ w1) @ w2, None

        params = (self.wqkv[...], self.wo[...], self.w1[...], self.w2[...], self.norm[...])
        x_BxTxD, _ = jax.lax.scan(layer, x_BxTxD, params)
        return self._rms(x_BxTxD, self.final_norm[...])

    def unembedding(self):
        return self.head[...], None if self.head_bias is None else self.head_bias[...]

    def __call__(self, input_ids_BxT, positions_BxT=None, attention_mask_BxT=None):
        w, b = self.unembedding()
        logits = jnp.einsum("BTD,DV->BTV", self.hidden_states(input_ids_BxT, positions_BxT, attention_mask_BxT), w)
        return logits.astype(jnp.float32) + (0 if b is None else b.astype(jnp.float32))
