"""Evaluation beyond the loop's own held-out metrics (``python -m repo_jax.evaluate``).

* :mod:`~repo_jax.evals.harness`: our models as an LM Evaluation Harness ``TemplateLM``;
* :mod:`~repo_jax.evals.answers`: MT-Bench (FastChat) and AlpacaEval answer files;
* :mod:`~repo_jax.evals.stats`: pass@k and win rates with confidence intervals;
* :mod:`~repo_jax.evals.programs`: the program's commands.
"""
