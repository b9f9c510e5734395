"""One offline run (``python -m repo_jax.lpo`` / ``python -m repo_jax.sft``): data -> reference
log-probs once -> train steps with held-out evaluations -> checkpoints -> export.

``run(cfg)``:

1. loads and checks ``data.path`` (bad rows to ``run_dir/rejects.jsonl``; ``data.strict=true``
   stops at the first, naming its file and line), sets the held-out split aside
   (``eval.holdout`` lists, or ``eval.data_path``) and, in a pair mode, turns each training list
   into the mode's pairs (:mod:`repo_jax.offline.pairs`; ties dropped and counted);
2. computes, with the starting model and before any update, the reference log-probs of every
   training and held-out response, one pass over the lists (a pair takes its two responses'
   values from its list): ``run_dir/reference/{train,eval}.npy``, indexed by the training
   pipeline's ``row_B``; SFT needs none. With LoRA (``model.lora.rank`` > 0) the starting model
   is the base with adapters whose ``B`` is zero, so the reference is the base itself, on the
   same arrays (no copy);
3. trains ``train.steps`` steps (or until ``data.num_epochs`` passes end) on the grain
   pipeline's shuffled, per-host, length-bucketed batches, dispatching step ``n + 1`` before
   reading step ``n``'s metrics;
4. evaluates at step 0, every ``eval.every_steps`` and at the end: the held-out loss of the
   training objective, the implicit rewards' ranking of each held-out list against its scores
   (``eval/kendall_tau``, ``eval/pair_accuracy``, ``eval/reward_margin``;
   :mod:`repo_jax.offline.ranking`) and, with a ``task``, greedy answers to its held-out prompts
   (``eval/reward``, ``eval/accuracy``, ... and ``eval/answers_{step:06d}.jsonl``);
5. appends one record per evaluation to ``metrics.jsonl`` (``iteration`` = the train step),
   TensorBoard (``tb/``) and ``report.png``, prints a table row, and checkpoints (Orbax: train
   state, the pipeline's position, the records), also every ``checkpoint.every_steps`` steps
   and on SIGTERM (exit status 143). Rerunning the same command resumes from the newest
   checkpoint to the same result; a finished run prints its table.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import jax
import numpy as np

from repo_jax import config as config_lib
from repo_jax import reporting, sampling
from repo_jax import sharding as shd
from repo_jax.data import DataError, load_examples
from repo_jax.data.pipeline import Pipeline, pipeline_from_examples
from repo_jax.data.tokenize import Formatter
from repo_jax.loop.evaluate import greedy_answers
from repo_jax.offline import pairs as pairs_lib
from repo_jax.offline.config import OfflineConfig, SftConfig, check, pair_mode, unread_keys
from repo_jax.offline.ranking import gather_pairs, ranking_metrics
from repo_jax.runs import (Preempted, RunBase, batch_problem, check_start, forget_run_dir, load_tokenizer_for,
                           prepare_run_dir, program_main, run_mesh, run_until_preempted)
from repo_jax.training import batch as bt
from repo_jax.training import objectives, optim
from repo_jax.training import state as st
from repo_jax.training import step as sp
from repo_jax.training.checkpoint import Checkpointer

TRAIN_METRICS = ("loss", "reward_margin", "reward_accuracy")
COLUMNS: tuple[reporting.Column, ...] = (
    ("step", "iteration", "d"),
    ("eval loss", "eval/loss", ".4f"),
    ("tau", "eval/kendall_tau", ".3f"),
    ("pair acc", "eval/pair_accuracy", ".3f"),
    ("margin", "eval/reward_margin", ".3f"),
    ("reward", "eval/reward", ".4f"),
    ("accuracy", "eval/accuracy", ".3f"),
    ("train loss", "train/loss", ".4f"),
    ("time", "time/total", ".0f"),
)
SFT_COLUMNS = tuple(c for c in COLUMNS if c[1] not in ("eval/kendall_tau", "eval/pair_accuracy", "eval/reward_margin"))
PLOT_KEYS = ("eval/loss", "eval/kendall_tau", "eval/pair_accuracy", "eval/accuracy", "eval/reward", "train/loss")


@dataclasses.dataclass
class Progress:
    """Where the run stands (the ``loop`` item of a checkpoint)."""

    step: int = 0
    evaluated: int = -1           # the last step evaluated (-1: not even step 0)
    records: list = dataclasses.field(default_factory=list)
    train_sums: dict = dataclasses.field(default_factory=dict)
    data_state: dict = dataclasses.field(default_factory=dict)
    saves: int = 0
    seconds: float = 0.0          # train + eval time so far (across resumes)


class OfflineRun(RunBase):
    """Everything an offline run builds once: data, reference log-probs, model, programs."""

    progress_cls = Progress

    def __init__(self, cfg: OfflineConfig, log=print):
        from repo_jax.tasks import get_task

        check(cfg)
        self.cfg, self.log = cfg, log
        self.main = jax.process_index() == 0
        self.show_progress = cfg.progress
        self.sft = isinstance(cfg, SftConfig)
        self.mode = "sft" if self.sft else pair_mode(cfg)
        self.mesh = run_mesh(cfg)
        bad = batch_problem(cfg.train, self.mesh)  # before any data is read
        if bad:
            raise config_lib.ConfigError(bad)
        folder = prepare_run_dir(cfg, ("progress",))
        self.run_dir, self.mirror = folder.path, folder.mirror
        self.task = get_task(cfg.task) if cfg.task else None
        self.tokenizer = load_tokenizer_for(cfg.model)
        self.eos_id = self.tokenizer.eos_token_id
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.objective = objectives.get(cfg.train.loss.name)
        self.columns = SFT_COLUMNS if self.sft else COLUMNS
        self._build_data()
        what = (f"train.steps={cfg.train.steps}" if cfg.train.steps and self.total_steps == cfg.train.steps else
                f"data.num_epochs={cfg.data.num_epochs} passes of {len(self.pipeline) // max(cfg.data.num_epochs, 1)} "
                f"batches of train.batch_size={cfg.train.batch_size}")
        e = cfg.eval.every_steps
        never = ([f"eval.every_steps={e} is never reached in the run's {self.total_steps} steps ({what}); lower it, "
                  "or 0 (evaluate before the first step and after the last)"] if e > self.total_steps else [])
        try:
            self.cfg = cfg = check_start(cfg, self.mesh, run_steps=self.total_steps, what=what,
                                         unread=unread_keys(cfg), extra=never, log=log)
        except config_lib.ConfigError:
            forget_run_dir(folder)  # refused before anything ran: leave no config.yaml behind
            raise

        m = cfg.model
        model = (st.pretrained_model(m, self.mesh, seed=cfg.train.seed) if m.weights
                 else st.model_factory(m, seed=cfg.train.seed)())
        self.tx = optim.make_optimizer(cfg.optim)
        self.graphdef, self.state, self.shardings = st.state_from_model(model, self.tx, cfg.train, self.mesh,
                                                                          tolerance=cfg.mesh.sharding_tolerance)
        del model
        self.abstract = jax.eval_shape(lambda s: s, self.state)
        self.record_base(m.weights)
        self.train_step = sp.make_train_step(self.graphdef, cfg, self.mesh, self.shardings)
        self.logprobs = sp.make_reference_logprobs(self.graphdef, cfg.train, self.mesh, self.shardings.params,
                                                   frozen_shardings=self.shardings.frozen)
        self.checkpointer = Checkpointer(cfg.checkpoint_dir, dataclasses.replace(cfg.checkpoint, every_steps=1))
        self.progress = Progress()
        self._heldout_loss = jax.jit(self._heldout_loss_fn)

    # ------------------------------------------------------------------ data
    def _build_data(self) -> None:
        cfg = self.cfg
        data = dataclasses.replace(cfg.data, path=st.resolve_path(cfg.data.path),
                                   schema="sft" if self.sft and cfg.data.schema == "auto" else cfg.data.schema)
        examples, report = load_examples(data, tokenizer=self.tokenizer, run_dir=self.run_dir if self.main else None,
                                         log=self.log if self.main else None)
        train_ex, eval_ex = self._split(examples, data)
        if not train_ex:
            raise DataError(f"{cfg.data.path}: no training examples left after eval.holdout={cfg.eval.holdout}")
        self.ties, lists, self.pair_map = 0, train_ex, None
        kind = "sft" if self.sft else "list"
        if self.mode not in ("list", "sft"):
            train_ex, self.ties = pairs_lib.pair_examples(train_ex, self.mode, seed=cfg.pairs.seed)
            self.pair_map = np.array([(e["list_row"], *e["pair"]) for e in train_ex], np.int64).reshape(-1, 3)
            kind = "pair"
            if not train_ex:
                raise DataError(f"{cfg.data.path}: pairs.mode={self.mode} built no pairs (every list is tied)")
            if self.main:
                self.log(f"pairs.mode={self.mode}: {len(train_ex)} pairs ({self.ties} tied pairs dropped)")
        n_proc = jax.process_count()
        if cfg.train.batch_size % n_proc:
            raise config_lib.ConfigError(f"train.batch_size={cfg.train.batch_size} is not divisible by the {n_proc} processes")
        train_data = dataclasses.replace(data, batch_size=cfg.train.batch_size // n_proc)
        self.pipeline = pipeline_from_examples(train_data, self.tokenizer, train_ex, report, kind=kind,
                                               layout=cfg.train.layout)
        self.iterator = self.pipeline.iterator()
        one_pass = dataclasses.replace(data, batch_size=cfg.eval.batch_size or cfg.train.batch_size, shuffle=False,
                                       num_epochs=1, shard_index=0, shard_count=1)
        # the reference pass reads each list once (a pair mode's pairs look their two responses up)
        self.reference_pipeline = pipeline_from_examples(one_pass, self.tokenizer, lists, report,
                                                         kind="sft" if self.sft else "list", layout=cfg.train.layout)
        self.eval_pipeline = (pipeline_from_examples(one_pass, self.tokenizer, eval_ex, report,
                                                     kind="sft" if self.sft else "list", layout=cfg.train.layout) if eval_ex else None)
        epochs = cfg.data.num_epochs
        self.total_steps = (min(cfg.train.steps or len(self.pipeline), len(self.pipeline)) if epochs
                            else cfg.train.steps)
        if self.main:
            self.log(f"train: {len(train_ex)} {kind} examples, {self.total_steps} steps of {cfg.train.batch_size}; "
                     f"held out: {len(eval_ex)} {'examples' if self.sft else 'lists'}")
        self.eval_ids = []
        if self.task is not None and cfg.eval.num_prompts:
            fmt = Formatter(self.tokenizer, chat_template=cfg.data.chat_template)
            self.eval_texts = self.task.prompts("eval")[:cfg.eval.num_prompts]
            self.eval_ids = [fmt.prompt_ids([{"role": "user", "content": t}])[-cfg.data.max_prompt_len:]
                             for t in self.eval_texts]

    def _split(self, examples: list[dict], data) -> tuple[list[dict], list[dict]]:
        e = self.cfg.eval
        if e.data_path:
            held = dataclasses.replace(data, path=st.resolve_path(e.data_path), split=e.split or data.split)
            eval_ex, _ = load_examples(held, tokenizer=self.tokenizer, run_dir=self.run_dir if self.main else None,
                                       log=self.log if self.main else None)
            return examples, eval_ex
        if not e.holdout:
            return examples, []
        if e.holdout >= len(examples):
            raise config_lib.ConfigError(f"eval.holdout={e.holdout} leaves nothing to train on ({len(examples)} examples)")
        held = set(np.random.default_rng(data.seed).permutation(len(examples))[:e.holdout].tolist())
        return ([x for i, x in enumerate(examples) if i not in held], [x for i, x in enumerate(examples) if i in held])

    def logps_by_row(self, pipeline: Pipeline, params, desc: str) -> dict[str, np.ndarray]:
        """One pass over a one-pass pipeline: ``logps_NxK`` (row ``n`` = example ``n``), with the
        lists' ``scores_NxK``, ``mask_NxK`` and response token counts ``tokens_NxK``."""
        n, k = len(pipeline.examples), pipeline.num_responses
        out = {"logps": np.zeros((n, k), np.float32), "scores": np.zeros((n, k), np.float32),
               "mask": np.zeros((n, k), bool), "tokens": np.zeros((n, k), np.float32)}
        for host in self.bar(pipeline.iterator(), desc=desc, total=len(pipeline), unit="batch"):
            rows = host["row_B"]
            keep = rows >= 0
            logps = self.to_host(self.logprobs(params, self.state.frozen, self.to_device(bt.cast(host))))
            out["logps"][rows[keep]] = logps[keep]
            out["scores"][rows[keep]] = host["scores_BxK"][keep]
            out["mask"][rows[keep]] = host["list_mask_BxK"][keep]
            out["tokens"][rows[keep]] = bt.response_tokens(host)[keep]
        return out

    # ------------------------------------------------------------------ reference
    def reference(self) -> None:
        """``log pi_ref`` of every training and held-out response, from the starting model,
        computed once (before the first step) and kept in ``run_dir/reference``."""
        folder = self.run_dir / "reference"
        k = self.pipeline.num_responses
        self.ref_train = np.zeros((len(self.pipeline.examples), k), np.float32)
        self.ref_eval = None
        if self.sft:  # the SFT objective is the likelihood itself
            return
        paths = {"train": folder / "train.npy", "eval": folder / "eval.npy"}
        if self.checkpointer.latest_step() is not None:  # resuming: the reference of the first attempt
            for name, path in paths.items():
                if name == "eval" and self.eval_pipeline is None:
                    continue
                if not path.is_file():
                    raise FileNotFoundError(f"{path} is missing: a checkpoint exists but its reference log-probs do not "
                                            "(use a new run_dir)")
            self.ref_train = np.load(paths["train"])
            self.ref_eval = np.load(paths["eval"]) if self.eval_pipeline is not None else None
            return
        self.ref_train = self.logps_by_row(self.reference_pipeline, self.state.params, "reference: train")["logps"]
        if self.pair_map is not None:  # [lists, K] -> [pairs, 2]: (chosen, rejected) of each pair's list
            n, i, j = self.pair_map.T
            self.ref_train = np.stack([self.ref_train[n, i], self.ref_train[n, j]], axis=1)
        if self.eval_pipeline is not None:
            self.ref_eval = self.logps_by_row(self.eval_pipeline, self.state.params, "reference: held out")["logps"]
        if self.main:
            folder.mkdir(parents=True, exist_ok=True)
            for name, arr in (("train", self.ref_train), ("eval", self.ref_eval)):
                if arr is not None:
                    tmp = folder / f"{name}.tmp.npy"
                    np.save(tmp, arr)
                    tmp.replace(paths[name])

    # ------------------------------------------------------------------ evaluation
    def _heldout_loss_fn(self, rho_NxK, scores_NxK, mask_NxK, tokens_NxK, pairs_Mx3):
        loss_cfg = self.cfg.train.loss
        if self.objective.pairwise:
            rho_Mx2, s_Mx2 = gather_pairs(rho_NxK, scores_NxK, pairs_Mx3)
            m = rho_Mx2.shape[0]
            batch = {"pref_B": np.ones((m,), np.float32), "scores_BxK": s_Mx2, "list_mask_BxK": np.ones((m, 2), bool)}
            return self.objective.loss(rho_Mx2, batch, loss_cfg).mean()
        # the SFT objective counts response tokens from the rows layout's loss mask: a [N, K, 1] "mask" of counts
        batch = {"scores_BxK": scores_NxK, "list_mask_BxK": mask_NxK, "loss_mask_BxKxT": tokens_NxK[..., None]}
        return self.objective.loss(rho_NxK, batch, loss_cfg).mean()

    def evaluate(self, step: int) -> dict:
        cfg, t0, out = self.cfg, time.perf_counter(), {}
        if self.eval_pipeline is not None:
            cur = self.logps_by_row(self.eval_pipeline, self.state.params, f"eval {step}: held out")
            rho = cur["logps"] - (self.ref_eval if self.ref_eval is not None else 0.0)
            pairs = (pairs_lib.pair_index(cur["scores"], cur["mask"], self.mode, seed=cfg.pairs.seed)
                     if self.objective.pairwise else np.zeros((0, 3), np.int32))
            out["eval/loss"] = float(self._heldout_loss(rho, cur["scores"], cur["mask"], cur["tokens"], pairs))
            if not self.sft:
                out.update({f"eval/{k}": float(v) for k, v in
                            ranking_metrics(rho, cur["scores"], cur["mask"], beta=cfg.train.loss.beta).items()})
        if self.eval_ids:
            policy = sampling.sampling_copy(st.model_of(self.graphdef, self.state), self.mesh)
            ids = greedy_answers(policy, self.eval_ids, max_new_tokens=cfg.eval.max_new_tokens, eos_id=self.eos_id,
                                 pad_id=self.pad_id, slots=max(cfg.eval.batch_size or cfg.train.batch_size, 16),
                                 mesh=self.mesh if self.mesh.size > 1 else None,
                                 progress=lambda x, **k: self.bar(x, desc=f"eval {step}: answers", unit="batch", **k))
            del policy
            texts = [self.tokenizer.decode(list(r), skip_special_tokens=True).strip() for r in ids]
            out["eval/reward"] = float(np.mean([self.task.reward(p, a) for p, a in zip(self.eval_texts, texts)]))
            per = [self.task.metrics(p, a) for p, a in zip(self.eval_texts, texts)]
            out.update({f"eval/{k}": float(np.mean([m[k] for m in per])) for k in per[0]})
            out["eval/length"] = float(np.mean([len(r) for r in ids]))
            if self.main:
                reporting.write_jsonl_atomic(self.run_dir / "eval" / f"answers_{step:06d}.jsonl", [
                    {"step": step, "prompt": p, "answer": a, "tokens": len(r)}
                    for p, a, r in zip(self.eval_texts, texts, ids)])
        out["time/eval"] = time.perf_counter() - t0
        return out

    # ------------------------------------------------------------------ training
    def host_batch(self) -> dict:
        """The next training batch with its reference log-probs (0 on padding rows)."""
        try:
            host = next(self.iterator)
        except StopIteration:
            raise config_lib.ConfigError(f"the data of {self.cfg.data.path} ran out (data.num_epochs)") from None
        rows = host["row_B"]
        ref = np.zeros(host["list_mask_BxK"].shape, np.float32)
        ref[rows >= 0] = self.ref_train[rows[rows >= 0]]
        host["ref_logps_BxK"] = ref
        return host


