"""Generates the committed data of the embedded arithmetic task (deterministic, < 1 MB).

    python -m repo_jax.tasks.make_data            # rewrite repo_jax/tasks/data/*.jsonl
    python -m repo_jax.tasks.make_data --check    # exit 1 if the committed files differ

Files:

* ``arithmetic_train.jsonl`` (1000) and ``arithmetic_eval.jsonl`` (200, disjoint prompts):
  ``{id, prompt, answer, expression}`` -- a prompt dataset (``data.schema=prompt``).
* ``arithmetic_listwise.jsonl`` (300 train prompts): a listwise reward dataset in the
  UltraFeedback schema (``instruction``, ``completions[].response`` / ``overall_score`` on 1-10,
  ``models``), with 4 synthetic responses per prompt (3 for every tenth prompt, so lists are
  ragged) written in styles the task reward separates: worked and correct, terse and correct,
  worked but wrong, long-winded and correct, no answer. ``overall_score = 1 + 9 * reward /
  MAX_REWARD``, rounded to 2 decimals.
* ``arithmetic_sft.jsonl`` (300 other train prompts): ``{prompt, response}`` demonstrations in
  the worked-and-correct style (``python -m repo_jax.sft``).
* ``toy_digits_sft.jsonl`` (the 400 toy_digits train prompts): ``{prompt, response}`` with each
  letter of the word as its alphabet index mod 10 (``"Digits for abc"`` -> ``"012"``), what
  ``configs/tiny_sft.yaml`` teaches a tiny random model.

``--listwise N --out-dir DIR`` also writes ``arithmetic_listwise_N.jsonl`` (N train prompts,
``N <= 1000``) for a larger offline study; it is not committed.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

from repo_jax.tasks.arithmetic import MAX_REWARD, ArithmeticTask, Problem, generate

DATA_DIR = Path(__file__).parent / "data"
TRAIN_SEED, EVAL_SEED, LIST_SEED = 1234, 5678, 4321
N_TRAIN, N_EVAL, N_LIST = 1000, 200, 300

FILLER = ("Let me think about this step by step. First I read the question carefully and note every number "
          "that appears in it. Then I decide which operation the story describes, because the words tell us "
          "whether things are added, taken away, grouped or shared. After that I work it out slowly and check "
          "the result once more to be sure nothing was missed.")


def _wrong(answer: int, rng: random.Random) -> int:
    return max(0, answer + rng.choice((-3, -2, -1, 1, 2, 3))) if answer > 3 else answer + rng.randint(1, 3)


def responses(problem: Problem, rng: random.Random) -> dict[str, str]:
    """One synthetic response per style (keys are the UltraFeedback ``model`` names)."""
    a, e = problem.answer, problem.expression
    w = _wrong(a, rng)
    return {
        "worked-correct": f"{e} = {a}. Answer: {a}",
        "terse-correct": f"{a}",
        "worked-wrong": f"{e} = {w}. Answer: {w}",
        "verbose-correct": f"{FILLER} So {e} = {a}. Answer: {a}",
        "no-answer": "I am not sure how to solve this problem.",
    }


def listwise_rows(problems: list[Problem], seed: int) -> list[dict]:
    rng, task, rows = random.Random(seed), ArithmeticTask(problems), []
    for n, p in enumerate(problems):
        styles = responses(p, rng)
        k = 3 if n % 10 == 9 else 4
        chosen = rng.sample(sorted(styles), k)
        comps = [{"model": m, "response": styles[m],
                  "overall_score": round(1 + 9 * task.reward(p.prompt, styles[m]) / MAX_REWARD, 2)} for m in chosen]
        rows.append({"source": "repo_jax/arithmetic", "instruction": p.prompt, "models": chosen, "completions": comps,
                     "answer": p.answer})
    return rows


def sft_rows(problems: list[Problem]) -> list[dict]:
    return [{"prompt": p.prompt, "response": f"{p.expression} = {p.answer}. Answer: {p.answer}"} for p in problems]


def toy_sft_rows() -> list[dict]:
    from repo_jax.tasks.toy import LETTERS, ToyDigitsTask

    rows = []
    for prompt in ToyDigitsTask().prompts("train"):
        word = prompt.removeprefix("Digits for ")
        rows.append({"prompt": prompt, "response": "".join(str(LETTERS.index(c) % 10) for c in word)})
    return rows


def build() -> dict[str, str]:
    """File name -> contents of every generated file."""
    train = generate(N_TRAIN, TRAIN_SEED, prefix="train")
    evals = generate(N_EVAL, EVAL_SEED, exclude={p.prompt for p in train}, prefix="eval")
    lines = lambda rows: "".join(r + "\n" for r in rows)  # noqa: E731
    return {
        "arithmetic_train.jsonl": lines(p.to_json() for p in train),
        "arithmetic_eval.jsonl": lines(p.to_json() for p in evals),
        "arithmetic_listwise.jsonl": lines(json.dumps(r, ensure_ascii=False)
                                           for r in listwise_rows(train[:N_LIST], LIST_SEED)),
        "arithmetic_sft.jsonl": lines(json.dumps(r) for r in sft_rows(train[N_LIST:2 * N_LIST])),
        "toy_digits_sft.jsonl": lines(json.dumps(r) for r in toy_sft_rows()),
    }


def larger_listwise(n: int) -> str:
    """``arithmetic_listwise_N.jsonl``'s contents: the first ``n`` train prompts as lists."""
    if not 0 < n <= N_TRAIN:
        raise ValueError(f"--listwise must be in 1..{N_TRAIN}, got {n}")
    train = generate(N_TRAIN, TRAIN_SEED, prefix="train")
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in listwise_rows(train[:n], LIST_SEED))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m repo_jax.tasks.make_data", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out-dir", type=Path, default=DATA_DIR)
    ap.add_argument("--check", action="store_true", help="compare with the files in --out-dir instead of writing")
    ap.add_argument("--listwise", type=int, default=0, help="also write arithmetic_listwise_N.jsonl with N lists")
    args = ap.parse_args(argv)
    stale = []
    files = build()
    if args.listwise:
        files[f"arithmetic_listwise_{args.listwise}.jsonl"] = larger_listwise(args.listwise)
    for name, text in files.items():
        path = args.out_dir / name
        if args.check:
            if not path.is_file() or path.read_text() != text:
                stale.append(str(path))
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        print(f"wrote {path} ({len(text.splitlines())} rows, {len(text.encode()) / 1e3:.0f} kB)")
    if stale:
        print("out of date (run python -m repo_jax.tasks.make_data): " + ", ".join(stale), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
