"""``python -m repo_jax.evaluate COMMAND ...``: the papers' evaluations of a checkpoint.

Commands (``--model`` is an HF folder, a ``.gguf`` file or ``smollm2``; every command writes
its results as JSON into ``--out``, default ``runs/evaluate``):

  lm-eval      LM Evaluation Harness tasks through our model (``.[eval]`` extra):
               ``--tasks T1,T2 [--include-path DIR] [--limit N] [--num-fewshot K]``
  win-rate     a policy's answers against a baseline's, judged by an annotator panel, ties 1/2,
               with a 95% interval: ``--run RUN_DIR`` (the run's own panel and its per-iteration
               eval answers: ``--iteration`` last vs ``--against`` 0), or ``--model A
               --baseline-model B --task T`` (greedy answers to the task's held-out prompts)
  mt-bench     FastChat model answers to ``--questions question.jsonl`` (multi-turn)
  alpaca-eval  AlpacaEval outputs for ``--instructions FILE``
  pass-at-k    an embedded task's pass@1 / pass@k from ``--n`` samples per prompt

Examples::

  python -m repo_jax.evaluate win-rate --run runs/default
  python -m repo_jax.evaluate pass-at-k --model smollm2 --task arithmetic --n 8 --k 1,4,8
  python -m repo_jax.evaluate lm-eval --model smollm2 --tasks my_task --include-path my_tasks/
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

def _model_args(ap: argparse.ArgumentParser, *, required: bool = True) -> None:
    ap.add_argument("--model", required=required, help="HF folder, .gguf file, or 'smollm2'")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="parameter dtype")
    ap.add_argument("--batch-size", type=int, default=16, help="rows per forward / sampler call")
    ap.add_argument("--mesh", default="", help="e.g. 'data=1,fsdp=-1,tensor=1' (default: no mesh)")
    ap.add_argument("--out", default="runs/evaluate", help="folder for the JSON results")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m repo_jax.evaluate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("lm-eval", help="LM Evaluation Harness tasks")
    _model_args(p)
    p.add_argument("--tasks", required=True, help="comma-separated task names")
    p.add_argument("--include-path", default=None, help="folder of local task YAMLs")
    p.add_argument("--limit", type=float, default=None, help="documents per task (or a fraction)")
    p.add_argument("--num-fewshot", type=int, default=None)
    p.add_argument("--max-length", type=int, default=None, help="longest scored row (default: model context, <= 2048)")
    p.add_argument("--apply-chat-template", action="store_true", help="render requests with the chat template")
    p.add_argument("--seed", type=int, default=0)

    p = sub.add_parser("win-rate", help="answers vs a baseline's, judged by a panel")
    _model_args(p, required=False)
    p.add_argument("--run", default=None, help="an iREPO run folder (its config's panel and eval answers)")
    p.add_argument("--iteration", type=int, default=None, help="the run's iteration to judge (default: last)")
    p.add_argument("--against", type=int, default=0, help="the run's baseline iteration (default 0)")
    p.add_argument("--baseline-model", default=None, help="with --model: the baseline checkpoint")
    p.add_argument("--task", default="arithmetic", help="with --model: the task (prompts and default panel)")
    p.add_argument("--config", default=None, help="with --model: a config whose annotate.panel judges")
    p.add_argument("--prompts", type=int, default=64, help="with --model: held-out prompts")
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--interval", choices=("wilson", "bootstrap"), default="wilson")

    p = sub.add_parser("mt-bench", help="FastChat model answers")
    _model_args(p)
    p.add_argument("--questions", required=True, help="FastChat question.jsonl")
    p.add_argument("--model-id", default=None, help="model_id in the answers (default: the model's name)")
    p.add_argument("--max-new-tokens", type=int, default=1024, help="per turn (FastChat's default)")

    p = sub.add_parser("alpaca-eval", help="AlpacaEval outputs")
    _model_args(p)
    p.add_argument("--instructions", required=True, help="JSON list or JSON Lines with 'instruction'")
    p.add_argument("--generator", default=None, help="the generator name (default: the model's name)")
    p.add_argument("--max-new-tokens", type=int, default=1024)
    p.add_argument("--temperature", type=float, default=0.0)

    p = sub.add_parser("pass-at-k", help="pass@1 / pass@k of an embedded task")
    _model_args(p)
    p.add_argument("--task", default="arithmetic")
    p.add_argument("--n", type=int, default=8, help="samples per prompt")
    p.add_argument("--k", default="1,4,8", help="comma-separated k values (each <= n)")
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--prompts", type=int, default=64, help="held-out prompts (0 = all)")
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--seed", type=int, default=0)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from repo_jax.evals import programs

    try:
        result = programs.COMMANDS[args.command](args)
    except (ValueError, FileNotFoundError, KeyError, ImportError) as e:
        print(f"error: {e.args[0] if isinstance(e, KeyError) and e.args else e}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{args.command.replace('-', '_')}.json"
    path.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"results saved to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
