"""Config sections of a training run (frozen dataclasses, loaded by :func:`repo_jax.config.load`).

``RunConfig`` is the top level of ``configs/*.yaml``: ``model``, ``data``, ``mesh``, ``train``
(with its ``loss``), ``optim`` and ``checkpoint``. Programs that need more sections (the iREPO loop's
sampling, annotation and evaluation; the data pipeline) subclass it and add fields, e.g.::

    @dataclasses.dataclass(frozen=True)
    class IrepoConfig(RunConfig):
        sample: SampleConfig = SampleConfig()

so every YAML stays loadable by the one loader, and an unknown key is still an error.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

from repo_jax.data.config import DataConfig
from repo_jax.models.config import LoraConfig
from repo_jax.sharding import MeshConfig

Dtype = Literal["float32", "bfloat16", "float16"]


@dataclasses.dataclass(frozen=True)
class ModelSection:
    """Which model: its architecture, its starting weights, its dtypes and LoRA.

    config: the architecture of a random-init model: an HF ``config.json``, an HF folder or a
      ``.gguf`` file (read when ``weights`` is empty; with ``weights`` the architecture is theirs).
    weights: the starting weights, an HF folder or a ``.gguf`` file; ``""`` = random init from
      ``config`` (seeded by ``train.seed``).
    tokenizer: where programs that read text get their tokenizer: ``""`` = from ``weights`` (an
      HF folder or ``.gguf``), ``bytes`` = the byte tokenizer of tiny random models
      (``repo_jax.data.byte_tokenizer``), or an HF folder / ``.gguf`` path.
    dtype: the compute dtype (activations and matmul inputs; matmuls accumulate in float32).
    param_dtype: the stored (master) dtype of the parameters, their gradients and Adam's state.
    remat: per-layer rematerialisation in the backward pass: ``none``, ``full`` (keep only each
      layer's input) or ``dots`` (keep the matmul outputs); less memory for more compute.
    overrides: keyword arguments for ``repo_jax.models.load_config`` that replace values of the
      architecture (e.g. ``num_layers: 2``).
    lora (``rank`` > 0): train low-rank adapters on a frozen base instead of every weight
      (``repo_jax.models.lora``); the base may then stay in ``param_dtype: bfloat16``."""

    config: str = ""
    weights: str = ""
    tokenizer: str = ""
    dtype: Dtype = "float32"
    param_dtype: Dtype = "float32"
    remat: Literal["none", "full", "dots"] = "none"
    overrides: dict[str, Any] = dataclasses.field(default_factory=dict)
    lora: LoraConfig = LoraConfig()


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """The objective, by registry name (``repo_jax.training.objectives.LOSSES``), and its knobs.
    Only the knobs of the chosen loss are read; ``lipo_lambda`` has only ``beta``.

    name: the loss: ``irepo`` (regresses the implicit reward margin onto the panel's
      ``logit(p_hat)``), ``soft_dpo``, ``dpo``, ``ipo`` (pairwise), ``lpo``, ``lpo_abs``,
      ``lipo_lambda``, ``infonca`` (listwise, on scored lists), or ``sft`` (the negative
      log-likelihood of ``python -m repo_jax.sft``).
    beta: scales the policy's log-ratio against the reference into the implicit reward
      ``beta * (log pi(y) - log pi_ref(y))``; larger keeps the policy closer to the reference
      (IPO reads it as its ``tau``).
    pref_eps (``irepo``): the panel's ``p_hat`` is clipped to ``[pref_eps, 1 - pref_eps]`` so a
      unanimous vote gives a finite regression target.
    label_smoothing (``dpo``): the conservative DPO's probability that a label is flipped (0 =
      plain DPO).
    lpo_variant (``lpo``): ``lpo`` (pair terms only) or ``lpo_abs`` (adds an absolute term on
      every response, as the ``lpo_abs`` loss does).
    abs_term (``lpo_abs``, or ``lpo`` with ``lpo_variant: lpo_abs``): the absolute term
      ``f(-beta rho_i)``: ``sigmoid`` (the paper's Table 1, bounded) or ``logsigmoid`` (its Eq. 8,
      unbounded).
    weight (``lpo``, ``lpo_abs``): the pair weight, ``squared`` ``|s_i^2 - s_j^2|`` or ``linear``
      ``|s_i - s_j|`` of the two responses' scores.
    weight_norm (``lpo``, ``lpo_abs``): ``none`` (the pair weights as printed in the paper),
      ``sum`` (each list's weights add up to 1) or ``mean`` (they average 1 over its ordered pairs).
    infonca_alpha (``infonca``): the temperature of the target distribution ``softmax(s / alpha)``
      over a list's scores.
    """

    name: str = "irepo"
    beta: float = 0.1
    pref_eps: float = 1e-3
    label_smoothing: float = 0.0
    lpo_variant: Literal["lpo", "lpo_abs"] = "lpo"
    abs_term: Literal["sigmoid", "logsigmoid"] = "sigmoid"
    weight: Literal["squared", "linear"] = "squared"
    weight_norm: Literal["none", "mean", "sum"] = "none"
    infonca_alpha: float = 1.0


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """AdamW with a linear warm-up to ``lr`` then cosine decay to ``lr * end_lr_ratio`` at the
    schedule's last step (``constant``: flat after the warm-up), after global-norm clipping at
    ``clip_norm``.

    lr: the peak learning rate, reached at the end of the warm-up.
    schedule: after the warm-up, ``cosine`` (decay to ``lr * end_lr_ratio`` at the schedule's last
      step) or ``constant`` (flat at ``lr``).
    end_lr_ratio: the cosine schedule's final learning rate as a fraction of ``lr``.
    b1 / b2: Adam's decay rates of the first and second moments.
    eps: Adam's epsilon, added to the root of the second moment.
    weight_decay: AdamW's decoupled weight decay; it skips 1-D parameters (norms, biases).
    clip_norm: gradients are clipped to this global norm before the update (0 disables).
    mu_dtype: dtype of Adam's first moment (``float32`` keeps it exact).
    total_steps: the schedule's length in optimiser steps; 0 (the default) = the steps the run
      will take, which every program computes at start-up (the iREPO loop: rounds x ceil(pairs
      or lists per round / train.batch_size) x loop.epochs, one round's with
      ``loop.optimizer=reset``; the offline programs: ``train.steps``, or the epochs' steps).
    warmup_steps / warmup_ratio: the warm-up in steps, or as a fraction of ``total_steps``
      (set one). Warm-up step ``n`` (0-based) runs at ``lr * (n + 1) / warmup``: the first step
      trains, the last warm-up step is at ``lr``. A schedule that never reaches ``lr`` within the
      run, or an explicit ``total_steps`` other than the run's, is refused at start-up (top-level
      ``strict: false`` turns that into a warning)."""

    lr: float = 1e-6
    warmup_steps: int = 0
    warmup_ratio: float = 0.0
    total_steps: int = 0
    schedule: Literal["cosine", "constant"] = "cosine"
    end_lr_ratio: float = 0.0
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.0
    clip_norm: float = 1.0
    mu_dtype: Dtype = "float32"


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """One optimiser step: its batch, its layout and its reference. The forward and backward
    run in ``model.dtype`` (the master parameters, gradients and Adam stay in
    ``model.param_dtype``).

    batch_size: examples (prompts, each with its ``num_responses`` responses) per optimiser step,
      over all hosts.
    num_responses: responses per example in a step: 2 for a pairwise loss, the list length for a
      listwise one (the offline programs take it from the data and do not read it).
    seq_len: the longest padded row (in ``shared``, the prompt plus all ``num_responses``
      responses): the iREPO loop pads each batch to the smallest rung of ``padding.ladder(seq_len)``
      that holds it, one compiled step per rung (the offline programs do not read it: their
      rows follow from ``data``'s lengths).
    layout: how an example's responses are laid out in rows (``repo_jax.training.batch``):
      ``shared`` puts each example in one row, its prompt once and then its responses
      (block-causal attention); ``rows`` gives every response a row of its own (prompt + response).
    micro_batches: the step's batch is split into this many micro-batches whose gradients are
      accumulated with ``lax.scan`` (less memory, same update).
    steps: the offline programs' optimiser steps (0 = ``data.num_epochs`` passes over the
      data). The iREPO loop does not read it (its steps follow from ``loop``: see ``OptimConfig``)
      and refuses a config that sets it.
    seed: seeds the random init and the LoRA adapters; in the iREPO loop also the sampling, the
      epochs' shuffles and the KL samples of every round.
    reference: ``batch`` reads ``ref_logps_BxK`` from the batch (the programs compute them once:
      the loop each round, the offline programs before training, with
      :func:`repo_jax.training.step.make_reference_logprobs`); ``params`` runs a frozen copy of
      the reference parameters held in the train state, for the library's train step alone
      (``bench train`` uses it): the programs refuse it.
    logprob_chunk: positions per chunk of the log-prob kernel, which never holds more than a
      chunk's logits (``[rows, logprob_chunk, vocab]``): smaller saves memory on large vocabularies.
    max_nonfinite_in_a_row: a non-finite loss or gradient skips the update; this many in a row
      stop the run.
    """

    batch_size: int = 8
    num_responses: int = 2
    seq_len: int = 512
    layout: Literal["shared", "rows"] = "shared"
    micro_batches: int = 1
    steps: int = 0
    seed: int = 0
    reference: Literal["batch", "params"] = "batch"
    logprob_chunk: int = 128
    max_nonfinite_in_a_row: int = 5
    loss: LossConfig = LossConfig()


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """Orbax checkpoints. Every program checkpoints at its natural boundaries (the loop: every
    round's end; the offline programs: every evaluation and the end) and on SIGTERM.

    dir: where the checkpoints go; ``""`` = ``<run_dir>/checkpoints``.
    every_steps: > 0 adds a save every that many optimiser steps (a cadence the run never
      reaches is refused at start-up); 0 = the natural boundaries only.
    keep: how many of the newest checkpoints are kept.
    async_save: checkpoints are written in the background while training goes on.
    upload_every_s: with ``run_dir: gs://bucket/path`` the checkpoints go to the bucket directly
      and the run's other files are uploaded after each checkpoint, every ``upload_every_s``
      seconds and at the end (``repo_jax.buckets``).
    """

    dir: str = ""
    every_steps: int = 0
    keep: int = 3
    async_save: bool = True
    upload_every_s: float = 60.0


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Top level of a training YAML (see the module docstring for extending it).

    ``data`` is the data pipeline's own section (``repo_jax.data.DataConfig``); its
    ``batch_size`` counts rows per host, so ``data.batch_size x processes = train.batch_size``.

    run_dir: the run's folder (its ``config.yaml``, metrics, reports, checkpoints, exported
      policy), a local path or ``gs://bucket/path``; rerunning with the same ``run_dir`` resumes.
    slice: the machine the config is sized for (``python -m repo_jax.plan`` checks each
      phase against its memory; a run on another device count says so): a key of
      ``repo_jax.plan.SLICES`` (``v5litepod-8``, ``v5p-8``, ``v6e-8``, ``8xH100``, ``cpu``, ...)
      or ``""``.
    strict: refuse at start-up a schedule that never reaches its peak, a ``total_steps`` or
      checkpoint cadence the run never reaches, and keys the program does not read (``false``:
      warn and run).
    """

    run_dir: str = "runs/default"
    slice: str = ""
    strict: bool = True
    model: ModelSection = ModelSection()
    data: DataConfig = DataConfig()
    mesh: MeshConfig = MeshConfig()
    train: TrainConfig = TrainConfig()
    optim: OptimConfig = OptimConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()

    @property
    def checkpoint_dir(self) -> str:
        return self.checkpoint.dir or f"{self.run_dir}/checkpoints"
