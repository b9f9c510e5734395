"""``python -m repo_jax.lpo [--config PATH] [key.sub=value ...]``: offline training on scored lists.

Trains a policy on a listwise dataset (``data.path``: UltraFeedback rows, ``{prompt, responses,
scores}`` lists, or ultrafeedback_binarized pairs with scores) with a listwise loss on every whole
list (``train.loss.name``: ``lpo``, ``lpo_abs``, ``lipo_lambda``, ``infonca``; LPO's pair weight
``train.loss.weight: squared | linear``), or with a pairwise loss (``dpo``, ``ipo``) on the LPO
paper's pair baselines built from the same lists (``pairs.mode``: ``best_vs_random``, ``1vsO``,
``pw``). The reference is the starting model, its log-probs computed once before training.
Without ``--config`` it runs ``configs/tiny_lpo.yaml`` (a tiny random model on the shipped
arithmetic listwise set, under 2 minutes on a laptop CPU). ``run_dir`` receives config.yaml,
metrics.jsonl (one line per evaluation), report.png, tb/, rejects.jsonl (rows refused, with file,
line and reason), reference/, checkpoints/ and policy/ (an HF folder). Rerunning the same command
resumes from the newest checkpoint.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    from repo_jax.offline.runner import main as offline_main

    return offline_main("lpo", argv, __doc__)


if __name__ == "__main__":
    sys.exit(main())
