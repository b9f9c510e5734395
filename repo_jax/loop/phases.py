"""The phases of a round on a built :class:`~repo_jax.loop.state.Run`: sample and annotate
(or reuse the round file), reference log-probs, train, evaluate. See :mod:`repo_jax.loop.runner`."""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from repo_jax import reporting
from repo_jax.data import unpad_prompts
from repo_jax.loop import rounds
from repo_jax.loop.evaluate import kl_estimate, win_rate
from repo_jax.loop.state import Run
from repo_jax.runs import Preempted
from repo_jax.training import objectives
from repo_jax.training import step as sp

TRAIN_METRICS = ("loss", "reward_margin", "reward_accuracy", "calibration_error")

def evaluate(run: Run, iteration: int) -> tuple[dict, list[str]]:
    """``eval/*`` of the current policy (``run.policy``); also writes the answers file."""
    cfg, t0 = run.cfg, time.perf_counter()
    e = len(run.eval_ids)
    kl_ids = run.eval_ids[:cfg.eval.kl_prompts or None] if cfg.eval.kl_samples and iteration > 0 else []
    one_call = bool(kl_ids) and cfg.eval.kl_samples == 1  # greedy answers and KL samples in one sampler call
    prompts = run.eval_ids + (kl_ids if one_call else [])
    rows, logps = rounds.sample_with_logps(
        run.policy, prompts, num_samples=1, max_new_tokens=cfg.eval_max_new_tokens,
        temperature=[0.0] * e + [1.0] * len(kl_ids) if one_call else 0.0, top_p=None, top_k=None,
        eos_id=run.eos_id, pad_id=run.pad_id, seed=run.seed(iteration, 2), slots=cfg.loop.sample_batch,
        mesh=run.sampler_mesh(),
        progress=lambda x, **k: run.bar(x, desc=f"eval {iteration}: answers" + (" + KL samples" if one_call else ""),
                                        unit="batch", **k))
    ids = [r[0] for r in rows[:e]]
    texts = [run.decode(r) for r in ids]
    first = texts if iteration == 0 else run.progress.baseline_answers
    out: dict[str, Any] = {}
    if run.task is not None:
        out["eval/reward"] = float(np.mean([run.task.reward(p, a) for p, a in zip(run.eval_texts, texts)]))
        per = [run.task.metrics(p, a) for p, a in zip(run.eval_texts, texts)]
        out.update({f"eval/{k}": float(np.mean([m[k] for m in per])) for k in per[0]})
    run.panel.take_counts("eval")
    out["eval/win_rate"] = win_rate(run.panel, run.eval_texts, texts, first)
    out.update(run.panel.take_counts("eval"))  # what the win rate's judgements cost
    out["eval/length"] = float(np.mean([len(r) for r in ids]))
    out["eval/kl"] = 0.0
    if kl_ids:
        if one_call:
            samples, logps_t = rows[e:], logps[e:]
        else:
            samples, logps_t = rounds.sample_with_logps(
                run.policy, kl_ids, num_samples=cfg.eval.kl_samples, max_new_tokens=cfg.eval_max_new_tokens,
                temperature=1.0, top_p=None, top_k=None, eos_id=run.eos_id, pad_id=run.pad_id,
                seed=run.seed(iteration, 2), slots=cfg.loop.sample_batch, mesh=run.sampler_mesh(),
                progress=lambda x, **k: run.bar(x, desc=f"eval {iteration}: KL samples", unit="batch", **k))
        out["eval/kl"] = kl_estimate(run.ref_logprobs, run.pi0, kl_ids, samples, logps_t,
                                     batch_size=cfg.train.batch_size, num_responses=cfg.train.num_responses,
                                     seq_len=cfg.train.seq_len, pad_id=run.pad_id, to_device=run.to_device,
                                     to_host=run.to_host, layout=cfg.train.layout)
    if run.main:
        reporting.write_jsonl_atomic(run.run_dir / "eval" / f"answers_{iteration:03d}.jsonl", [
            {"iteration": iteration, "prompt": p, "answer": a, "tokens": len(r)}
            for p, a, r in zip(run.eval_texts, texts, ids)])
    out["time/eval"] = time.perf_counter() - t0
    return out, texts


