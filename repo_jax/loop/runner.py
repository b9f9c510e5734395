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

Several hosts. Every process runs this same program on the same config: each reads the whole
round's prompts (the prompt pipeline is not sharded by host), the sampler's outputs are
replicated, so every host holds every response, and annotation is deterministic, so every host
computes the same pairs; each then feeds its own rows of the global train batch
(``sharding.process_batch_slice``). Only process 0 writes files (round files, metrics,
TensorBoard, report); checkpoints are written by all, as Orbax requires.
"""

from __future__ import annotations

import dataclasses
import json
import signal
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import yaml
from flax import nnx

from repo_jax import config as config_lib
from repo_jax import reporting, sampling
from repo_jax import sharding as shd
from repo_jax.data import DataConfig, make_pipeline, unpad_prompts
from repo_jax.data.tokenize import Formatter
from repo_jax.loop import rounds
from repo_jax.loop.config import IrepoConfig, check
from repo_jax.loop.evaluate import greedy_answers, kl_estimate, win_rate
from repo_jax.loop.panels import build_panel
from repo_jax.training import batch as bt
from repo_jax.training import objectives, optim
from repo_jax.training import state as st
from repo_jax.training import step as sp
from repo_jax.training.checkpoint import Checkpointer

# keys that may change between a run and its resumption (they do not change any result)
RESUMABLE_KEYS = ("loop.rounds", "loop.progress")
TRAIN_METRICS = ("loss", "reward_margin", "reward_accuracy", "calibration_error")


class Preempted(Exception):
    """SIGTERM arrived; a checkpoint was written (or the last one is current)."""


class ConfigMismatch(config_lib.ConfigError):
    pass


# ------------------------------------------------------------------------ run folder, config


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        out.update(_flatten(v, key + ".") if isinstance(v, dict) else {key: v})
    return out


def _plain(x):
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    return x


def prepare_run_dir(cfg: IrepoConfig) -> Path:
    """Creates ``run_dir``, writes ``config.yaml``, or checks it against the saved one."""
    run_dir = Path(cfg.run_dir)
    resolved = _plain(config_lib.to_dict(cfg))
    saved_path = run_dir / "config.yaml"
    if saved_path.is_file():
        saved = yaml.safe_load(saved_path.read_text()) or {}
        a, b = _flatten(saved), _flatten(resolved)
        diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k) and k not in RESUMABLE_KEYS)
        if diff:
            shown = ", ".join(f"{k} ({a.get(k)!r} -> {b.get(k)!r})" for k in diff[:5])
            raise ConfigMismatch(f"{run_dir} holds a run with another config: {shown}"
                                 f"{' ...' if len(diff) > 5 else ''}; use a new run_dir or the saved config")
    if jax.process_index() == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        tmp = saved_path.with_suffix(".yaml.tmp")
        tmp.write_text(yaml.safe_dump(resolved, sort_keys=False))
        tmp.replace(saved_path)
    return run_dir


def load_tokenizer_for(section):
    """The tokenizer of a ``model`` section (``model.tokenizer``, else from ``model.weights``)."""
    from repo_jax.assets import load_tokenizer

    source = section.tokenizer or section.weights
    if source == "bytes":
        from repo_jax.data.byte_tokenizer import ByteTokenizer

        return ByteTokenizer()
    if not source:
        raise config_lib.ConfigError("model.tokenizer and model.weights are both empty: a random-init model needs "
                                     "model.tokenizer (bytes, an HF folder or a .gguf)")
    return load_tokenizer(st.resolve_path(source))


# ------------------------------------------------------------------------------ the run


@dataclasses.dataclass
class Progress:
    """Where the run stands (the ``loop`` item of a checkpoint)."""

    iteration: int = -1          # the last evaluated policy (-1: not even pi_0 yet)
    phase: str = "done"          # "done" (iteration complete) or "train" (inside round iteration + 1)
    records: list = dataclasses.field(default_factory=list)
    baseline_answers: list = dataclasses.field(default_factory=list)
    saves: int = 0
    train_pos: int = 0
    ref_logps: list = dataclasses.field(default_factory=list)
    train_sums: dict = dataclasses.field(default_factory=dict)
    times: dict = dataclasses.field(default_factory=dict)
    global_steps: int = 0
    data_state: dict = dataclasses.field(default_factory=dict)  # prompt iterator before this phase's round


class Run:
    """Everything built once per run (model, optimiser, programs, data, panel)."""

    def __init__(self, cfg: IrepoConfig, log=print):
        from repo_jax.tasks import get_task

        check(cfg)
        self.cfg, self.log = cfg, log
        self.main = jax.process_index() == 0
        self.run_dir = prepare_run_dir(cfg)
        self.mesh = shd.make_mesh(cfg.mesh)
        self.task = get_task(cfg.task) if cfg.task else None
        self.tokenizer = load_tokenizer_for(cfg.model)
        self.formatter = Formatter(self.tokenizer, chat_template=cfg.data.chat_template)
        self.eos_id = self.tokenizer.eos_token_id
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.panel = build_panel(cfg.annotate.panel, self.task)

        model = self._start_model()
        self.tx = optim.make_optimizer(cfg.optim)
        self.graphdef, state, self.shardings = st.state_from_model(model, self.tx, cfg.train, self.mesh)
        del model
        self.abstract = jax.eval_shape(lambda s: s, state)
        self.state = state
        self.pi0 = jax.tree.map(jnp.copy, state.params) if cfg.eval.kl_samples else None
        self.train_step = sp.make_train_step(self.graphdef, cfg, self.mesh, self.shardings)
        self.ref_logprobs = sp.make_reference_logprobs(self.graphdef, cfg.train, self.mesh, self.shardings.params)
        tx, sh = self.tx, self.shardings
        self._reset_opt = jax.jit(lambda s: s.replace(opt_state=tx.init(s.params)), in_shardings=(sh,),
                                  out_shardings=sh, donate_argnums=0)

        data = self._prompt_data_config()
        self.prompts = make_pipeline(data, self.tokenizer, kind="prompt", run_dir=self.run_dir if self.main else None,
                                     log=log if self.main else None)
        self.iterator = self.prompts.iterator()
        self.eval_texts, self.eval_ids = self._eval_prompts()
        self.checkpointer = Checkpointer(cfg.checkpoint_dir, dataclasses.replace(cfg.checkpoint, every_steps=1))
        self.progress = Progress()
        self.policy = None  # the sampling copy of the current policy (decoding layout)

    # ---- construction helpers
    def _start_model(self):
        m = self.cfg.model
        if m.weights:
            return st.pretrained_model(m, self.mesh)
        return st.model_factory(m, seed=self.cfg.train.seed)()

    def _prompt_data_config(self) -> DataConfig:
        d = self.cfg.data
        path = d.path or (self.task.prompts_file("train") if self.task else "")
        if not path:
            raise config_lib.ConfigError("data.path is empty and there is no task to take prompts from")
        return dataclasses.replace(d, path=path, batch_size=self.cfg.loop.prompts_per_round, shard_index=0,
                                   shard_count=1)

    def _eval_prompts(self):
        cfg = self.cfg
        if cfg.eval.data_path:
            from repo_jax.data import load_examples
            from repo_jax.data.tokenize import plain_prompt

            d = dataclasses.replace(cfg.data, path=cfg.eval.data_path, split=cfg.eval.data_split or cfg.data.split,
                                    schema="auto")
            examples, _ = load_examples(d, tokenizer=self.tokenizer, log=None)
            convs = [ex["prompt"] for ex in examples[:cfg.eval.num_prompts]]
            texts = [plain_prompt(c) for c in convs]
        else:
            texts = self.task.prompts("eval")[:cfg.eval.num_prompts]
            convs = [[{"role": "user", "content": t}] for t in texts]
        ids = [self.formatter.prompt_ids(c)[-cfg.data.max_prompt_len:] for c in convs]
        return texts, ids

    # ---- small utilities
    def bar(self, iterable=None, *, desc: str, total=None, unit="it"):
        return reporting.progress(iterable, total=total, desc=desc, unit=unit,
                                  enabled=self.cfg.loop.progress and self.main)

    def to_device(self, host_batch: dict) -> dict:
        b = bt.cast(host_batch)
        rows = shd.process_batch_slice(len(b["input_ids_BxKxT"]))
        return shd.global_batch({k: v[rows] for k, v in b.items()}, self.mesh)

    @staticmethod
    def to_host(x) -> np.ndarray:
        if jax.process_count() > 1 and not x.is_fully_addressable:
            from jax.experimental import multihost_utils

            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(jax.device_get(x))

    def decode(self, ids) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True).strip()

    def make_policy(self):
        """The current parameters in the sampling layout (one copy per round, see the sampler)."""
        model = sampling.decoding_model(nnx.merge(self.graphdef, self.state.params, self.state.buffers))
        if self.mesh.size > 1:
            state = nnx.state(model)
            nnx.update(model, jax.device_put(state, sampling.param_shardings(state, self.mesh)))
        return model

    def sampler_mesh(self):
        return self.mesh if self.mesh.size > 1 else None

    def seed(self, *parts: int) -> int:
        return int(np.random.SeedSequence([self.cfg.train.seed, *parts]).generate_state(1)[0] % (2**31 - 64))

    # ---- checkpoints
    def save(self, **changes) -> None:
        p = dataclasses.replace(self.progress, **changes, saves=self.progress.saves + 1)
        self.checkpointer.save(p.saves, self.state, loop=dataclasses.asdict(p), force=True)
        self.progress = p

    def restore(self) -> bool:
        if self.checkpointer.latest_step() is None:
            return False
        self.state, loop = self.checkpointer.restore(self.abstract, self.shardings)
        known = {f.name for f in dataclasses.fields(Progress)}
        self.progress = Progress(**{k: v for k, v in loop.items() if k in known})
        if self.progress.data_state:
            self.iterator.set_state(self.progress.data_state)
        return True


# ------------------------------------------------------------------------------ phases


def evaluate(run: Run, iteration: int) -> tuple[dict, list[str]]:
    """``eval/*`` of the current policy (``run.policy``); also writes the answers file."""
    cfg, t0 = run.cfg, time.perf_counter()
    chunk = cfg.loop.sample_batch * cfg.loop.num_responses
    ids = greedy_answers(run.policy, run.eval_ids, max_new_tokens=cfg.eval_max_new_tokens, eos_id=run.eos_id,
                         pad_id=run.pad_id, chunk=chunk, mesh=run.sampler_mesh(),
                         progress=lambda x, **k: run.bar(x, desc=f"eval {iteration}: answers", unit="batch", **k))
    texts = [run.decode(r) for r in ids]
    first = texts if iteration == 0 else run.progress.baseline_answers
    out: dict[str, Any] = {}
    if run.task is not None:
        out["eval/reward"] = float(np.mean([run.task.reward(p, a) for p, a in zip(run.eval_texts, texts)]))
        per = [run.task.metrics(p, a) for p, a in zip(run.eval_texts, texts)]
        out.update({f"eval/{k}": float(np.mean([m[k] for m in per])) for k in per[0]})
    out["eval/win_rate"] = win_rate(run.panel, run.eval_texts, texts, first)
    out["eval/length"] = float(np.mean([len(r) for r in ids]))
    out["eval/kl"] = 0.0
    if cfg.eval.kl_samples and iteration > 0:
        kl_ids = run.eval_ids[:cfg.eval.kl_prompts or None]
        samples = rounds.sample_responses(
            run.policy, kl_ids, num_samples=cfg.eval.kl_samples, max_new_tokens=cfg.eval_max_new_tokens,
            temperature=1.0, top_p=None, top_k=None, eos_id=run.eos_id, pad_id=run.pad_id,
            seed=run.seed(iteration, 2), chunk=cfg.loop.sample_batch, mesh=run.sampler_mesh(),
            progress=lambda x, **k: run.bar(x, desc=f"eval {iteration}: KL samples", unit="batch", **k))
        flat = [(kl_ids[i], r) for i, rows in enumerate(samples) for r in rows]
        out["eval/kl"] = kl_estimate(run.ref_logprobs, run.state.params, run.pi0, [p for p, _ in flat],
                                     [r for _, r in flat], batch_size=cfg.train.batch_size,
                                     num_responses=cfg.train.num_responses, seq_len=cfg.train.seq_len,
                                     pad_id=run.pad_id, to_device=run.to_device, to_host=run.to_host)
    if run.main:
        reporting.write_jsonl_atomic(run.run_dir / "eval" / f"answers_{iteration:03d}.jsonl", [
            {"iteration": iteration, "prompt": p, "answer": a, "tokens": len(r)}
            for p, a, r in zip(run.eval_texts, texts, ids)])
    out["time/eval"] = time.perf_counter() - t0
    return out, texts


def sample_and_annotate(run: Run, t: int, batch: dict) -> tuple[list[dict], dict]:
    """Round ``t``'s records: from its round file when a previous attempt wrote it, else by
    sampling ``D`` responses per prompt and annotating them (then the file is written)."""
    cfg, times = run.cfg, {}
    valid = batch["example_mask_B"]
    prompt_ids = unpad_prompts(batch["prompt_ids_BxT"], batch["prompt_len_B"], valid)
    prompt_texts = [str(x) for x, v in zip(batch["prompt_text_B"], valid) if v]
    path = run.run_dir / "rounds" / f"round_{t:03d}.jsonl"
    if path.is_file():
        records = reporting.read_jsonl(path)
        if [r["prompt_ids"] for r in records] == prompt_ids:
            run.log(f"round {t}: reusing {path} (no re-sampling)")
            run.policy = None
            return records, {"time/sample": 0.0, "time/annotate": 0.0}
        run.log(f"round {t}: {path} holds other prompts; sampling again")
    t0 = time.perf_counter()
    s = cfg.sample
    run.policy = run.policy or run.make_policy()
    responses = rounds.sample_responses(
        run.policy, prompt_ids, num_samples=cfg.loop.num_responses, max_new_tokens=s.max_new_tokens,
        temperature=s.temperature, top_p=s.top_p, top_k=s.top_k, eos_id=run.eos_id, pad_id=run.pad_id,
        seed=run.seed(t, 1), chunk=cfg.loop.sample_batch, mesh=run.sampler_mesh(),
        progress=lambda x, **k: run.bar(x, desc=f"round {t}: sample", unit="batch", **k))
    run.policy = None  # free the sampling copy before training
    times["time/sample"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    texts = [[run.decode(r) for r in rows] for rows in responses]
    ann = rounds.annotate(run.panel, prompt_texts, texts, pseudo_count=cfg.annotate.pseudo_count,
                          progress=lambda x: run.bar(x, desc=f"round {t}: annotate", unit="annotator"))
    pairs = rounds.select(ann["strengths_PxD"], cfg.loop.pairs)
    records = rounds.round_records(t, prompt_texts, prompt_ids, responses, texts, ann, run.panel.names, pairs,
                                   run.eos_id)
    if run.main:
        reporting.write_jsonl_atomic(path, records)
    times["time/annotate"] = time.perf_counter() - t0
    return records, times


def reference_logps(run: Run, items: list[dict]) -> np.ndarray:
    """``log pi_ref`` of every response of the round's items, ``[M, K]``, with the round's
    starting parameters (before any update)."""
    cfg = run.cfg
    batches = rounds.collate_batches(items, range(len(items)), batch_size=cfg.train.batch_size,
                                     num_responses=cfg.train.num_responses, seq_len=cfg.train.seq_len,
                                     pad_id=run.pad_id)
    out = [run.to_host(run.ref_logprobs(run.state.params, run.to_device(b)))
           for b in run.bar(batches, desc="reference log-probs", unit="batch")]
    return np.concatenate(out)[:len(items)] if out else np.zeros((0, cfg.train.num_responses), np.float32)


def train(run: Run, t: int, items: list[dict], ref_MxK: np.ndarray, stop) -> dict:
    """``loop.epochs`` epochs over the round's items from ``run.progress.train_pos``; saves mid-round
    every ``checkpoint.every_steps`` steps and when ``stop()`` says so (then raises Preempted)."""
    cfg = run.cfg
    b = cfg.train.batch_size
    per_epoch = rounds.num_batches(len(items), b)
    total = per_epoch * cfg.loop.epochs
    sums = dict(run.progress.train_sums) or {k: 0.0 for k in (*TRAIN_METRICS, "examples", "nonfinite", "steps")}
    bar = run.bar(total=total, desc=f"round {t}: train", unit="step")
    bar.update(run.progress.train_pos)
    for pos in range(run.progress.train_pos, total):
        epoch, j = divmod(pos, per_epoch)
        order = np.random.default_rng(run.seed(t, 3, epoch)).permutation(len(items))[j * b:(j + 1) * b]
        host = rounds.collate_batches(items, order, batch_size=b, num_responses=cfg.train.num_responses,
                                      seq_len=cfg.train.seq_len, pad_id=run.pad_id)[0]
        host["ref_logps_BxK"] = np.zeros(host["list_mask_BxK"].shape, np.float32)
        host["ref_logps_BxK"][:len(order)] = ref_MxK[order]
        run.state, m = run.train_step(run.state, run.to_device(host))
        m = jax.device_get(m)
        sp.check_finite(m, cfg.train.max_nonfinite_in_a_row)
        n = float(m["examples"])
        for k in TRAIN_METRICS:
            sums[k] += float(m.get(k, 0.0)) * n
        sums["examples"] += n
        sums["nonfinite"] += float(m["skipped"])
        sums["steps"] += 1
        bar.set_postfix(loss=f"{float(m['loss']):.4f}")
        bar.update(1)
        run.progress.global_steps += 1
        done = pos + 1
        if stop() or (done < total and run.progress.global_steps % cfg.checkpoint.every_steps == 0):
            run.save(phase="train", train_pos=done, train_sums=sums, ref_logps=ref_MxK.tolist())
            if stop():
                raise Preempted(f"round {t}, train step {done} of {total}")
    bar.close()
    return sums


def train_record(sums: dict, items: list[dict], ties: int, records: list[dict], run: Run) -> dict:
    """The round's ``train/*`` figures (example-weighted means over its steps) and the mean
    task reward of what it sampled (``round/sample_reward``)."""
    ex = max(sums["examples"], 1.0)
    keys = [k for k in TRAIN_METRICS if k != "calibration_error" or "pref_B" in objectives.get(run.cfg.train.loss.name).needs]
    out = {f"train/{k}": sums[k] / ex for k in keys}
    out.update({"train/steps": int(sums["steps"]), "train/nonfinite_steps": int(sums["nonfinite"]),
                "train/examples": len(items), "train/ties_dropped": ties})
    if run.task is not None:
        rewards = [run.task.reward(r["prompt"], x["text"]) for r in records for x in r["responses"]]
        out["round/sample_reward"] = float(np.mean(rewards))
    return out


# ------------------------------------------------------------------------------ the loop


def run(cfg: IrepoConfig, log=print) -> list[dict]:
    """Runs (or resumes) the loop; returns the metric records (one per iteration)."""
    shd.initialize_distributed()
    r = Run(cfg, log=log)
    stop_flag = {"set": False}
    previous = signal.signal(signal.SIGTERM, lambda *_: stop_flag.update(set=True))
    try:
        return _loop(r, lambda: stop_flag["set"])
    except Preempted as e:
        r.checkpointer.wait()
        log(f"SIGTERM: checkpoint written ({e}); rerun the same command to resume")
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
        r.checkpointer.close()


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
        r.log(f"{r.run_dir}: finished ({done} rounds)\n" + reporting.summary_table(r.progress.records))
        return r.progress.records
    if resumed:
        r.log(f"resuming {r.run_dir} at iteration {done} (phase {r.progress.phase})")
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
    r.log(f"report: {r.run_dir / 'report.png'}   metrics: {r.run_dir / 'metrics.jsonl'}")
    return r.progress.records


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
        ref = reference_logps(r, items)
        if cfg.loop.optimizer == "reset":
            r.state = r._reset_opt(r.state)
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
