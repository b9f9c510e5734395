"""Small studies that check the maths of ALGORITHMS.md with the project's own components
(one module per study, each a ``python -m repo_jax.studies.NAME`` program)."""