class Prefetch:
    """Asks the panel's served members about a wave of responses in a background thread (their
    answers land in the members' caches), so the judge machines work while the sampler decodes
    the next wave; the judgements themselves are made afterwards, in order, from the caches, so
    they equal those of a round sampled in one call. A failure here is only logged: judging
    asks again and fails with the named error. ``panel=None`` (every process but 0): nothing."""

    def __init__(self, panel, log):
        from concurrent.futures import ThreadPoolExecutor

        self.members = panel.offloaded if panel is not None else []
        self.log, self.busy_s, self.failures = log, 0.0, []
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="prefetch") if self.members else None
        self.futures = []

    def submit(self, prompts: list[str], responses: list[list[str]]) -> None:
        if self.pool is not None:
            self.futures.append(self.pool.submit(self._ask, prompts, responses))

    def _ask(self, prompts, responses) -> None:
        t0 = time.perf_counter()
        for m in self.members:
            try:
                m.prefetch(prompts, responses)
            except Exception as e:  # noqa: BLE001 - judging asks again and raises the named error
                self.failures.append(f"{m.name}: {e}")
        self.busy_s += time.perf_counter() - t0

    def wait(self) -> dict[str, float]:
        """Waits for the waves still being asked; ``time/annotate_ahead``: seconds the thread
        spent asking (overlapped with sampling, but for what remains after the last wave)."""
        if self.pool is None:
            return {}
        for f in self.futures:
            f.result()
        self.pool.shutdown()
        if not self.futures:
            return {}
        if self.failures:
            self.log(f"asking ahead failed ({self.failures[0]}); the judgements ask again")
        return {"time/annotate_ahead": self.busy_s}


