"""``python -m repo_jax.sft [--config PATH] [key.sub=value ...]``: supervised fine-tuning.

Makes the starting policy of a task from demonstrations (``data.path``: ``{prompt, response}`` or
``{prompt, completion}`` rows, chat ``messages`` ending with the assistant's turn, or the
``chosen`` side of preference rows): the loss is the mean negative log-likelihood per response
token (prompt and padding tokens are masked out), on length-bucketed batches. The held-out loss
(``eval.holdout`` or ``eval.data_path``) and, with a ``task``, greedy answers to its held-out
prompts are measured as in ``python -m repo_jax.lpo``; the final policy is exported to
``run_dir/policy`` (an HF folder), ready for ``model.weights`` of the iREPO or LPO programs.
Without ``--config`` it runs ``configs/tiny_sft.yaml``.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    from repo_jax.offline.runner import main as offline_main

    return offline_main("sft", argv, __doc__)


if __name__ == "__main__":
    sys.exit(main())
