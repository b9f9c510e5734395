"""FLOP accounting of train batches: what the work needs (useful) and what our program runs (padded).

Counted per forward pass (the train step is 3x: forward and backward), in the
``models.flops_per_token`` convention (a multiply-add is 2 FLOPs; the embedding gather is free):

* **useful**: every real token once (a shared prompt once per example, whatever the layout)
  through the layers' matmuls, the unembedding only where a response token is predicted, and
  attention for each (query, key) pair the model must see (causal, block-causal across an
  example's responses, within a sliding window): ``4 * L * N * H`` per pair;
* **padded**: what the program for that batch computes: every position of the padded
  ``B x T`` (or ``B * K x T``) tokens through every matmul including the unembedding, and the
  full ``T x T`` score matrix per row (no causal discount).

Both take a host batch of either layout (``repo_jax.training.batch``).
"""

from __future__ import annotations

import numpy as np

from repo_jax.models.config import ModelConfig


def _params(cfg: ModelConfig) -> tuple[float, float]:
    """``(matmul parameters of the layers, of the unembedding)``."""
    from repo_jax.models.model import param_count

    unembed = cfg.vocab_size * cfg.hidden_size
    body = param_count(cfg) - unembed * (1 if cfg.tie_word_embeddings else 2)
    return float(body), float(unembed)


def _pairs(seg_BxT: np.ndarray, pos_BxT: np.ndarray, window: int | None) -> np.ndarray:
    """Allowed (query, key) pairs of real tokens per row (``[B]``): the rule of
    ``models.layers.make_context``."""
    real = seg_BxT >= 0
    q, k = seg_BxT[:, :, None], seg_BxT[:, None, :]
    allowed = real[:, :, None] & real[:, None, :] & ((k == 0) | (k == q))
    allowed &= pos_BxT[:, None, :] <= pos_BxT[:, :, None]
    if window is not None:
        allowed &= pos_BxT[:, :, None] - pos_BxT[:, None, :] < window
    return allowed.sum(axis=(1, 2))


def _shared_view(batch: dict) -> tuple[np.ndarray, np.ndarray, int]:
    """``(segment ids, positions, model rows)`` of a batch: the shared layout as is; the rows layout
    as ``B * K`` one-response rows (segment 0 the prompt, 1 the response, -1 padding)."""
    if "segment_ids_BxT" in batch:
        seg = np.asarray(batch["segment_ids_BxT"])
        return seg, np.asarray(batch["positions_BxT"]), seg.shape[0]
    attn = np.asarray(batch["attention_mask_BxKxT"]).reshape(-1, batch["attention_mask_BxKxT"].shape[-1])
    loss = np.asarray(batch["loss_mask_BxKxT"]).reshape(attn.shape)
    resp = np.zeros_like(attn)
    resp[:, 1:] = loss[:, :-1]  # the loss mask is aligned with the targets
    seg = np.where(attn > 0, resp, -1)
    return seg, np.maximum(np.cumsum(attn, -1) - 1, 0), seg.shape[0]


def forward_flops(cfg: ModelConfig, batch: dict) -> dict[str, float]:
    """``{"useful", "padded", "real_tokens", "padded_tokens"}`` of one forward over ``batch``."""
    body, unembed = _params(cfg)
    attn_pair = 4.0 * cfg.num_layers * cfg.num_heads * cfg.head_dim
    seg, pos, rows = _shared_view(batch)
    t = seg.shape[1]
    if "segment_ids_BxT" in batch:
        real = seg >= 0
        responses = seg > 0
        pairs = _pairs(seg, pos, cfg.sliding_window).sum()
    else:  # each response's row repeats its prompt: count the prompt once per example (its first row)
        k = batch["attention_mask_BxKxT"].shape[1]
        first_R = np.arange(rows) % k == 0
        real = np.where(first_R[:, None], seg >= 0, seg > 0)
        responses = seg > 0
        prompt_pairs_R = _pairs(np.where(seg == 0, 0, -1), pos, cfg.sliding_window)
        pairs = _pairs(seg, pos, cfg.sliding_window).sum() - prompt_pairs_R[~first_R].sum()
    useful_attn = attn_pair * pairs
    useful = 2.0 * (body * real.sum() + unembed * responses.sum()) + useful_attn
    span = min(t, cfg.sliding_window or t)
    padded_attn = attn_pair * rows * t * span
    padded = 2.0 * (body + unembed) * rows * t + padded_attn
    return {"useful": useful, "padded": padded, "real_tokens": float(real.sum()), "padded_tokens": float(rows * t),
            "useful_attn": float(useful_attn), "padded_attn": float(padded_attn)}


def train_flops(cfg: ModelConfig, batch: dict, *, reference_forward: bool = False) -> dict[str, float]:
    """One train step over ``batch``: 3 forwards' worth (forward + backward), plus one forward
    for a reference held as parameters (``train.reference=params``). With LoRA
    (``cfg.lora.rank``) the frozen matrices take the forward and the input gradient only (2
    passes), attention and the adapters (``2 * count`` per token) all 3."""
    from repo_jax.models import lora

    f = forward_flops(cfg, batch)
    ref = 1.0 if reference_forward else 0.0
    if not cfg.lora.rank:
        return {**f, "useful": (3.0 + ref) * f["useful"], "padded": (3.0 + ref) * f["padded"]}
    out = dict(f)
    for kind, tokens in (("useful", f["real_tokens"]), ("padded", f["padded_tokens"])):
        attn = f[f"{kind}_attn"]
        weights = f[kind] - attn
        adapters = 2.0 * lora.param_count(cfg) * tokens
        out[kind] = 2.0 * weights + 3.0 * (attn + adapters) + ref * (weights + attn + adapters)
    return out
