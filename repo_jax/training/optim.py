"""The optimiser: global-norm clipping, then AdamW under a warm-up + cosine learning-rate schedule.

Weight decay is masked to parameters with two or more dimensions (matrices, embeddings), the
usual choice for transformers: decaying norm scales and biases only hurts.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from repo_jax.training.config import OptimConfig


def schedule(cfg: OptimConfig) -> optax.Schedule:
    """Linear warm-up from 0 to ``lr`` over ``warmup_steps``, then cosine to ``lr * end_lr_ratio``
    at ``total_steps`` (``constant``: warm-up, then flat)."""
    if cfg.warmup_steps < 0 or cfg.total_steps < 1:
        raise ValueError("optim.warmup_steps must be >= 0 and optim.total_steps >= 1")
    if cfg.schedule == "constant":
        if cfg.warmup_steps == 0:
            return optax.constant_schedule(cfg.lr)
        return optax.join_schedules(
            [optax.linear_schedule(0.0, cfg.lr, cfg.warmup_steps), optax.constant_schedule(cfg.lr)],
            [cfg.warmup_steps],
        )
    if cfg.schedule != "cosine":
        raise ValueError(f"optim.schedule must be 'cosine' or 'constant'; got {cfg.schedule!r}")
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=cfg.lr,
        warmup_steps=cfg.warmup_steps,
        decay_steps=max(cfg.total_steps, cfg.warmup_steps + 1),
        end_value=cfg.lr * cfg.end_lr_ratio,
    )


def _decay_mask(params):
    return jax.tree.map(lambda x: jnp.ndim(x) >= 2, params)


def make_optimizer(cfg: OptimConfig) -> optax.GradientTransformation:
    """``clip_by_global_norm(clip_norm)`` then ``adamw`` with :func:`schedule`."""
    parts = []
    if cfg.clip_norm > 0:
        parts.append(optax.clip_by_global_norm(cfg.clip_norm))
    parts.append(
        optax.adamw(
            learning_rate=schedule(cfg),
            b1=cfg.b1,
            b2=cfg.b2,
            eps=cfg.eps,
            weight_decay=cfg.weight_decay,
            mu_dtype=jnp.dtype(cfg.mu_dtype),
            mask=_decay_mask,
        )
    )
    return optax.chain(*parts)
