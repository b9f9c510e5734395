"""``python -m repo_jax.bench annotate``: pairs judged per second by a served judge (llama.cpp's
OpenAI server on the SmolLM2 GGUF, at concurrency 1, 4 and 16) against the in-process judge
(our port of the same model, float32) on the same pairs, in one run.

Pairs: held-out arithmetic prompts, each with a right and a wrong ``Answer: n`` reply of a
few words; every pair judged in both orders (two prompts of ~120 tokens, one verdict read each).
The served judge asks the in-process judge's exact prompt text through ``/completions``, so
both do the same work; the server runs ``--threads`` threads (the in-process judge uses XLA's
pool on the same cores) and is idle while the in-process judge is timed. Nothing is cached:
each served run uses a fresh endpoint without a cache file. ``ratio`` = the served judge's best
pairs/s over the in-process judge's. Needs ``llama-cpp-python[server]`` (the test extra).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np

from repo_jax.benchmarks.common import LlamaServer, emit


def make_pairs(n: int) -> tuple[list[str], list[str], list[str]]:
    from repo_jax.tasks import get_task

    task = get_task("arithmetic")
    prompts = task.prompts("eval")[:n]
    rng = np.random.default_rng(0)
    first, second = [], []
    for i, p in enumerate(prompts):
        right = f"We work it out step by step. Answer: {task.answer(p)}"
        wrong = f"I think it is about this. Answer: {int(rng.integers(2, 99))}"
        first.append(right if i % 2 else wrong)
        second.append(wrong if i % 2 else right)
    return prompts, first, second


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m repo_jax.bench annotate", description=__doc__)
    ap.add_argument("--pairs", type=int, default=32)
    ap.add_argument("--concurrency", default="1,4,16")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2, help="llama.cpp server threads")
    args = ap.parse_args(argv)

    from repo_jax import models
    from repo_jax.annotators import LLMJudge
    from repo_jax.annotators.served import Endpoint, ServedJudge
    from repo_jax.assets import load_tokenizer, smollm2_gguf_path

    gguf = smollm2_gguf_path()
    tok = load_tokenizer(gguf)
    prompts, first, second = make_pairs(args.pairs)
    n = len(prompts)
    ours = LLMJudge(models.from_pretrained(str(gguf)), tok)
    ours.judge_pairs(prompts[:4], first[:4], second[:4])  # compile the buckets
    ours.reset()
    t0 = time.perf_counter()
    p_ours = ours.judge_pairs(prompts, first, second)
    in_process = n / (time.perf_counter() - t0)
    print(f"annotate: SmolLM2-135M-Instruct judge, {n} pairs x 2 orders, CPU ({os.cpu_count()} cores)", flush=True)
    print(f"  in-process judge (our port, float32, bucketed jit forwards): {in_process:7.2f} pairs/s", flush=True)
    result: dict = {"bench": "annotate", "pairs": n, "in_process_pairs_per_s": round(in_process, 3)}
    best = 0.0
    with tempfile.TemporaryDirectory() as tmp, LlamaServer(gguf, log_path=os.path.join(tmp, "server.log"),
                                                           threads=args.threads) as server:
        warm = ServedJudge(Endpoint(name="warm", base_url=server.url, model="smollm2"), chat=False, tokenizer=tok,
                           verdicts=(" A", " B"))
        warm.judge_pairs(prompts[:2], first[:2], second[:2])
        for c in (int(x) for x in args.concurrency.split(",")):
            judge = ServedJudge(Endpoint(name=f"served_judge/c{c}", base_url=server.url, model="smollm2",
                                         max_concurrency=c), chat=False, tokenizer=tok, verdicts=(" A", " B"))
            t0 = time.perf_counter()
            p_served = judge.judge_pairs(prompts, first, second)
            rate = n / (time.perf_counter() - t0)
            best = max(best, rate)
            diff = np.abs(np.asarray(p_served) - np.asarray(p_ours))
            agree = float(np.mean(np.sign(np.asarray(p_served) - 0.5) == np.sign(np.asarray(p_ours) - 0.5)))
            print(f"  served judge (llama.cpp, {args.threads} threads), concurrency {c:2d}: {rate:7.2f} pairs/s "
                  f"({judge.endpoint.sent} requests); agreement with in-process: same side {agree:.2f}, "
                  f"mean |p difference| {diff.mean():.4f}", flush=True)
            result[f"served_c{c}_pairs_per_s"] = round(rate, 3)
            result[f"served_c{c}_same_side"] = round(agree, 3)
            result[f"served_c{c}_mean_abs_diff"] = round(float(diff.mean()), 4)
    result["ratio"] = round(best / in_process, 3)
    load = os.getloadavg()
    print(f"  load average at the end {load[0]:.2f} on {os.cpu_count()} cores", flush=True)
    emit(result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
