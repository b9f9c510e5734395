"""Configs of the offline programs: ``LpoConfig`` (``python -m repo_jax.lpo``) and ``SftConfig``
(``python -m repo_jax.sft``), the training ``RunConfig`` plus:

* ``task``   the embedded task the prompts belong to (``arithmetic``), or ``""``: with a task, every
             evaluation also answers ``eval.num_prompts`` of its held-out prompts greedily and
             reports its reward and metrics (``eval/reward``, ``eval/accuracy``);
* ``pairs``  (LPO only) ``mode: list`` trains the listwise loss on whole lists; a pair mode
             (``best_vs_random``, ``1vsO``, ``pw``; :mod:`repo_jax.offline.pairs`) builds pairs from
             the same lists for a pairwise loss (DPO, IPO);
* ``eval``   the held-out split and how often it is measured;
* ``progress`` / ``export``  as in the iREPO loop.

What the programs derive instead of reading twice: one optimiser step sees ``train.batch_size``
examples (lists, pairs or responses), so each host's pipeline batch is ``train.batch_size /
processes`` (``data.batch_size`` is not read); rows are padded to ``data``'s length buckets up
to ``data.max_prompt_len + data.max_response_len`` (times K in the prompt-once ``train.layout=shared``;
``train.seq_len`` is not read); ``K`` comes
from the data (``data.num_responses`` or the longest list). The run trains ``train.steps`` steps,
or fewer when ``data.num_epochs`` passes end first (``data.num_epochs=0`` cycles; ``train.steps=0``:
the epochs' steps).
:func:`check` names, in one sentence each, the keys that do not fit together.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from repo_jax.config import ConfigError
from repo_jax.data.config import DataConfig
from repo_jax.offline.pairs import MODES
from repo_jax.training.config import RunConfig
from repo_jax.training.objectives import LOSSES


@dataclasses.dataclass(frozen=True)
class PairsConfig:
    """How the scored lists become training examples.

    mode: ``list`` (the whole list, listwise losses) or a pair mode of
      :mod:`repo_jax.offline.pairs` (pairwise losses): ``best_vs_random`` (the best response vs
      one drawn from those scoring lower), ``1vsO`` (the best vs each lower one), ``pw`` (every
      pair of different scores); tied pairs are dropped and counted.
    seed: draws ``best_vs_random``'s rejected response.
    """

    mode: Literal["list", "best_vs_random", "1vsO", "pw"] = "list"
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class OfflineEvalConfig:
    """The held-out split and how often it is measured: before the first step (iteration 0),
    every ``every_steps`` steps and after the last step.

    data_path: the held-out data, a file or hub name in ``data``'s schemas; ``""`` = ``holdout``
      examples of ``data.path``.
    split: the hub split of ``data_path``; ``""`` = ``data.split``.
    holdout: with no ``data_path``, this many examples of ``data.path`` are set aside before
      training (chosen by ``data.seed``).
    every_steps: evaluate every that many optimiser steps (0: only before the first step and at
      the end).
    num_prompts: how many of the task's held-out prompts get greedy answers at each evaluation
      (with ``task``; 0 disables them).
    max_new_tokens: the longest greedy answer, in tokens.
    batch_size: lists per reference / evaluation pass (0 = ``train.batch_size``).
    """

    data_path: str = ""
    split: str = ""
    holdout: int = 0
    every_steps: int = 0
    num_prompts: int = 64
    max_new_tokens: int = 64
    batch_size: int = 0


@dataclasses.dataclass(frozen=True)
class OfflineConfig(RunConfig):
    """What ``python -m repo_jax.lpo`` and ``python -m repo_jax.sft`` share (see the module docstring).

    task: the embedded task the prompts belong to (``arithmetic``), or ``""``: with a task, every
      evaluation also answers ``eval.num_prompts`` of its held-out prompts greedily and reports
      its reward and metrics (``eval/reward``, ``eval/accuracy``).
    progress: progress bars on stderr.
    export: at the end, write the final policy to ``run_dir/policy`` as an HF folder (with
      LoRA, the adapters merged in, and ``run_dir/adapter`` holds them as a PEFT folder).
    """

    task: str = ""
    eval: OfflineEvalConfig = OfflineEvalConfig()
    progress: bool = True
    export: bool = True


@dataclasses.dataclass(frozen=True)
class LpoConfig(OfflineConfig):
    """``python -m repo_jax.lpo``'s config (see the module docstring)."""

    run_dir: str = "runs/lpo"
    pairs: PairsConfig = PairsConfig()


