"""The commands of ``python -m repo_jax.evaluate`` (argument parsing lives in the program).

Each command takes the parsed arguments, prints its table and returns a JSON-ready dict that
the program saves as ``--out/<command>.json``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from repo_jax.evals import answers, local_tasks, stats

LM_EVAL_MISSING = ("python -m repo_jax.evaluate lm-eval needs the LM Evaluation Harness, an optional extra: "
                   "pip install -e '.[eval]'")


def parse_mesh(text: str):
    """``'data=1,fsdp=-1,tensor=1'`` -> a mesh over all devices; ``''`` -> None."""
    if not text:
        return None
    from repo_jax import sharding as shd

    sizes = {}
    for part in text.split(","):
        key, _, value = part.partition("=")
        if key.strip() not in ("data", "fsdp", "tensor") or not value.strip().lstrip("-").isdigit():
            raise ValueError(f"--mesh {text!r}: write axis=size pairs over data, fsdp, tensor (e.g. 'fsdp=-1')")
        sizes[key.strip()] = int(value)
    return shd.make_mesh(shd.MeshConfig(**sizes))


class Policy:
    """A checkpoint ready to answer: the model in the sampling layout, its tokenizer and chat
    formatter; ``complete`` samples from token ids, ``chat`` from conversations."""

    def __init__(self, path: str, *, dtype: str = "float32", mesh=None, batch_size: int = 16):
        import jax.numpy as jnp

        from repo_jax import models, sampling
        from repo_jax.assets import load_tokenizer, resolve_model_path
        from repo_jax.data.tokenize import Formatter

        resolved = resolve_model_path(path)
        self.name = Path(str(path)).name.removesuffix(".gguf")
        self.model = sampling.sampling_copy(models.from_pretrained(str(resolved), dtype=getattr(jnp, dtype)), mesh)
        self.tokenizer = load_tokenizer(resolved)
        self.formatter = Formatter(self.tokenizer)
        self.mesh, self.batch_size = mesh, int(batch_size)
        self.eos_id = self.tokenizer.eos_token_id
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eos_id

    def complete(self, prompt_ids: Sequence[Sequence[int]], *, max_new_tokens: int, temperature: float = 0.0,
                 top_p: float | None = None, num_samples: int = 1, seed: int = 0) -> list[list[list[int]]]:
        from repo_jax.loop.rounds import sample_responses

        return sample_responses(self.model, prompt_ids, num_samples=num_samples, max_new_tokens=max_new_tokens,
                                temperature=temperature, top_p=top_p, top_k=None, eos_id=self.eos_id,
                                pad_id=self.pad_id, seed=seed, slots=self.batch_size,
                                mesh=self.mesh)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True).strip()

    def chat(self, conversations: Sequence[list[dict]], *, max_new_tokens: int, temperature: float = 0.0,
             seed: int = 0) -> list[str]:
        """One answer per conversation (greedy below temperature 1e-4, as FastChat)."""
        ids = [self.formatter.prompt_ids(c) for c in conversations]
        temp = temperature if temperature >= 1e-4 else 0.0
        return [self.decode(r[0]) for r in self.complete(ids, max_new_tokens=max_new_tokens, temperature=temp, seed=seed)]


def _print_table(title: str, rows: Sequence[tuple[str, str]]) -> None:
    width = max(len(k) for k, _ in rows)
    print(title)
    for k, v in rows:
        print(f"  {k:<{width}}  {v}")


# ------------------------------------------------------------------------------------- lm-eval


def lm_eval_command(args) -> dict:
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
        from lm_eval.utils import make_table
    except ImportError:
        raise ImportError(LM_EVAL_MISSING) from None
    import jax.numpy as jnp

    from repo_jax.evals.harness import JaxLM

    if args.include_path and not Path(args.include_path).is_dir():
        raise FileNotFoundError(f"--include-path {args.include_path} is not a folder")
    tasks = [t for t in args.tasks.split(",") if t]
    include = [args.include_path] if args.include_path else []
    if set(tasks) & set(local_tasks.NAMES):
        include.append(str(local_tasks.write(Path(args.out) / "lm_eval_tasks")))
    lm = JaxLM.load(args.model, dtype=getattr(jnp, args.dtype), mesh=parse_mesh(args.mesh),
                    batch_size=args.batch_size, max_length=args.max_length)
    manager = TaskManager(include_path=include or None)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise KeyError(f"lm-eval knows no task {unknown[0]!r} (give its folder with --include-path)")
    out = lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=manager, limit=args.limit,
                                  num_fewshot=args.num_fewshot, apply_chat_template=args.apply_chat_template,
                                  random_seed=args.seed, numpy_random_seed=args.seed, torch_random_seed=args.seed,
                                  fewshot_random_seed=args.seed, log_samples=False)
    print(make_table(out))
    return {"model": args.model, "tasks": tasks, "limit": args.limit, "results": out["results"],
            "versions": out.get("versions", {}), "n-shot": out.get("n-shot", {})}


# ------------------------------------------------------------------------------------ win rate


def _answers_file(path: Path) -> tuple[list[str], list[str]]:
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    for n, r in enumerate(rows, 1):
        if "prompt" not in r or "answer" not in r:
            raise ValueError(f"{path}, line {n}: an answers row needs 'prompt' and 'answer'")
    return [r["prompt"] for r in rows], [r["answer"] for r in rows]


def _run_answers(run: Path, iteration: int | None) -> tuple[int, Path]:
    files = sorted((run / "eval").glob("answers_*.jsonl"))
    if not files:
        raise FileNotFoundError(f"{run}/eval holds no answers_*.jsonl (is {run} an iREPO run folder?)")
    if iteration is None:
        return int(files[-1].stem.rsplit("_", 1)[1]), files[-1]
    return iteration, run / "eval" / f"answers_{iteration:03d}.jsonl"


def win_rate_command(args) -> dict:
    from repo_jax import config as config_lib
    from repo_jax.loop.config import IrepoConfig
    from repo_jax.loop.evaluate import win_scores
    from repo_jax.loop.panels import build_panel
    from repo_jax.tasks import get_task

    if args.run:
        run = Path(args.run)
        cfg = config_lib.load(IrepoConfig, run / "config.yaml")
        it, cur_path = _run_answers(run, args.iteration)
        prompts, current = _answers_file(cur_path)
        base_prompts, baseline = _answers_file(run / "eval" / f"answers_{args.against:03d}.jsonl")
        if base_prompts != prompts:
            raise ValueError(f"{cur_path} and iteration {args.against}'s answers are to different prompts")
        what = {"run": str(run), "iteration": it, "against": args.against}
    elif args.model and args.baseline_model:
        cfg = config_lib.load(IrepoConfig, args.config, [f"task={args.task}"] if not args.config else [])
        task = get_task(cfg.task)
        prompts = task.prompts("eval")[:args.prompts or None]
        mesh = parse_mesh(args.mesh)
        current, baseline = [], []
        for path, out in ((args.model, current), (args.baseline_model, baseline)):
            policy = Policy(path, dtype=args.dtype, mesh=mesh, batch_size=args.batch_size)
            out += policy.chat([[{"role": "user", "content": p}] for p in prompts], max_new_tokens=args.max_new_tokens)
            del policy
        what = {"model": args.model, "baseline": args.baseline_model, "task": cfg.task}
    else:
        raise ValueError("win-rate needs --run RUN_DIR, or --model and --baseline-model")
    panel = build_panel(cfg.annotate.panel, get_task(cfg.task) if cfg.task else None)
    res = stats.win_rate(win_scores(panel, prompts, current, baseline), method=args.interval)
    _print_table(f"win rate ({', '.join(f'{k}={v}' for k, v in what.items())}; panel {', '.join(panel.names)})", [
        ("win rate", f"{res['win_rate']:.3f}  95% {args.interval} interval [{res['low']:.3f}, {res['high']:.3f}]"),
        ("wins / ties / losses", f"{res['wins']} / {res['ties']} / {res['losses']} of {res['prompts']} prompts"),
    ])
    return {**what, "panel": panel.names, "interval": args.interval, **res}


# ------------------------------------------------------------------------------ answer files


def _policy(args) -> Policy:
    return Policy(args.model, dtype=args.dtype, mesh=parse_mesh(args.mesh), batch_size=args.batch_size)


def _chat(policy: Policy, max_new_tokens: int) -> answers.Generate:
    return lambda convs, temp: policy.chat(convs, max_new_tokens=max_new_tokens, temperature=temp)


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def mt_bench_command(args) -> dict:
    questions = answers.read_questions(args.questions)
    policy = _policy(args)
    model_id = args.model_id or policy.name
    rows = answers.mt_bench_answers(
        questions, _chat(policy, args.max_new_tokens), model_id=model_id)
    out = _write(Path(args.out) / "model_answer" / f"{model_id}.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    turns = [len(r["choices"][0]["turns"]) for r in rows]
    _print_table("MT-Bench answers", [("questions", str(len(rows))), ("turns", str(sum(turns))), ("written", str(out))])
    return {"model_id": model_id, "questions": len(rows), "turns": sum(turns), "answers": str(out)}


def alpaca_eval_command(args) -> dict:
    rows = answers.read_instructions(args.instructions)
    policy = _policy(args)
    generator = args.generator or policy.name
    outs = answers.alpaca_eval_outputs(
        rows, _chat(policy, args.max_new_tokens), generator=generator, temperature=args.temperature)
    out = _write(Path(args.out) / f"alpaca_eval_{generator}.json", json.dumps(outs, indent=2) + "\n")
    _print_table("AlpacaEval outputs", [("instructions", str(len(outs))), ("written", str(out))])
    return {"generator": generator, "instructions": len(outs), "outputs": str(out)}


# ------------------------------------------------------------------------------------ pass@k


def pass_at_k_command(args) -> dict:
    from repo_jax.tasks import get_task

    ks = sorted({int(k) for k in args.k.split(",") if k})
    if not ks or ks[0] < 1 or ks[-1] > args.n:
        raise ValueError(f"--k {args.k}: every k must lie in 1..--n ({args.n})")
    task = get_task(args.task)
    prompts = task.prompts("eval")[:args.prompts or None]
    policy = _policy(args)
    ids = [policy.formatter.prompt_ids([{"role": "user", "content": p}]) for p in prompts]
    samples = policy.complete(ids, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                              top_p=args.top_p, num_samples=args.n, seed=args.seed)
    correct = [sum(task.metrics(p, policy.decode(r))["accuracy"] >= 1.0 for r in rows)
               for p, rows in zip(prompts, samples)]
    counts = [(args.n, int(c)) for c in correct]
    res = {f"pass@{k}": stats.mean_pass_at_k(counts, k) for k in ks}
    _print_table(f"{args.task}: {len(prompts)} held-out prompts x {args.n} samples at temperature {args.temperature}",
                 [(k, f"{v:.4f}") for k, v in res.items()])
    return {"model": args.model, "task": args.task, "n": args.n, "temperature": args.temperature, "top_p": args.top_p,
            "prompts": len(prompts), "correct_per_prompt": correct, **res,
            "mean_correct": float(np.mean(correct) / args.n)}


COMMANDS = {"lm-eval": lm_eval_command, "win-rate": win_rate_command, "mt-bench": mt_bench_command,
            "alpaca-eval": alpaca_eval_command, "pass-at-k": pass_at_k_command}
