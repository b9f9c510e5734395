"""``python -m repo_jax.bench NAME [options]``: benchmarks against a baseline measured in the same run.

Each benchmark prints its measurements and, as its last line, one JSON object with at least
``bench`` and ``ratio`` (ours over the baseline; above 1 is better for us), plus
``memory_ratio`` (our peak memory over the baseline's; below 1 is better) where memory is compared.
"""

from __future__ import annotations

import importlib
import sys

BENCHES = {
    "annotate": "repo_jax.benchmarks.annotate",
    "logprobs": "repo_jax.benchmarks.logprobs",
    "overlap": "repo_jax.benchmarks.overlap",
    "round": "repo_jax.benchmarks.round",
    "sample": "repo_jax.benchmarks.sample",
    "train": "repo_jax.benchmarks.train",
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in BENCHES:
        print(__doc__)
        print("benchmarks: " + ", ".join(BENCHES))
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    name = argv.pop(0)
    try:
        module = importlib.import_module(BENCHES[name])
    except ModuleNotFoundError as e:
        if e.name == BENCHES[name]:
            print(f"benchmark {name!r} is not implemented yet", file=sys.stderr)
            return 2
        raise
    return int(module.main(argv) or 0)


if __name__ == "__main__":
    sys.exit(main())
