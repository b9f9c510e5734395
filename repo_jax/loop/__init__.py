"""The iREPO host loop (``python -m repo_jax.irepo``).

* :mod:`~repo_jax.loop.config`    ``IrepoConfig``: the training config plus ``task``, ``loop``,
  ``sample``, ``annotate``, ``eval``
* :mod:`~repo_jax.loop.panels`    the annotator panel from ``annotate.panel``
* :mod:`~repo_jax.loop.rounds`    one round's phases on plain data: sample, annotate, Zermelo,
  pairs, round records, train items and batches
* :mod:`~repo_jax.loop.evaluate`  held-out reward, task metrics, win rate against iteration 0, KL
* :mod:`~repo_jax.loop.state`     the run folder and config check, ``Progress`` (a checkpoint's
  loop item), ``Run`` (model, programs, data, panel, checkpointer; built once)
* :mod:`~repo_jax.loop.phases`    a round's phases on a ``Run``: sample + annotate (or reuse the
  round file), reference log-probs, train, evaluate
* :mod:`~repo_jax.loop.runner`    the loop over rounds: checkpoints, resume, SIGTERM, outputs
"""

from repo_jax.loop.config import IrepoConfig

__all__ = ["IrepoConfig"]
