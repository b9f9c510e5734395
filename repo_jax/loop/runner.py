"""The iREPO host loop: rounds of sample -> annotate -> reference -> train -> evaluate -> checkpoint.

``run(cfg)`` is what ``python -m repo_jax.irepo`` runs. Iteration ``t`` is the policy ``pi_t``;
``pi_0`` is the starting model, evaluated first. Round ``t`` (1-based) samples from
``pi_{t-1}``, takes ``pi_ref <- pi_{t-1}`` (reference log-probs computed once, before any
update), trains to ``pi_t``, evaluates it, checkpoints, and appends iteration ``t`` to
``run_dir/metrics.jsonl``.

What a run keeps in ``run_dir``: ``config.yaml`` (the resolved config, written at start),
``rounds/round_{t:03d}.jsonl`` (what each round sampled, how the panel judged it, the pairs
and ``p_hat`` taught), ``eval/answers_{t:03d}.jsonl`` (the greedy held-out answers),
``metrics.jsonl``, ``tb/`` (TensorBoard), ``report.png`` and ``checkpoints/`` (Orbax).

Resume and faults. A checkpoint holds the train state (parameters, AdamW moments, step, RNG),
the prompt iterator's position and a JSON ``loop`` item: the iteration reached, the phase, the
metric records so far and iteration 0's answers; a save in the middle of training also holds
the position in the round and the round's reference log-probs. Checkpoints are written at the
end of every round, every ``checkpoint.every_steps`` train steps, and on SIGTERM (then the
program exits with status 143). Rerunning with the same ``run_dir`` restores the newest one,
rewrites ``metrics.jsonl`` from its records (so a kill between the checkpoint and the append
loses or duplicates nothing), reuses a round file that was written instead of sampling again,
and every seed is a function of the config and the round, so the metrics equal an
uninterrupted run's. A finished run prints its table and exits; a ``run_dir`` holding a run
with another config is an error naming the differing keys.

LoRA (``model.lora.rank`` > 0). Only the adapters train; the base stays the loaded weights on
the same arrays throughout (``loop.lora_merge=never``) or absorbs each round's adapters at the
next round's start (``every_round``). Round ``t``'s reference ``pi_{t-1}`` is the base plus the
adapters as they stand before the round's first update: its log-probs are computed once from
them (or taken from the sampler), so no copy of the base or the adapters is kept. The sampler
decodes a copy with the adapters merged in, made once per round. Checkpoints hold the adapters,
their AdamW moments and the loop state; the base's source and exact checksum are recorded and a
resume on other base weights is refused (with ``every_round`` the base is saved too). The
export adds ``run_dir/adapter``, a PEFT folder, beside the merged ``run_dir/policy``.

Several hosts. Every process runs this same program on the same config: each reads the whole
round's prompts (the prompt pipeline is not sharded by host), the sampler's outputs are
replicated, so every host holds every response, and annotation is deterministic, so every host
computes the same pairs; each then feeds its own rows of the global train batch
(``sharding.process_batch_slice``). Only process 0 writes files (round files, metrics,
TensorBoard, report); checkpoints are written by all, as Orbax requires.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np

from repo_jax import config as config_lib
from repo_jax import reporting
from repo_jax import sharding as shd
from repo_jax.loop import rounds
from repo_jax.loop.config import IrepoConfig
from repo_jax.loop.phases import evaluate, reference_logps, sample_and_annotate, train, train_record
from repo_jax.loop.state import Run
from repo_jax.runs import Preempted, run_until_preempted

__all__ = ["Preempted", "Run", "run"]

def run(cfg: IrepoConfig, log=print) -> list[dict]:
    """Runs (or resumes) the loop; returns the metric records (one per iteration)."""
    shd.initialize_distributed()
    return run_until_preempted(Run(cfg, log=log), _loop, log)


def _emit(r: Run, record: dict, tb) -> None:
    if r.main:
        reporting.append_jsonl(r.run_dir / "metrics.jsonl", record)
        tb.write(record)
        tb.flush()
        reporting.plot_report(r.progress.records, r.run_dir / "report.png", title=f"{r.cfg.task or 'run'}: "
                              f"{r.cfg.train.loss.name}")
        r.log(reporting.format_row(record))


def _loop(r: Run, stop) -> list[dict]:
    cfg = r.cfg
    resumed = r.restore()
    if resumed and r.main:
        reporting.write_jsonl_atomic(r.run_dir / "metrics.jsonl", r.progress.records)
    done = r.progress.iteration
    if done >= cfg.loop.rounds and r.progress.phase == "done":
        if cfg.loop.export and not (r.run_dir / "policy" / "config.json").is_file():
            export_policy(r)  # killed after the last checkpoint, before the export
        r.log(f"{r.cfg.run_dir}: finished ({done} rounds)\n" + reporting.summary_table(r.progress.records))
        return r.progress.records
    if resumed:
        r.log(f"resuming {r.cfg.run_dir} at iteration {done} (phase {r.progress.phase})")
    tb = reporting.TensorBoard(r.run_dir / "tb", purge_step=done + 1) if r.main else None
    r.log(reporting.table_header())
    try:
        if done < 0:  # iteration 0: the starting policy
            r.policy = r.make_policy()
            rec, answers = evaluate(r, 0)
            rec = {"iteration": 0, **rec, "time/round": rec["time/eval"]}
            r.progress.records.append(rec)
            r.save(iteration=0, phase="done", baseline_answers=answers, data_state=r.iterator.get_state())
            _emit(r, rec, tb)
        for t in range(r.progress.iteration + 1, cfg.loop.rounds + 1):
            _round(r, t, stop, tb)
    finally:
        if tb is not None:
            tb.close()
    if cfg.loop.export:
        export_policy(r)
    cost = reporting.served_cost(r.progress.records)
    if cost:
        r.log(cost)
    r.log(f"report: {r.run_dir / 'report.png'}   metrics: {r.run_dir / 'metrics.jsonl'}")
    return r.progress.records


def export_policy(r: Run) -> None:
    """``run_dir/policy``: the final parameters as an HF folder (see ``LoopConfig.export``); with
    LoRA on the loaded base (``loop.lora_merge=never``) also ``run_dir/adapter``, a PEFT folder."""
    from repo_jax.training.state import export_policy as export

    out = r.run_dir / "policy"
    peft = r.cfg.model.lora.rank and r.cfg.loop.lora_merge == "never"
    adapter = r.run_dir / "adapter" if peft else None
    if export(r.graphdef, r.state, r.tokenizer, out, adapter_out=adapter, base_model=r.cfg.model.weights):
        r.log(f"policy: {out} (python -m repo_jax.evaluate ... --model {out})"
              + (f"; PEFT adapter on {r.cfg.model.weights or 'the base'}: {adapter}" if adapter else ""))
    else:
        r.log(f"loop.export: skipped (several processes; on one host: python -m repo_jax.export {r.cfg.run_dir})")


def _round(r: Run, t: int, stop, tb) -> None:
    cfg = r.cfg
    if stop():
        raise Preempted(f"before round {t}")
    t_round = time.perf_counter()
    mid = r.progress.phase == "train"
    before = r.iterator.get_state()
    try:
        batch = next(r.iterator)
    except StopIteration:
        raise config_lib.ConfigError(f"the prompts of {r.prompts.cfg.path} ran out in round {t} "
                                     "(data.num_epochs); set data.num_epochs=0 to cycle") from None
    records, times = sample_and_annotate(r, t, batch)
    items, ties = rounds.train_items(records, cfg)
    t0 = time.perf_counter()
    if mid:
        ref = np.asarray(r.progress.ref_logps, np.float32).reshape(len(items), cfg.train.num_responses)
        times.update(r.progress.times)
    else:
        if r._fold is not None and t > 1:  # loop.lora_merge=every_round
            r.fold_adapters(t)
        ref = reference_logps(r, items)
        if cfg.loop.optimizer == "reset":
            r.reset_optimizer()
        r.progress = dataclasses.replace(r.progress, train_pos=0, train_sums={}, ref_logps=[], data_state=before)
    times["time/reference"] = times.get("time/reference", 0.0) + time.perf_counter() - t0
    r.progress.times = times
    if stop():
        raise Preempted(f"round {t}, before training")
    t0 = time.perf_counter()
    sums = train(r, t, items, ref, stop)
    times["time/train"] = times.get("time/train", 0.0) + time.perf_counter() - t0
    r.policy = r.make_policy()
    ev, _ = evaluate(r, t)
    rec = {"iteration": t, **ev, **train_record(sums, items, ties, records, r), **times}
    rec["time/round"] = sum(rec[k] for k in ("time/sample", "time/annotate", "time/reference", "time/train",
                                             "time/eval")) if mid else time.perf_counter() - t_round
    r.progress.records.append(rec)
    r.save(iteration=t, phase="done", train_pos=0, train_sums={}, ref_logps=[], times={},
           data_state=r.iterator.get_state())
    _emit(r, rec, tb)
