"""``python -m repo_jax.bench overlap``: a round whose served judge is on another machine, with
annotation after sampling (``loop.sample_waves=1``) and beside it (``loop.sample_waves=W``).

The judge is a local endpoint that answers every request after ``--delay`` seconds without using
the CPU (a remote server's latency: vLLM on its own GPUs, a hosted API), ``--concurrency``
requests at a time, preferring the longer response. The round is ``bench round``'s (SmolLM2-135M,
``--prompts`` arithmetic prompts, ``--responses`` responses each, the task's reward rule beside
the served judge, one epoch of updates; its evaluation is not timed). One model: a warm-up round
of each kind (compiles the whole-round and the wave shapes), then one timed round of each, on
fresh prompts.

Prints each timed round's phases, and ``bound`` = max(sample, annotate) + reference + train of
the sequential round (what overlapping at best gives); ``ratio`` = sequential / overlapped round
time (above 1: the overlap pays), ``vs_bound`` = overlapped / bound (the target: at most
1.15).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from repo_jax.benchmarks.common import emit


class DelayedJudge:
    """An OpenAI-shaped chat endpoint on 127.0.0.1 that sleeps ``delay`` seconds per request and
    prefers the longer of the two responses (P(A) 0.8 or 0.2, 0.5 for equal lengths)."""

    def __init__(self, delay: float):
        judge = self
        self.delay, self.requests = float(delay), 0
        lock = threading.Lock()

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                time.sleep(judge.delay)
                with lock:
                    judge.requests += 1
                text = body["messages"][-1]["content"]
                a, rest = text.split("Response A: ", 1)[1].split("\n\nResponse B: ", 1)
                b = rest.rsplit("\n\nReply with", 1)[0]
                p = 0.8 if len(a) > len(b) else 0.2 if len(a) < len(b) else 0.5
                tops = [{"token": "A", "logprob": math.log(p)}, {"token": "B", "logprob": math.log(1 - p)}]
                data = json.dumps({"choices": [{"message": {"content": "A"}, "logprobs": {"content": [
                    {"token": "A", "logprob": tops[0]["logprob"], "top_logprobs": tops}]}}],
                    "usage": {"prompt_tokens": len(text) // 4, "completion_tokens": 1}}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


def parse_args(argv):
    ap = argparse.ArgumentParser(prog="python -m repo_jax.bench overlap", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=32, help="prompts per round")
    ap.add_argument("--responses", type=int, default=4, help="responses per prompt (K)")
    ap.add_argument("--new-tokens", type=int, default=64, help="max new tokens per response")
    ap.add_argument("--batch", type=int, default=8, help="pairs per update")
    ap.add_argument("--delay", type=float, default=0.2, help="seconds the judge takes per request")
    ap.add_argument("--concurrency", type=int, default=4, help="requests in flight (max_concurrency)")
    ap.add_argument("--waves", type=int, default=4, help="loop.sample_waves of the overlapped round")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from repo_jax import config as config_lib
    from repo_jax.benchmarks.round import PROMPT_LEN, our_round
    from repo_jax.irepo import default_config_path
    from repo_jax.loop.config import IrepoConfig
    from repo_jax.loop.state import Run

    args = parse_args(argv)
    judge = DelayedJudge(args.delay)
    panel = (f"annotate.panel=[{{kind: rule, name: reward}}, {{kind: served_judge, name: judge/remote, model: m, "
             f"base_url: '{judge.url}', max_concurrency: {args.concurrency}}}]")
    result: dict = {"bench": "overlap", "prompts": args.prompts, "responses": args.responses, "delay_s": args.delay,
                    "concurrency": args.concurrency, "waves": args.waves}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            cfg = config_lib.load(IrepoConfig, default_config_path(), [
                f"run_dir={tmp}/run", f"loop.num_responses={args.responses}", f"loop.prompts_per_round={args.prompts}",
                "loop.epochs=1", "loop.progress=false", panel, f"sample.max_new_tokens={args.new_tokens}",
                f"data.max_prompt_len={PROMPT_LEN}", f"train.seq_len={PROMPT_LEN + 2 * args.new_tokens}",
                f"train.batch_size={args.batch}", "eval.kl_samples=0", "loop.rounds=4"])
            run = Run(cfg, log=lambda *a, **k: None)
            timed = {}
            for t, waves in enumerate((1, args.waves, 1, args.waves), start=1):
                run.cfg = dataclasses.replace(run.cfg, loop=dataclasses.replace(run.cfg.loop, sample_waves=waves))
                asked = judge.requests
                out = our_round(run, t)
                out["requests"] = judge.requests - asked
                kind = "sequential" if waves == 1 else "overlapped"
                print(f"round {t} ({'warm-up, ' if t <= 2 else ''}{kind}, sample_waves={waves}): "
                      + ", ".join(f"{p} {out[p]:.1f} s" for p in ("sample", "annotate", "reference", "train"))
                      + f", total {out['total']:.1f} s, {out['requests']} judge requests, compile {out['compile_s']:.1f} s",
                      flush=True)
                if t > 2:
                    timed[kind] = out
    finally:
        judge.stop()
    seq, ovl = timed["sequential"], timed["overlapped"]
    bound = max(seq["sample"], seq["annotate"]) + seq["reference"] + seq["train"]
    result.update({f"{k}_{p}_s": round(v[p], 2) for k, v in timed.items()
                   for p in ("sample", "annotate", "reference", "train", "total")})
    result.update(bound_s=round(bound, 2), ratio=round(seq["total"] / ovl["total"], 3),
                  vs_bound=round(ovl["total"] / bound, 3), load=round(os.getloadavg()[0], 2))
    print(f"sequential {seq['total']:.1f} s, overlapped {ovl['total']:.1f} s ({result['ratio']:.2f}x); "
          f"max(sample, annotate) + reference + train of the sequential round = {bound:.1f} s, "
          f"overlapped / that = {result['vs_bound']:.3f} (target <= 1.15)", flush=True)
    emit(result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
