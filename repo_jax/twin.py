"""A scaled twin of a shipped recipe: the same run on a model and data small enough for a CPU.

``twin(cfg, devices=..., judge_url=...)`` keeps everything a config says -- the mesh axes,
``train.layout``, compute and parameter dtypes, remat, the loss, micro-batches and batch size, the
panel's kinds, LoRA, the schedule's logic (warm-up ratio, cosine, ``total_steps: 0``), the
checkpoint cadence relative to the run, evaluation and KL samples -- and shrinks only:

* the model's dimensions (2 layers, 64-80 wide, 8 or 4 heads, a 256-token vocabulary; the
  architecture, GQA, partial rotary and a sliding window shorter than the rows stay), random init
  with the byte tokenizer;
* prompt counts (two optimiser steps an epoch: ``loop.prompts_per_round = 2 x train.batch_size``)
  and lengths (32-token prompts, 16 new tokens; rows of 32 + K x 16);
* the data: UltraFeedback-shaped lists shipped with the package
  (``repo_jax/tasks/data/arithmetic_listwise.jsonl``: ``instruction``, ``completions`` with
  ``overall_score``) for ``data.path``, and an ``ultrafeedback_binarized``-shaped held-out file
  written under the run folder for ``eval.data_path``;
* served annotators point at ``judge_url`` (a local endpoint: the tests start a fake one).

Step-count keys (``checkpoint.every_steps``, ``eval.every_steps``, an explicit warm-up) scale
with the run's steps, so a cadence the recipe reaches is reached in its twin. Command line:
``python -m repo_jax.irepo --config configs/mistral7b_irepo.yaml --twin --twin-judge URL`` (and
``repo_jax.lpo``; ``repo_jax.plan --twin`` plans it).
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

from repo_jax.buckets import local_path
from repo_jax.config import ConfigError

LISTS = Path(__file__).resolve().parent / "tasks" / "data" / "arithmetic_listwise.jsonl"
PROMPT_LEN, NEW_TOKENS, HELDOUT = 32, 16, 24


def _model_overrides(section) -> dict:
    from repo_jax.training.state import model_config

    cfg = model_config(section)
    dims = {"vocab_size": 256, "intermediate_size": 128, "num_layers": 2}
    if cfg.arch == "phi":  # no GQA; partial rotary 0.4 of 20 = 8 dims
        return {**dims, "hidden_size": 80, "num_heads": 4, "num_kv_heads": 4, "head_dim": 20}
    # the family's own features stay (Llama-3's rope scaling, Qwen's biases and q/k norms)
    return {**dims, "hidden_size": 64, "num_heads": 8, "num_kv_heads": 4, "head_dim": 8,
            **({"sliding_window": 24} if cfg.hf_model_type == "mistral" else {})}


def heldout_file(run_dir: str) -> str:
    """``run_dir/twin/heldout.jsonl``: the last ``HELDOUT`` lists as ultrafeedback_binarized rows
    (``prompt``, ``chosen`` / ``rejected`` chat messages, their scores), written once."""
    out = local_path(run_dir) / "twin" / "heldout.jsonl"
    if out.is_file():
        return str(out)
    rows = [json.loads(line) for line in LISTS.read_text().splitlines() if line.strip()][-HELDOUT:]
    lines = []
    for r in rows:
        comps = sorted(r["completions"], key=lambda c: -c["overall_score"])
        best, worst = comps[0], comps[-1]
        user = {"role": "user", "content": r["instruction"]}
        lines.append(json.dumps({"prompt": r["instruction"], "prompt_id": r["instruction"][:16],
                                 "chosen": [user, {"role": "assistant", "content": best["response"]}],
                                 "rejected": [user, {"role": "assistant", "content": worst["response"]}],
                                 "score_chosen": best["overall_score"], "score_rejected": worst["overall_score"]}))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(out)
    return str(out)


def _scaled(value: int, full: int, small: int) -> int:
    """A step count ``value`` of a ``full``-step run, at the same share of a ``small``-step run."""
    return 0 if not value else max(1, min(small, math.ceil(value * small / max(full, 1))))


def twin(cfg, *, judge_url: str = ""):
    """The scaled twin of ``cfg`` (an ``IrepoConfig`` or an offline config): see the module doc."""
    from repo_jax.loop.config import IrepoConfig, steps_per_round

    loop = isinstance(cfg, IrepoConfig)
    full_steps = steps_per_round(cfg) * cfg.loop.rounds if loop else cfg.train.steps  # 0: the data decides
    model = dataclasses.replace(cfg.model, weights="", tokenizer="bytes", overrides=_model_overrides(cfg.model))
    data = dataclasses.replace(cfg.data, path=str(LISTS), split="train", max_prompt_len=PROMPT_LEN)
    if loop:
        return _loop_twin(cfg, model, data, full_steps, judge_url)
    return _offline_twin(cfg, model, data, full_steps)


def _loop_twin(cfg, model, data, full_steps: int, judge_url: str):
    from repo_jax.loop.config import steps_per_round

    panel = []
    for i, spec in enumerate(cfg.annotate.panel):
        if spec.kind in ("served_judge", "served_score"):
            if not judge_url:
                raise ConfigError(f"annotate.panel.{i} ({spec.kind} at {spec.base_url}): the twin needs a local "
                                  "endpoint for served annotators (--twin-judge URL)")
            spec = dataclasses.replace(spec, base_url=judge_url, api_key_env="", max_requests=0)
        elif spec.kind in ("judge", "hf_reward_model"):
            raise ConfigError(f"annotate.panel.{i}: an in-process {spec.kind} ({spec.model}) has no twin; "
                              "serve it (served_judge) or use rule / simulated members")
        panel.append(spec)
    k = cfg.train.num_responses
    loop = dataclasses.replace(cfg.loop, prompts_per_round=2 * cfg.train.batch_size,
                               sample_batch=max(8, min(cfg.loop.sample_batch, cfg.train.batch_size)))
    sample = dataclasses.replace(cfg.sample, max_new_tokens=NEW_TOKENS)
    ev = dataclasses.replace(cfg.eval, num_prompts=min(cfg.eval.num_prompts, 16), max_new_tokens=0,
                             kl_prompts=min(cfg.eval.kl_prompts or 8, 8),
                             data_path=heldout_file(cfg.run_dir) if cfg.eval.data_path else "")
    train = dataclasses.replace(cfg.train, seq_len=PROMPT_LEN + max(k, ev.kl_samples) * NEW_TOKENS
                                if cfg.train.layout == "shared" else PROMPT_LEN + NEW_TOKENS)
    out = dataclasses.replace(cfg, model=model, data=data, loop=loop, sample=sample, eval=ev, train=train,
                              annotate=dataclasses.replace(cfg.annotate, panel=tuple(panel)))
    small = steps_per_round(out) * cfg.loop.rounds
    return _scale_steps(out, full_steps, small)


def _offline_twin(cfg, model, data, full_steps: int):
    data = dataclasses.replace(data, schema="auto", max_response_len=NEW_TOKENS, length_buckets=())
    ev = dataclasses.replace(cfg.eval, holdout=min(cfg.eval.holdout, HELDOUT) if not cfg.eval.data_path else 0,
                             data_path="", num_prompts=min(cfg.eval.num_prompts, 8), max_new_tokens=NEW_TOKENS)
    lists = sum(1 for line in LISTS.read_text().splitlines() if line.strip()) - ev.holdout
    epoch = math.ceil(lists / cfg.train.batch_size)
    steps = (min(cfg.train.steps, 4) if cfg.train.steps else 0)
    small = steps or epoch * max(cfg.data.num_epochs, 1)
    train = dataclasses.replace(cfg.train, steps=steps)
    out = dataclasses.replace(cfg, model=model, data=data, eval=ev, train=train)
    return _scale_steps(out, full_steps or small, small)


def _scale_steps(cfg, full: int, small: int):
    ckpt = dataclasses.replace(cfg.checkpoint, every_steps=_scaled(cfg.checkpoint.every_steps, full, small))
    optim = dataclasses.replace(cfg.optim, warmup_steps=_scaled(cfg.optim.warmup_steps, full, small),
                                total_steps=_scaled(cfg.optim.total_steps, full, small))
    out = dataclasses.replace(cfg, checkpoint=ckpt, optim=optim)
    if hasattr(cfg.eval, "every_steps"):
        out = dataclasses.replace(out, eval=dataclasses.replace(cfg.eval, every_steps=_scaled(cfg.eval.every_steps,
                                                                                            full, small)))
    return out
