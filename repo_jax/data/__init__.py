"""Data pipelines: local files or hub datasets -> checked examples -> grain batches.

* :mod:`~repo_jax.data.config`   ``DataConfig`` (the ``data.*`` keys of every program)
* :mod:`~repo_jax.data.sources`  reading rows with their source file and 1-based line
* :mod:`~repo_jax.data.schemas`  adapters (prompt, pairwise, listwise, UltraFeedback,
  ultrafeedback_binarized, HH-RLHF) -> one normalised example
* :mod:`~repo_jax.data.validate` the checks, ``rejects.jsonl`` and the printed counts
* :mod:`~repo_jax.data.tokenize` chat template, truncation, response masks, length buckets
* :mod:`~repo_jax.data.pipeline` grain: shuffle, per-host shard, batch, saveable iterator
"""

from repo_jax.data.config import DataConfig
from repo_jax.data.pipeline import Pipeline, batch_arrays, make_pipeline
from repo_jax.data.schemas import BadRow, adapt, detect_schema
from repo_jax.data.sources import DataError
from repo_jax.data.tokenize import Formatter, collate_prompts, collate_responses, collate_shared, unpad_prompts
from repo_jax.data.validate import LoadReport, Reject, load_examples

__all__ = [
    "BadRow", "DataConfig", "DataError", "Formatter", "LoadReport", "Pipeline", "Reject", "adapt",
    "batch_arrays", "collate_prompts", "collate_responses", "collate_shared", "detect_schema", "load_examples",
    "make_pipeline", "unpad_prompts",
]