@dataclasses.dataclass(frozen=True)
class SftConfig(OfflineConfig):
    """``python -m repo_jax.sft``'s config; ``train.loss.name`` must be ``sft``."""

    run_dir: str = "runs/sft"


def pair_mode(cfg: OfflineConfig) -> str:
    return getattr(cfg, "pairs", PairsConfig()).mode


def check(cfg: OfflineConfig) -> None:
    """Raises ``ConfigError`` naming the key when the sections do not fit together."""
    name, mode = cfg.train.loss.name, pair_mode(cfg)
    sft = isinstance(cfg, SftConfig)
    if name not in LOSSES:
        valid = ["sft"] if sft else sorted(n for n in LOSSES if n != "sft")
        raise ConfigError(f"train.loss.name={name!r} is not a loss; choose one of {valid}")
    if sft and name != "sft":
        raise ConfigError(f"train.loss.name={name!r}: python -m repo_jax.sft trains train.loss.name=sft")
    if not sft and name == "sft":
        raise ConfigError("train.loss.name=sft is python -m repo_jax.sft's loss, not a preference loss")
    pairwise = LOSSES[name].pairwise
    if not sft and mode == "list" and pairwise:
        raise ConfigError(f"train.loss.name={name!r} is pairwise: set pairs.mode to one of {', '.join(MODES)} "
                          "(or choose a listwise loss: lpo, lpo_abs, lipo_lambda, infonca)")
    if mode != "list" and not pairwise:
        raise ConfigError(f"train.loss.name={name!r} is listwise: it needs pairs.mode=list, not {mode!r}")
    if cfg.train.reference != "batch":
        raise ConfigError("train.reference must be 'batch': the reference log-probs are computed once, before training")
    if cfg.data.batch_size != DataConfig().batch_size and cfg.data.batch_size != cfg.train.batch_size:
        raise ConfigError("data.batch_size is not read by the offline programs (a step sees train.batch_size "
                          "examples); remove it")
    if not cfg.data.path:
        raise ConfigError("data.path is empty: set it to the training data (a file, folder or hub name)")
    e = cfg.eval
    if e.holdout < 0 or e.every_steps < 0 or e.num_prompts < 0 or e.batch_size < 0:
        raise ConfigError("eval.holdout, eval.every_steps, eval.num_prompts and eval.batch_size must be >= 0")
    if e.data_path and e.holdout:
        raise ConfigError("set eval.data_path or eval.holdout, not both")
    if cfg.train.steps < 0 or (cfg.train.steps == 0 and cfg.data.num_epochs == 0):
        raise ConfigError(f"train.steps={cfg.train.steps}: set the steps to train, or train.steps=0 with "
                          "data.num_epochs > 0 (that many passes over the data)")


def unread_keys(cfg: OfflineConfig) -> list[str]:
    """Keys an offline config sets that the offline programs do not read, one sentence each."""
    from repo_jax.training.config import TrainConfig

    t = TrainConfig()
    return [f"train.{k} is not read by the offline programs (rows follow from data.max_prompt_len, "
            "data.max_response_len and the lists' K); remove it"
            for k in ("seq_len", "num_responses") if getattr(cfg.train, k) != getattr(t, k)]


def planned_train(cfg: OfflineConfig):
    """``train`` with the shape of the largest batch the run will see (for ``python -m
    repo_jax.plan``): ``seq_len`` = the longest length bucket, ``num_responses`` = 1 (SFT),
    2 (a pair mode) or the list length (``data.num_responses``, else 4)."""
    from repo_jax.padding import ladder

    d = cfg.data
    k = 1 if isinstance(cfg, SftConfig) else 2 if pair_mode(cfg) != "list" else d.num_responses or 4
    per_row = k if cfg.train.layout == "shared" else 1
    t = max(d.length_buckets or ladder(d.max_prompt_len + per_row * d.max_response_len))
    return dataclasses.replace(cfg.train, seq_len=t, num_responses=k)


def config_class(raw: dict) -> type[RunConfig]:
    """The program config a YAML's top-level keys belong to (``plan`` and the tests read any
    shipped YAML): ``pairs`` -> LPO, ``train.loss.name: sft`` -> SFT, ``loop`` and the rest -> iREPO."""
    from repo_jax.loop.config import IrepoConfig

    loss = ((raw.get("train") or {}).get("loss") or {}).get("name")
    if "pairs" in raw:
        return LpoConfig
    if loss == "sft":
        return SftConfig
    return IrepoConfig
