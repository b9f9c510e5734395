"""Grain pipelines: checked examples -> global shuffle per epoch -> this host's share ->
tokenise -> padded batches, with an iterator whose state can be saved and restored.

Order of operations (a ``grain.MapDataset``, so every batch is addressable by its index)::

    range(N_pad) -> shuffle(seed), reshuffled every epoch -> repeat(num_epochs)
      -> [shard_index::shard_count] -> encode (chat template, truncation) -> batch + pad

``N_pad`` rounds the number of examples up to a multiple of ``shard_count``; indices past the
end are masked padding rows, so every host yields the same number of batches (a multi-host
train step would otherwise hang) and no example is dropped. The last batch of the run is filled
with masked rows for the same reason. The iterator (``Pipeline.iterator()``) is a
``grain.DatasetIterator``: ``get_state()`` is a small JSON-able dict, ``set_state`` resumes at
exactly the next unseen batch, and Orbax saves it through ``grain.checkpoint.CheckpointSave``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Literal

import grain
import numpy as np

from repo_jax.data.config import DataConfig
from repo_jax.data.sources import DataError
from repo_jax.data.tokenize import Formatter, collate_prompts, collate_responses, collate_shared, plain_prompt, truncate
from repo_jax.padding import ladder
from repo_jax.data.validate import LoadReport, load_examples

Kind = Literal["prompt", "pair", "list", "sft"]


def _features():
    import datasets

    msg = {"role": datasets.Value("string"), "content": datasets.Value("string")}
    return datasets.Features({
        "prompt": datasets.List(msg), "responses": datasets.List(datasets.Value("string")),
        "scores": datasets.List(datasets.Value("float64")), "pref": datasets.Value("float64"),
        "source": datasets.Value("string"), "line": datasets.Value("int64"),
    })


def check_kind(examples: list[dict], kind: Kind) -> None:
    """Every example must fit the batches a program asks for; the error names the first row that
    does not (e.g. a listwise file given to a pairwise trainer)."""
    for ex in examples:
        if kind == "pair" and (len(ex["responses"]) != 2 or ex["pref"] is None):
            raise DataError(f"{ex['source']}:{ex['line']}: this program needs pairs (chosen/rejected, or response_a/"
                            f"response_b with pref) but the row has {len(ex['responses'])} responses and no preference")
        if kind == "list" and not ex["scores"]:
            raise DataError(f"{ex['source']}:{ex['line']}: this program needs scored responses but the row has no "
                            "scores")
        if kind == "sft" and len(ex["responses"]) != 1:
            raise DataError(f"{ex['source']}:{ex['line']}: this program needs one response per prompt (prompt + "
                            f"response, or messages ending with the assistant's) but the row has "
                            f"{len(ex['responses'])}; set data.schema=sft")


@dataclasses.dataclass(frozen=True)
class Encoder:
    """Index -> encoded example (a picklable callable, so grain workers can run it)."""

    examples: object  # datasets.Dataset
    formatter: Formatter
    max_prompt_len: int
    max_response_len: int
    with_responses: bool

    def __call__(self, index: int) -> dict:
        if index >= len(self.examples):
            return {}  # padding slot (an empty dict, not None: grain treats None as filtered out)
        ex = self.examples[int(index)]
        prompt_ids, responses_ids = self.formatter.encode(ex["prompt"], ex["responses"] if self.with_responses else [])
        prompt_ids, responses_ids = truncate(prompt_ids, responses_ids, max_prompt_len=self.max_prompt_len,
                                             max_response_len=self.max_response_len)
        return {"prompt_ids": prompt_ids, "response_ids": responses_ids, "scores": ex["scores"], "pref": ex["pref"],
                "row": int(index), "prompt_text": plain_prompt(ex["prompt"])}


@dataclasses.dataclass(frozen=True)
class Pipeline:
    """A built pipeline: ``batches`` (a ``grain.MapDataset`` of batch dicts), the checked
    ``examples`` (a ``datasets.Dataset``; ``row_B`` in a batch indexes it), the load ``report``,
    and the static shape facts a program needs (``batches_per_epoch`` on this host is fractional
    when batches straddle epochs)."""

    cfg: DataConfig
    kind: str
    examples: object
    report: LoadReport
    batches: grain.MapDataset
    num_responses: int
    buckets: tuple[int, ...]
    batches_per_epoch: float

    def iterator(self) -> grain.DatasetIterator:
        """A fresh iterator from the first batch; ``set_state`` on it resumes a saved run."""
        ds = self.batches.to_iter_dataset()
        if self.cfg.worker_count > 0:
            from absl import flags

            if not flags.FLAGS.is_parsed():  # grain's workers read absl flags; take their defaults
                flags.FLAGS.mark_as_parsed()
            ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=self.cfg.worker_count))
        return iter(ds)

    def __len__(self) -> int:
        return len(self.batches)


def host_shard(cfg: DataConfig) -> tuple[int, int]:
    """``(shard_index, shard_count)`` from the config, else from the JAX process."""
    if cfg.shard_count is not None:
        return cfg.shard_index, cfg.shard_count
    import jax

    return jax.process_index(), jax.process_count()


def make_pipeline(cfg: DataConfig, tokenizer, *, kind: Kind, run_dir=None,
                  log: Callable[[str], None] | None = print, layout: str = "rows") -> Pipeline:
    """Loads and checks ``cfg.path`` (rejects to ``run_dir/rejects.jsonl``) and builds batches.

    ``kind``: ``prompt`` (left-padded prompts for sampling, see ``collate_prompts``), ``pair``
    (K = 2, ``pref_B`` = P(response 0 beats response 1)), ``list`` (K = ``data.num_responses``
    or the most in the data, ``scores_BxK`` and ``list_mask_BxK``) or ``sft`` (K = 1); ``layout``
    (``train.layout``): ``shared`` (one row per example: ``collate_shared``, buckets up to
    ``max_prompt_len + K * max_response_len``) or ``rows`` (``collate_responses``); layouts in
    :mod:`repo_jax.data.tokenize`.
    """
    examples, report = load_examples(cfg, tokenizer=tokenizer, run_dir=run_dir, log=log)
    return pipeline_from_examples(cfg, tokenizer, examples, report, kind=kind, layout=layout)


def pipeline_from_examples(cfg: DataConfig, tokenizer, examples: list[dict], report: LoadReport, *,
                           kind: Kind, layout: str = "rows") -> Pipeline:
    """:func:`make_pipeline` on examples already loaded (and perhaps split or turned into pairs);
    ``row_B`` of a batch indexes ``examples``."""
    import datasets

    check_kind(examples, kind)
    fixed = {"prompt": 0, "pair": 2, "sft": 1}
    k = fixed[kind] if kind in fixed else cfg.num_responses or max(len(e["responses"]) for e in examples)
    table = datasets.Dataset.from_list([{f: e[f] for f in _features()} for e in examples], features=_features())
    del examples
    longest = cfg.max_prompt_len + (0 if kind == "prompt" else (k if layout == "shared" else 1) * cfg.max_response_len)
    buckets = tuple(sorted(cfg.length_buckets)) or ladder(longest)
    if buckets[-1] < longest:
        what = "max_prompt_len + K x max_response_len: train.layout=shared" if layout == "shared" and kind != "prompt" \
            else "max_prompt_len + max_response_len"
        raise ValueError(f"data.length_buckets tops out at {buckets[-1]}, below the longest sequence {longest} "
                         f"({what}); add a bucket of at least that length")
    index, count = host_shard(cfg)
    n_pad = math.ceil(len(table) / count) * count
    ds = grain.MapDataset.range(n_pad)
    if cfg.shuffle:
        ds = ds.shuffle(seed=cfg.seed)
    ds = ds.repeat(cfg.num_epochs or None)[index::count]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ds = ds.map(Encoder(table, Formatter(tokenizer, chat_template=cfg.chat_template), cfg.max_prompt_len,
                        cfg.max_response_len, with_responses=kind != "prompt"))
    if kind == "prompt":
        collate = _Collate(collate_prompts, dict(batch_size=cfg.batch_size, buckets=buckets, pad_id=pad_id))
    else:
        collate = _Collate(collate_shared if layout == "shared" else collate_responses,
                           dict(batch_size=cfg.batch_size, num_responses=k, buckets=buckets,
                                                   pad_id=pad_id))
    batches = ds.batch(cfg.batch_size, drop_remainder=False, batch_fn=collate)
    return Pipeline(cfg, kind, table, report, batches, k, buckets, n_pad / count / cfg.batch_size)


@dataclasses.dataclass(frozen=True)
class _Collate:
    fn: Callable
    kwargs: dict

    def __call__(self, items):
        return self.fn(list(items), **self.kwargs)


def batch_arrays(batch: dict) -> dict[str, np.ndarray]:
    """The numeric arrays of a batch (drops the object-typed ``prompt_text_B``), ready for
    ``jax.device_put``."""
    return {k: v for k, v in batch.items() if v.dtype != object}
