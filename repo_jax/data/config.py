"""``DataConfig``: where a program's data comes from and how it is cut into batches.

Every program that reads data nests this dataclass under the key ``data`` of its own config, so
``python -m repo_jax.lpo data.path=uf.jsonl data.batch_size=16`` works everywhere, and
:func:`repo_jax.config.load` checks every key (an unknown ``data.*`` key is an error that lists
the valid ones).
"""

from __future__ import annotations

import dataclasses
from typing import Literal

Format = Literal["auto", "jsonl", "json", "parquet", "arrow", "hub"]
Schema = Literal["auto", "prompt", "sft", "pairwise", "listwise", "ultrafeedback", "ultrafeedback_binarized", "hh_rlhf"]


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where the data comes from, how a row is read, and how rows become batches.

    path: a local file (``.jsonl``, ``.json``, ``.parquet``, ``.arrow``), a folder of such files or
      a ``datasets.save_to_disk`` folder, a glob (``data/*.jsonl``), or a hub name
      (``HuggingFaceH4/ultrafeedback_binarized``) when no such local path exists.
    split: the hub split (``train_prefs``); ignored for files.
    subset: the hub configuration name; ignored for files.
    format: how to read ``path``; ``auto`` goes by the file suffix.
    schema: how to read one row; ``auto`` detects it from the keys of the first row of each
      source (``instruction`` + ``completions`` -> ultrafeedback, ``chosen``/``rejected`` with
      ``prompt`` -> pairwise (this includes ultrafeedback_binarized), without ``prompt`` ->
      hh_rlhf, ``response_a`` -> pairwise, ``responses`` -> listwise, ``prompt`` with
      ``response``/``completion`` -> sft, ``prompt``/``messages`` -> prompt). ``sft``: one
      demonstration per row (``prompt`` + ``response``/``completion``/``chosen``, or ``messages``
      ending with the assistant's turn); ``python -m repo_jax.sft`` reads ``auto`` as ``sft``.
    max_prompt_len / max_response_len: token budgets; prompts keep their last tokens, responses
      their first (``prompt_overflow=reject`` rejects over-long prompts instead).
    prompt_overflow: a prompt over ``max_prompt_len`` tokens is cut to its last tokens
      (``truncate``) or rejected (``reject``: the row is counted and written to
      ``run_dir/rejects.jsonl`` with its reason, like every bad row).
    length_buckets: allowed padded lengths ``T``; empty = 16, 24, 32, 48, 64, ... capped at
      ``max_prompt_len + max_response_len`` (a handful of shapes, so a handful of compiles).
    num_responses: ``K`` of listwise batches; 0 = the largest count in the data (shorter lists
      are padded and masked).
    batch_size: rows per batch on this host; the last batch of a run is filled with masked rows.
    shuffle: a deterministic global shuffle of the rows, different in every epoch.
    seed: seeds the shuffle (and, in the offline programs, which examples ``eval.holdout`` sets
      aside).
    num_epochs: passes over the data; 0 = forever.
    strict: the first bad row is an error naming its file and line, instead of a reject.
    chat_template: render prompts and responses with the tokenizer's chat template when it has
      one (otherwise ``\\n\\nHuman: ...\\n\\nAssistant:`` transcripts).
    shard_index / shard_count: this host's share of the rows; None = ``jax.process_index()`` /
      ``jax.process_count()``.
    worker_count: grain worker processes for tokenisation (0 = in the main process; workers need
      absl flags parsed first, which the programs do).
    """

    path: str = ""
    split: str = "train"
    subset: str | None = None
    format: Format = "auto"
    schema: Schema = "auto"
    max_prompt_len: int = 512
    max_response_len: int = 512
    prompt_overflow: Literal["truncate", "reject"] = "truncate"
    length_buckets: tuple[int, ...] = ()
    num_responses: int = 0
    batch_size: int = 8
    shuffle: bool = True
    seed: int = 0
    num_epochs: int = 1
    strict: bool = False
    chat_template: bool = True
    shard_index: int | None = None
    shard_count: int | None = None
    worker_count: int = 0

    def __post_init__(self):
        for name in ("max_prompt_len", "max_response_len", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"data.{name} must be at least 1, got {getattr(self, name)}")
        if self.num_epochs < 0 or self.num_responses < 0 or self.worker_count < 0:
            raise ValueError("data.num_epochs, data.num_responses and data.worker_count must be >= 0")
        if (self.shard_index is None) != (self.shard_count is None):
            raise ValueError("set both data.shard_index and data.shard_count, or neither")
        if self.shard_count is not None and not 0 <= self.shard_index < self.shard_count:
            raise ValueError(f"data.shard_index={self.shard_index} is not in [0, data.shard_count={self.shard_count})")