def sample_and_annotate(run: Run, t: int, batch: dict) -> tuple[list[dict], dict]:
    """Round ``t``'s records: from its round file when a previous attempt wrote it, else by
    sampling ``K`` responses per prompt and annotating them (then the file is written)."""
    cfg, times = run.cfg, {}
    valid = batch["example_mask_B"]
    prompt_ids = unpad_prompts(batch["prompt_ids_BxT"], batch["prompt_len_B"], valid)
    prompt_texts = [str(x) for x, v in zip(batch["prompt_text_B"], valid) if v]
    path = run.run_dir / "rounds" / f"round_{t:03d}.jsonl"
    run.panel.take_counts("annotate")  # from here on: this round's annotation only
    if path.is_file():
        records = reporting.read_jsonl(path)
        if [r["prompt_ids"] for r in records] == prompt_ids:
            run.log(f"round {t}: reusing {path} (no re-sampling)")
            run.policy = None
            return records, {"time/sample": 0.0, "time/annotate": 0.0}
        run.log(f"round {t}: {path} holds other prompts; sampling again")
    t0 = time.perf_counter()
    s, k = cfg.sample, cfg.loop.num_responses
    run.policy = run.policy or run.make_policy()
    run.panel.reset()
    ahead = Prefetch(run.panel if run.main else None, run.log)
    responses, logps, texts = [], [], []
    # same on every host; a wave fills the decode slots at least once (smaller ones decode half-empty)
    count = min(cfg.loop.sample_waves, len(prompt_ids) * k // cfg.loop.sample_batch) if run.panel.offloaded else 1
    waves = rounds.waves(len(prompt_ids), count)
    for a, b in waves:  # each wave's responses go to the served judges while the next one decodes
        got, lp = rounds.sample_with_logps(
            run.policy, prompt_ids[a:b], num_samples=k, max_new_tokens=s.max_new_tokens,
            temperature=s.temperature, top_p=s.top_p, top_k=s.top_k, eos_id=run.eos_id, pad_id=run.pad_id,
            seed=run.seed(t, 1), slots=cfg.loop.sample_batch, mesh=run.sampler_mesh(), row_offset=a * k,
            progress=lambda x, **kw: run.bar(x, desc=f"round {t}: sample" + (f" {a}-{b}" if len(waves) > 1 else ""),
                                             unit="batch", **kw))
        responses += got
        logps += lp
        texts += [[run.decode(r) for r in rows] for rows in got]
        if len(waves) > 1:
            ahead.submit(prompt_texts[a:b], texts[a:])
    run.policy = None  # free the sampling copy before training
    times["time/sample"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    times.update(ahead.wait())
    ann = rounds.annotate(run.panel, prompt_texts, texts, pseudo_count=cfg.annotate.pseudo_count,
                          progress=lambda x: run.bar(x, desc=f"round {t}: annotate", unit="annotator"))
    pairs = rounds.select(ann["strengths_PxK"], cfg.loop.pairs)
    records = rounds.round_records(t, prompt_texts, prompt_ids, responses, texts, ann, run.panel.names, pairs,
                                   run.eos_id, logps=logps if cfg.loop.reference == "sampler" else None)
    if run.main:
        reporting.write_jsonl_atomic(path, records)
    # served members: requests, cached answers, usage tokens, unreadable answers (ties)
    times.update(run.panel.take_counts("annotate"))
    times["time/annotate"] = time.perf_counter() - t0
    return records, times


def reference_logps(run: Run, items: list[dict]) -> np.ndarray:
    """``log pi_ref`` of every response of the round's items, ``[M, K]``, with the round's
    starting parameters (before any update): the sampler's own log-probs with
    ``loop.reference=sampler`` (padding of a ragged list: 0), else a forward pass."""
    cfg = run.cfg
    if cfg.loop.reference == "sampler" and items and all(None not in it["ref_logps"] for it in items):
        k = cfg.train.num_responses
        return np.array([list(it["ref_logps"]) + [0.0] * (k - len(it["ref_logps"])) for it in items], np.float32)
    batches = rounds.collate_batches(items, range(len(items)), batch_size=cfg.train.batch_size,
                                     num_responses=cfg.train.num_responses, seq_len=cfg.train.seq_len,
                                     pad_id=run.pad_id, layout=cfg.train.layout)
    out = [run.to_host(run.ref_logprobs(run.state.params, run.state.frozen, run.to_device(b)))
           for b in run.bar(batches, desc="reference log-probs", unit="batch")]
    return np.concatenate(out)[:len(items)] if out else np.zeros((0, cfg.train.num_responses), np.float32)


def train(run: Run, t: int, items: list[dict], ref_MxK: np.ndarray, stop, observe=None) -> dict:
    """``loop.epochs`` epochs over the round's items from ``run.progress.train_pos``; saves mid-round
    every ``checkpoint.every_steps`` steps and when ``stop()`` says so (then raises Preempted).
    Step ``n``'s metrics are read once step ``n + 1`` is dispatched, so the host collates the next
    batch while the devices run this one. ``observe(host_batch)``, when given, sees each batch
    (the round benchmark counts its FLOPs)."""
    cfg = run.cfg
    b = cfg.train.batch_size
    per_epoch = rounds.num_batches(len(items), b)
    total = per_epoch * cfg.loop.epochs
    sums = sp.StepSums(TRAIN_METRICS, cfg.train.max_nonfinite_in_a_row, run.progress.train_sums)
    bar = run.bar(total=total, desc=f"round {t}: train", unit="step")
    bar.update(run.progress.train_pos)
    lengths = [rounds.row_length(it, cfg.train.layout) for it in items]
    epoch_items, at_epoch = None, -1
    for pos in range(run.progress.train_pos, total):
        epoch, j = divmod(pos, per_epoch)
        if epoch != at_epoch:  # the epoch's order, once (a function of the seed: resume rebuilds it)
            epoch_items, at_epoch = rounds.epoch_order(lengths, b, run.seed(t, 3, epoch),
                                                       group_by_length=cfg.loop.group_by_length), epoch
        order = epoch_items[j * b:(j + 1) * b]
        host = rounds.collate_batches(items, order, batch_size=b, num_responses=cfg.train.num_responses,
                                      seq_len=cfg.train.seq_len, pad_id=run.pad_id, layout=cfg.train.layout)[0]
        host["ref_logps_BxK"] = np.zeros(host["list_mask_BxK"].shape, np.float32)
        host["ref_logps_BxK"][:len(order)] = ref_MxK[order]
        run.state, m = run.train_step(run.state, run.to_device(host))
        sums.push(m)  # reads the previous step's metrics, now that this one is queued
        if observe is not None:
            observe(host)
        real, padded = rounds.token_counts(host)
        sums.add("tokens", real)
        sums.add("padded_tokens", padded)
        bar.set_postfix(loss=f"{sums.mean('loss'):.4f}")
        bar.update(1)
        run.progress.global_steps += 1
        done = pos + 1
        every = cfg.checkpoint.every_steps
        if stop() or (every and done < total and run.progress.global_steps % every == 0):
            run.save(phase="train", train_pos=done, train_sums=sums.flush(), ref_logps=ref_MxK.tolist())
            if stop():
                raise Preempted(f"round {t}, train step {done} of {total}")
    bar.close()
    return sums.flush()


def train_record(sums: dict, items: list[dict], ties: int, records: list[dict], run: Run) -> dict:
    """The round's ``train/*`` figures (example-weighted means over its steps) and the mean
    task reward of what it sampled (``round/sample_reward``)."""
    keys = [k for k in TRAIN_METRICS if k != "calibration_error" or "pref_B" in objectives.get(run.cfg.train.loss.name).needs]
    out = {**sp.mean_record(sums, keys), "train/examples": len(items), "train/ties_dropped": ties}
    if sums.get("padded_tokens"):  # what the model ran: real tokens and the share of padding
        out["train/tokens"] = int(sums["tokens"])
        out["train/padded_tokens"] = int(sums["padded_tokens"])
        out["train/pad_fraction"] = 1.0 - sums["tokens"] / sums["padded_tokens"]
    if run.task is not None:
        rewards = [run.task.reward(r["prompt"], x["text"]) for r in records for x in r["responses"]]
        out["round/sample_reward"] = float(np.mean(rewards))
    return out


