"""Offline training programs on a fixed dataset: ``python -m repo_jax.lpo`` and ``python -m repo_jax.sft``.

* :mod:`~repo_jax.offline.config`   ``LpoConfig`` / ``SftConfig`` (``RunConfig`` plus ``pairs``, ``eval``, ...)
* :mod:`~repo_jax.offline.pairs`    the LPO paper's pair baselines built from scored lists
* :mod:`~repo_jax.offline.ranking`  held-out ranking metrics of implicit rewards (jitted)
* :mod:`~repo_jax.offline.runner`   reference pass once, train, evaluate, checkpoint, resume
"""