def run(cfg: OfflineConfig, log=print) -> list[dict]:
    """Runs (or resumes) an offline run; returns its records (one per evaluation)."""
    shd.initialize_distributed()
    return run_until_preempted(OfflineRun(cfg, log=log), _run, log)


def _title(cfg: OfflineConfig) -> str:
    mode = pair_mode(cfg)
    return f"{cfg.task or Path(cfg.data.path).name}: {cfg.train.loss.name}" + (f" ({mode})" if mode != "list" else "")


def _run(r: OfflineRun, stop) -> list[dict]:
    cfg = r.cfg
    resumed = r.restore()
    if resumed and r.main:
        reporting.write_jsonl_atomic(r.run_dir / "metrics.jsonl", r.progress.records)
    total = r.total_steps
    if r.progress.evaluated >= total:
        _finish(r)
        return r.progress.records
    if resumed:
        r.log(f"resuming {r.cfg.run_dir} at step {r.progress.step} of {total}")
    r.reference()
    tb = reporting.TensorBoard(r.run_dir / "tb", purge_step=r.progress.evaluated + 1) if r.main else None
    r.log(reporting.table_header(r.columns))
    every = cfg.eval.every_steps or total
    try:
        if r.progress.evaluated < 0:
            _evaluate_and_save(r, 0, tb)
        limit = cfg.train.max_nonfinite_in_a_row
        sums = sp.StepSums(TRAIN_METRICS, limit, r.progress.train_sums)
        bar = r.bar(total=total, desc="train", unit="step")
        bar.update(r.progress.step)
        t0 = time.perf_counter()
        for step in range(r.progress.step, total):
            r.state, metrics = r.train_step(r.state, shd.global_batch(bt.cast(r.host_batch()), r.mesh))
            sums.push(metrics)  # reads step n - 1's metrics now that step n is dispatched
            done = step + 1
            bar.update(1)
            ckpt = cfg.checkpoint.every_steps
            if done % every == 0 or done == total or (ckpt and done % ckpt == 0) or stop():
                summed = sums.flush()
                bar.set_postfix(loss=f"{sums.mean('loss'):.4f}")
                seconds = r.progress.seconds + time.perf_counter() - t0
                t0 = time.perf_counter()
                if done % every == 0 or done == total:
                    r.progress.seconds = seconds
                    _evaluate_and_save(r, done, tb, summed)
                    sums = sp.StepSums(TRAIN_METRICS, limit)
                else:
                    r.save(step=done, train_sums=summed, data_state=r.iterator.get_state(), seconds=seconds)
                    if stop():
                        raise Preempted(f"train step {done} of {total}")
        bar.close()
    finally:
        if tb is not None:
            tb.close()
    _finish(r, tb_done=True)
    return r.progress.records


