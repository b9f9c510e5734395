"""``python -m repo_jax.bench logprobs``: chunked vs naive sequence log-probs, fwd+bwd.

For B=8, T=2048, D=2048 and V in {32000, 51200} (Mistral's and Phi-2's vocabularies) it compiles
``value_and_grad`` (w.r.t. hidden states and unembedding) of both kernels, reads the compiled
peak temporary memory from ``memory_analysis()``, and times them in the same run.
``memory_ratio`` = chunked / naive peak temporary memory (target <= 1/8); ``ratio`` = naive time /
chunked time (target >= 1/1.2, i.e. chunked at most 1.2x slower). ``--small`` runs a quick size.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

from repo_jax import logprobs
from repo_jax.benchmarks.common import emit, time_fn

Array = jax.Array


def token_logprobs_naive(hidden: Array, unembed: Array, targets: Array, bias: Array | None = None) -> Array:
    """The baseline: full ``[B, T, V]`` float32 logits, ``log_softmax``, gather (written
    independently of :mod:`repo_jax.logprobs`, which the tests compare against it)."""
    logits_BxTxV = jnp.einsum("BTD,DV->BTV", hidden.astype(jnp.float32), unembed.astype(jnp.float32))
    if bias is not None:
        logits_BxTxV = logits_BxTxV + bias.astype(jnp.float32)
    logp_BxTxV = jax.nn.log_softmax(logits_BxTxV, axis=-1)
    return jnp.take_along_axis(logp_BxTxV, targets.astype(jnp.int32)[..., None], axis=-1)[..., 0]


def sequence_logprobs_naive(
    hidden: Array, unembed: Array, targets: Array, mask: Array, bias: Array | None = None
) -> Array:
    """The baseline of :func:`repo_jax.logprobs.sequence_logprobs` (materialises the full logits)."""
    logp_BxT = token_logprobs_naive(hidden, unembed, targets, bias)
    return jnp.einsum("BT,BT->B", logp_BxT, mask.astype(jnp.float32))


def _step(fn):
    def loss(h, w, targets, mask):
        return fn(h, w, targets, mask).sum()

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))


def run_one(b: int, t: int, d: int, v: int, chunk: int, dtype, repeats: int) -> dict:
    k = jax.random.split(jax.random.key(0), 3)
    h = jax.random.normal(k[0], (b, t, d), dtype)
    w = (jax.random.normal(k[1], (d, v), jnp.float32) / d**0.5).astype(dtype)
    targets = jax.random.randint(k[2], (b, t), 0, v)
    mask = jnp.ones((b, t), bool).at[:, : t // 4].set(False)
    out = {}
    for name, fn in (
        ("naive", sequence_logprobs_naive),
        ("chunked", lambda *a: logprobs.sequence_logprobs(*a, chunk_size=chunk)),
    ):
        step = _step(fn)
        compiled = step.lower(h, w, targets, mask).compile()
        mem = compiled.memory_analysis()
        secs = time_fn(lambda: compiled(h, w, targets, mask), repeats=repeats)
        out[name] = {"temp_bytes": int(mem.temp_size_in_bytes), "seconds": secs}
        print(f"  {name:8s} V={v}: peak temp {mem.temp_size_in_bytes / 2**30:7.3f} GiB, fwd+bwd {secs:7.3f} s", flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m repo_jax.bench logprobs", description=__doc__)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--dim", type=int, default=2048)
    ap.add_argument("--vocab", type=int, nargs="+", default=[32000, 51200])
    ap.add_argument("--chunk", type=int, default=128, help="positions per chunk")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--small", action="store_true", help="B=4 T=512 D=256 V=8192: a quick run")
    args = ap.parse_args(argv)
    if args.small:
        args.batch, args.seq, args.dim, args.vocab, args.chunk = 4, 512, 256, [8192], 64
    dtype = jnp.dtype(args.dtype)
    print(f"logprobs fwd+bwd: B={args.batch} T={args.seq} D={args.dim} chunk={args.chunk} {args.dtype} on {jax.devices()[0].platform}")
    rows = {}
    for v in args.vocab:
        r = run_one(args.batch, args.seq, args.dim, v, args.chunk, dtype, args.repeats)
        mem_ratio = r["chunked"]["temp_bytes"] / r["naive"]["temp_bytes"]
        ratio = r["naive"]["seconds"] / r["chunked"]["seconds"]
        rows[v] = {"memory_ratio": mem_ratio, "ratio": ratio, **r}
        print(f"  V={v}: memory_ratio {mem_ratio:.4f} (chunked/naive), speed ratio {ratio:.3f} (naive time / chunked time)")
    first = rows[args.vocab[0]]
    emit(
        {
            "bench": "logprobs",
            "ratio": round(first["ratio"], 4),
            "memory_ratio": round(first["memory_ratio"], 4),
            "shape": {"B": args.batch, "T": args.seq, "D": args.dim, "chunk": args.chunk, "dtype": args.dtype},
            "by_vocab": {str(v): {"ratio": round(r["ratio"], 4), "memory_ratio": round(r["memory_ratio"], 4)} for v, r in rows.items()},
        }
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
