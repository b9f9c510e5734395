"""``python -m repo_jax.convert SRC DST``: convert a checkpoint to an HF folder, through our model.

``SRC`` is an HF folder (safetensors, single or sharded), a ``.gguf`` file (Llama architecture,
dequantised) or the alias ``smollm2``; ``DST`` receives ``config.json``, safetensors and the
tokenizer, loadable by ``transformers.AutoModelForCausalLM.from_pretrained(DST)`` and by
``repo_jax.models.from_pretrained(DST)``. ``--check`` reloads ``DST`` and prints the largest
logit difference against the source on a short input.
"""

from __future__ import annotations

import argparse
import sys

import jax.numpy as jnp
import numpy as np


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m repo_jax.convert", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src", help="HF folder, .gguf file, or 'smollm2'")
    ap.add_argument("dst", help="output folder")
    ap.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                    help="dtype of the written tensors")
    ap.add_argument("--max-shard-gb", type=float, default=4.0)
    ap.add_argument("--no-tokenizer", action="store_true", help="do not copy the tokenizer")
    ap.add_argument("--check", action="store_true", help="reload DST and compare logits")
    args = ap.parse_args(argv)

    from repo_jax import models
    from repo_jax.assets import load_tokenizer, resolve_model_path

    src = resolve_model_path(args.src)
    try:
        model = models.from_pretrained(src)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = models.save_pretrained(model, args.dst, dtype=getattr(jnp, args.dtype),
                                 max_shard_bytes=int(args.max_shard_gb * (1 << 30)))
    if not args.no_tokenizer:
        try:
            load_tokenizer(src).save_pretrained(str(out))
        except (OSError, ValueError) as e:
            print(f"note: no tokenizer copied ({e})")
    cfg = model.config
    print(f"wrote {out}: {cfg.hf_model_type}, {models.param_count(cfg):,} parameters, {args.dtype}")
    if args.check:
        ids = np.arange(1, 17, dtype=np.int32)[None] % cfg.vocab_size
        diff = float(np.abs(np.asarray(models.from_pretrained(out)(ids)) - np.asarray(model(ids))).max())
        print(f"check: max |logit difference| after the round trip = {diff:.3g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