def _evaluate_and_save(r: OfflineRun, step: int, tb, sums: dict | None = None) -> None:
    t0 = time.perf_counter()
    ev = r.evaluate(step)
    seconds = r.progress.seconds + time.perf_counter() - t0
    rec = {"iteration": step, **ev, **sp.mean_record(sums or {}, TRAIN_METRICS), "time/total": seconds}
    if step == 0:
        rec["train/ties_dropped"] = r.ties
    records = [*r.progress.records, rec]
    r.save(step=step, evaluated=step, records=records, train_sums={}, data_state=r.iterator.get_state(),
           seconds=seconds)
    if r.main:
        reporting.append_jsonl(r.run_dir / "metrics.jsonl", rec)
        tb.write(rec)
        tb.flush()
        reporting.plot_report(records, r.run_dir / "report.png", title=_title(r.cfg), keys=PLOT_KEYS)
        r.log(reporting.format_row(rec, r.columns))


def _finish(r: OfflineRun, tb_done: bool = False) -> None:
    out = r.run_dir / "policy"
    if r.cfg.export and not (out / "config.json").is_file():
        adapter = r.run_dir / "adapter" if r.cfg.model.lora.rank else None
        if st.export_policy(r.graphdef, r.state, r.tokenizer, out, adapter_out=adapter, base_model=r.cfg.model.weights):
            r.log(f"policy: {out} (python -m repo_jax.evaluate ... --model {out})"
                  + (f"; PEFT adapter: {adapter}" if adapter else ""))
        else:
            r.log(f"export: skipped (several processes; on one host: python -m repo_jax.export {r.cfg.run_dir})")
    r.log(f"{r.cfg.run_dir}: finished ({r.total_steps} steps)\n" + reporting.summary_table(r.progress.records, r.columns))
    if tb_done:
        r.log(f"report: {r.run_dir / 'report.png'}   metrics: {r.run_dir / 'metrics.jsonl'}")


PROGRAMS = {"lpo": ("LpoConfig", "configs/tiny_lpo.yaml"), "sft": ("SftConfig", "configs/tiny_sft.yaml")}


def main(program: str, argv: list[str] | None, doc: str) -> int:
    """The command line of ``python -m repo_jax.lpo`` / ``repo_jax.sft`` (exit status as the iREPO program's)."""
    from repo_jax.offline import config as offline_config

    cls, default = PROGRAMS[program]
    return program_main(getattr(offline_config, cls), run, argv, prog=f"python -m repo_jax.{program}", doc=doc,
                        default_config=default, example="train.steps=10")
