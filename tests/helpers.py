"""Test helpers (not part of the library): the tiny run config and random batches of each layout."""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path

import numpy as np

from repo_jax import config as config_lib
from repo_jax.training.config import RunConfig

TINY_YAML = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"


# The training-core tests' sizes and schedule (tiny.yaml itself is sized for the loop).
CORE_TEST_OVERRIDES = ("train.seq_len=32", "train.steps=20", "optim.lr=1.0e-3", "optim.warmup_steps=2",
                       "optim.total_steps=20", "optim.schedule=cosine", "checkpoint.every_steps=10")


def tiny_config(*overrides: str) -> RunConfig:
    """``configs/tiny.yaml`` (the loop's ``IrepoConfig``, a ``RunConfig``) with the core tests'
    sizes, then ``key.sub=value`` overrides."""
    from repo_jax.loop.config import IrepoConfig

    return config_lib.load(IrepoConfig, TINY_YAML, [*CORE_TEST_OVERRIDES, *overrides])


def random_batch(cfg: RunConfig, *, vocab: int, seed: int = 0, batch_size: int | None = None,
                 num_responses: int | None = None, ref_logps: bool = True) -> dict[str, np.ndarray]:
    """A batch in the layout of ``batch.py`` for ``cfg.train`` (prompt of varying length, then a
    response, then padding), with ``pref_B``, ``scores_BxK`` and a ragged ``list_mask_BxK``."""
    train = cfg.train
    b = batch_size or train.batch_size
    k = num_responses or train.num_responses
    t = train.seq_len
    r = np.random.default_rng(seed)
    ids = r.integers(0, vocab, (b, k, t)).astype(np.int32)
    attn = np.zeros((b, k, t), np.int32)
    loss = np.zeros((b, k, t), np.int32)
    for i in range(b):
        p = int(r.integers(2, t // 2))
        for j in range(k):
            n = int(r.integers(p + 2, t + 1))
            attn[i, j, :n] = 1
            loss[i, j, p - 1 : n - 1] = 1
            ids[i, j, n:] = 0
    list_mask = np.ones((b, k), bool)
    if k > 2:
        list_mask[::2, -1] = False
    out = {
        "input_ids_BxKxT": ids,
        "attention_mask_BxKxT": attn,
        "positions_BxKxT": np.maximum(np.cumsum(attn, -1) - 1, 0).astype(np.int32),
        "loss_mask_BxKxT": loss,
        "pref_B": r.uniform(0.05, 0.95, b).astype(np.float32),
        "scores_BxK": r.integers(1, 11, (b, k)).astype(np.float32),
        "list_mask_BxK": list_mask,
        "example_mask_B": np.ones((b,), bool),
    }
    if ref_logps:
        out["ref_logps_BxK"] = (loss.sum(-1) * -np.log(vocab) + r.normal(0, 1, (b, k))).astype(np.float32)
    return out


def replace(cfg: RunConfig, **sections) -> RunConfig:
    return dataclasses.replace(cfg, **sections)


@contextlib.contextmanager
def count_compiles(fun_name: str):
    """``{"n": ...}``: how many XLA executables of the function named ``fun_name`` are built
    inside the ``with`` block (``jax.monitoring``'s backend-compile events)."""
    import jax

    counter = {"n": 0}

    def listener(event, duration, fun_name=None, **_):
        if event == "/jax/core/compile/backend_compile_duration" and fun_name == f"jit({name})":
            counter["n"] += 1

    name = fun_name
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield counter
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
