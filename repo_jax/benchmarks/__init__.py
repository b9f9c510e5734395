"""Benchmark programs behind ``python -m repo_jax.bench NAME`` (one module per benchmark)."""
