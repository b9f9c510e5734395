"""The optimiser: global-norm clipping, then AdamW under a warm-up + cosine learning-rate schedule.

Weight decay is masked to parameters with two or more dimensions (matrices, embeddings), the
usual choice for transformers: decaying norm scales and biases only hurts.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import optax

from repo_jax.training.config import OptimConfig


def resolve(cfg: OptimConfig, run_steps: int) -> OptimConfig:
    """``cfg`` with ``total_steps`` (0 -> ``run_steps``) and the warm-up in steps (from
    ``warmup_ratio``) filled in: what :func:`schedule` and :func:`make_optimizer` read."""
    if cfg.warmup_steps < 0 or not 0.0 <= cfg.warmup_ratio < 1.0 or cfg.total_steps < 0:
        raise ValueError("optim.warmup_steps and optim.total_steps must be >= 0 and optim.warmup_ratio in [0, 1)")
    if cfg.warmup_steps and cfg.warmup_ratio:
        raise ValueError(f"set optim.warmup_steps={cfg.warmup_steps} or optim.warmup_ratio={cfg.warmup_ratio}, not both")
    total = cfg.total_steps or max(int(run_steps), 1)
    warmup = cfg.warmup_steps or (math.ceil(cfg.warmup_ratio * total) if cfg.warmup_ratio else 0)
    return dataclasses.replace(cfg, total_steps=total, warmup_steps=warmup, warmup_ratio=0.0)


def schedule_problems(cfg: OptimConfig, run_steps: int, what: str) -> list[str]:
    """Why ``cfg``'s schedule does not fit a run of ``run_steps`` optimiser steps (``what`` says
    where that number comes from), one sentence each; empty when it fits."""
    r = resolve(cfg, run_steps)
    out = []
    if r.warmup_steps > run_steps:
        out.append(f"the warm-up (optim.warmup_steps={cfg.warmup_steps}, optim.warmup_ratio={cfg.warmup_ratio}: "
                   f"{r.warmup_steps} steps) is longer than the run's {run_steps} optimiser steps ({what}): the "
                   f"learning rate never passes {run_steps / r.warmup_steps:.3g} x optim.lr")
    if cfg.total_steps and cfg.schedule == "cosine" and cfg.total_steps != run_steps:
        at_end = float(schedule(r)(max(run_steps - 1, 0))) / cfg.lr if cfg.lr else 0.0
        out.append(f"optim.total_steps={cfg.total_steps} but the run takes {run_steps} optimiser steps ({what}): the "
                   f"cosine {'stops at' if cfg.total_steps > run_steps else 'ends early and holds'} "
                   f"{at_end:.3g} x optim.lr; set optim.total_steps=0 (the run's steps)")
    return out


def schedule(cfg: OptimConfig) -> optax.Schedule:
    """The learning rate of optimiser step ``n`` (0-based) of a resolved config (:func:`resolve`):
    ``lr * (n + 1) / W`` for the ``W`` warm-up steps (the first step trains), then cosine from
    ``lr`` down to ``lr * end_lr_ratio`` at step ``total_steps - 1`` and flat after it
    (``constant``: ``lr`` after the warm-up)."""
    if cfg.schedule not in ("cosine", "constant"):
        raise ValueError(f"optim.schedule must be 'cosine' or 'constant'; got {cfg.schedule!r}")
    if cfg.warmup_steps < 0 or cfg.warmup_ratio or (cfg.schedule == "cosine" and cfg.total_steps < 1):
        raise ValueError("optim.total_steps is unresolved (0 or a warmup_ratio): pass the config through "
                         "repo_jax.training.optim.resolve(cfg, run_steps) first")
    lr, w, n = cfg.lr, cfg.warmup_steps, cfg.total_steps
    peak_at = max(w - 1, 0)  # the step that runs at lr
    span = max(n - 1 - peak_at, 1)

    def lr_at(count):
        c = jnp.asarray(count, jnp.float32)
        warm = lr * jnp.minimum((c + 1.0) / w, 1.0) if w else jnp.full_like(c, lr)
        if cfg.schedule == "constant":
            return warm
        progress = jnp.clip((c - peak_at) / span, 0.0, 1.0)
        end = lr * cfg.end_lr_ratio
        cosine = end + (lr - end) * 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
        return jnp.where(c < peak_at, warm, cosine)

    return lr_at


def _decay_mask(params):
    return jax.tree.map(lambda x: jnp.ndim(x) >= 2, params)


def make_optimizer(cfg: OptimConfig) -> optax.GradientTransformation:
    """``clip_by_global_norm(clip_norm)`` then ``adamw`` with :func:`schedule` (of a resolved
    config: :func:`resolve`)."""
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
