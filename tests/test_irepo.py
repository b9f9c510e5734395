"""The iREPO loop end to end on configs/tiny.yaml (tiny random model, toy_digits task).

Runs are subprocesses of ``python -m repo_jax.irepo`` with their own device count, as a user
runs them: one device unless a test says otherwise. One uninterrupted run (module fixture) is
the reference the resume tests compare with.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"
EVAL_KEYS = ("eval/reward", "eval/accuracy", "eval/win_rate", "eval/kl", "eval/length")
REQUIRED = ("iteration", "eval/reward", "eval/win_rate", "eval/kl", "eval/length", "eval/accuracy", "time/eval",
            "time/round")
ROUND_KEYS = ("train/loss", "train/reward_margin", "train/reward_accuracy", "train/calibration_error",
              "train/nonfinite_steps", "time/sample", "time/annotate", "time/reference", "time/train")


# XLA's persistent compilation cache, shared by the test runs: a later run with the same
# programs loads them instead of compiling (results are the same either way).
XLA_CACHE = Path(tempfile.gettempdir()) / f"repo_jax_tests_xla_{os.getuid()}"


def _env(devices: int = 1, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
               PYTHONUNBUFFERED="1", JAX_COMPILATION_CACHE_DIR=str(XLA_CACHE),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", **extra)
    return env


def _cmd(run_dir, *overrides) -> list[str]:
    return [sys.executable, "-m", "repo_jax.irepo", "--config", str(TINY), f"run_dir={run_dir}", *overrides]


def run_loop(run_dir, *overrides, devices: int = 1, timeout: int = 600) -> subprocess.CompletedProcess:
    out = subprocess.run(_cmd(run_dir, *overrides), cwd=ROOT, env=_env(devices), capture_output=True, text=True,
                         timeout=timeout)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    return out


def metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def eval_values(records):
    return [{k: r.get(k) for k in ("iteration", *EVAL_KEYS)} for r in records]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("irepo") / "ref"
    out = run_loop(run_dir)
    return run_dir, out


def test_tiny_loop_end_to_end(reference):
    run_dir, out = reference
    recs = metrics(run_dir)
    assert [r["iteration"] for r in recs] == [0, 1, 2, 3]
    for r in recs:
        assert all(k in r for k in REQUIRED), sorted(set(REQUIRED) - set(r))
    for r in recs[1:]:
        assert all(k in r for k in ROUND_KEYS), sorted(set(ROUND_KEYS) - set(r))
        assert r["train/steps"] == 4 and r["train/nonfinite_steps"] == 0
    assert recs[0]["eval/win_rate"] == 0.5 and recs[0]["eval/kl"] == 0.0
    assert recs[-1]["eval/reward"] > recs[0]["eval/reward"]  # the toy task is learnt
    assert recs[-1]["eval/win_rate"] > 0.5
    assert recs[-1]["eval/kl"] > 0  # the policy moved away from pi_0
    for t in (1, 2, 3):
        lines = (run_dir / "rounds" / f"round_{t:03d}.jsonl").read_text().splitlines()
        assert len(lines) == 16
    assert list((run_dir / "tb").glob("events.out.tfevents.*"))
    assert (run_dir / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (run_dir / "config.yaml").is_file()
    assert "round    reward  accuracy  win rate" in out.stdout and "report:" in out.stdout


def test_exported_policy_reproduces_the_last_iteration_s_answers(reference):
    """``run_dir/policy`` (loop.export) is the final policy: loaded back, its greedy answers to
    the held-out prompts are the last iteration's answers file, token for token."""
    from repo_jax import models
    from repo_jax.data.byte_tokenizer import ByteTokenizer
    from repo_jax.data.tokenize import Formatter
    from repo_jax.loop.evaluate import greedy_answers

    run_dir, _ = reference
    assert (run_dir / "policy" / "config.json").is_file()
    rows = [json.loads(x) for x in (run_dir / "eval" / "answers_003.jsonl").read_text().splitlines()]
    tok = ByteTokenizer()
    fmt = Formatter(tok)
    ids = [fmt.prompt_ids([{"role": "user", "content": r["prompt"]}])[-48:] for r in rows]
    policy = models.from_pretrained(str(run_dir / "policy"))
    got = greedy_answers(policy, ids, max_new_tokens=16, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id,
                         slots=64, mesh=None, progress=lambda x, **k: x)
    assert [len(g) for g in got] == [r["tokens"] for r in rows]
    assert [tok.decode(g, skip_special_tokens=True).strip() for g in got] == [r["answer"] for r in rows]


def test_round_file_records_what_was_taught(reference):
    run_dir, _ = reference
    rec = json.loads((run_dir / "rounds" / "round_001.jsonl").read_text().splitlines()[0])
    assert len(rec["responses"]) == 4 and set(rec["judgements"]) == {"rule/digits", "simulated0", "simulated1",
                                                                      "simulated2"}
    counts = rec["counts"]
    for i in range(4):  # n_ij + n_ji = H (unit weights)
        for j in range(4):
            if i != j:
                assert counts[i][j] + counts[j][i] == pytest.approx(4.0, abs=1e-5)
    (pair,) = rec["pairs"]
    w = rec["strengths"]
    assert w[pair["a"]] == max(w) and w[pair["b"]] == min(w)
    assert pair["p_hat"] == pytest.approx(w[pair["a"]] / (w[pair["a"]] + w[pair["b"]]), rel=1e-5)


def test_train_batch_rows_are_the_sampled_tokens(reference):
    """Tokens go from the sampler to the batch as ids: the response mask covers exactly the
    sampled tokens, up to and including EOS."""
    import numpy as np

    from repo_jax import config as config_lib
    from repo_jax.loop import rounds
    from repo_jax.loop.config import IrepoConfig

    run_dir, _ = reference
    cfg = config_lib.load(IrepoConfig, TINY)
    stopped = 0
    for t in (1, 2, 3):
        records = [json.loads(x) for x in (run_dir / "rounds" / f"round_{t:03d}.jsonl").read_text().splitlines()]
        items, ties = rounds.train_items(records, cfg)
        assert len(items) + ties == 16
        batches = rounds.collate_batches(items, range(len(items)), batch_size=8, num_responses=2,
                                         seq_len=cfg.train.seq_len, pad_id=0)
        pairs = [(rec, p) for rec in records for p in rec["pairs"]]
        for n, (rec, pair) in enumerate(pairs):
            batch, i = batches[n // 8], n % 8
            assert batch["pref_B"][i] == np.float32(pair["p_hat"])
            for k, idx in enumerate((pair["a"], pair["b"])):
                resp = rec["responses"][idx]
                ids, seg = batch["input_ids_BxT"][i], batch["segment_ids_BxT"][i]  # shared-prefix rows
                assert ids[seg == k + 1].tolist() == resp["token_ids"]
                assert ids[seg == 0].tolist() == rec["prompt_ids"]
                if resp["stopped"]:
                    stopped += 1
                    assert resp["token_ids"][-1] == 0  # the byte tokenizer's EOS, included
                else:
                    assert resp["length"] == cfg.sample.max_new_tokens
    assert stopped > 0


def test_sampler_reference_equals_a_forward_pass(tmp_path):
    """loop.reference=sampler: the round's reference log-probs are the sampler's own (saved in the
    round file), equal to the forward pass of loop.reference=forward up to float rounding."""
    import numpy as np

    from repo_jax import config as config_lib
    from repo_jax.loop import phases, rounds
    from repo_jax.loop.config import IrepoConfig
    from repo_jax.loop.state import Run

    cfg = config_lib.load(IrepoConfig, TINY, [f"run_dir={tmp_path / 'run'}", "loop.reference=sampler",
                                              "loop.progress=false"])
    run = Run(cfg, log=lambda *a, **k: None)
    try:
        records, _ = phases.sample_and_annotate(run, 1, next(run.iterator))
        assert all(isinstance(r["logp"], float) for rec in records for r in rec["responses"])
        items, _ = rounds.train_items(records, cfg)
        from_sampler = phases.reference_logps(run, items)
        forward = phases.reference_logps(run, [{**it, "ref_logps": [None]} for it in items])
    finally:
        run.checkpointer.close()
    assert from_sampler.shape == forward.shape == (len(items), 2) and np.abs(forward).min() > 1.0
    np.testing.assert_allclose(from_sampler, forward, rtol=1e-4, atol=1e-3)


def test_win_rate_counts_ties_as_half_and_cancels_position_bias():
    from repo_jax.annotators import Panel, RuleAnnotator, SimulatedAnnotator
    from repo_jax.loop.evaluate import win_rate

    digits = RuleAnnotator(lambda p, r: sum(c.isdigit() for c in r), temperature=0.0, name="digits")
    prompts, first = ["a", "b", "c", "d"], ["x", "1", "22", "x"]
    current = ["1", "11", "2", "x"]  # better, better, worse, tie
    assert win_rate(Panel([digits]), prompts, current, first) == pytest.approx((1 + 1 + 0 + 0.5) / 4)
    # a rater that always prefers the response shown first: half the prompts show it first
    biased = SimulatedAnnotator(lambda p, r: 0.0, bias=50.0, name="first")
    assert win_rate(Panel([biased]), prompts, ["p", "q", "r", "s"], ["t", "u", "v", "w"]) == pytest.approx(0.5)


def _watch_and_kill(run_dir, marker: str, *, sig=signal.SIGKILL, wait_for_new_checkpoint=False, overrides=()):
    """Starts the loop, sends ``sig`` once ``marker`` appears in its output (and, optionally, once
    a checkpoint newer than the one present at that moment is complete); returns the output."""
    proc = subprocess.Popen(_cmd(run_dir, *overrides), cwd=ROOT, env=_env(1), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    chunks: list[bytes] = []
    reader = threading.Thread(target=lambda: chunks.extend(iter(lambda: os.read(proc.stdout.fileno(), 65536), b"")),
                              daemon=True)
    reader.start()
    ckpt_dir = Path(run_dir) / "checkpoints"

    def newest():
        return max((int(p.name) for p in ckpt_dir.glob("*") if p.name.isdigit()), default=-1)

    before, deadline = None, time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        if marker.encode() in b"".join(chunks):
            if not wait_for_new_checkpoint:
                break
            before = newest() if before is None else before
            if newest() > before:
                break
        time.sleep(0.02)
    assert proc.poll() is None, f"the run ended before {marker!r}:\n{b''.join(chunks).decode()[-3000:]}"
    proc.send_signal(sig)
    proc.wait(timeout=300)
    reader.join(timeout=10)
    return proc.returncode, b"".join(chunks).decode(errors="replace")


def test_kill_during_sampling_then_resume_equals_uninterrupted_run(reference, tmp_path):
    ref_dir, _ = reference
    run_dir = tmp_path / "killed"
    rc, _ = _watch_and_kill(run_dir, "round 2: sample")
    assert rc == -signal.SIGKILL
    out = run_loop(run_dir)
    assert "resuming" in out.stdout
    assert eval_values(metrics(run_dir)) == eval_values(metrics(ref_dir))


def test_kill_during_training_resumes_mid_round_to_the_same_metrics(reference, tmp_path):
    ref_dir, _ = reference
    run_dir = tmp_path / "killed"
    rc, _ = _watch_and_kill(run_dir, "round 2: train", wait_for_new_checkpoint=True,
                            overrides=("checkpoint.every_steps=1",))
    assert rc == -signal.SIGKILL
    out = run_loop(run_dir, "checkpoint.every_steps=1")
    assert "(phase train)" in out.stdout  # it resumed inside round 2's training
    assert "reusing" in out.stdout  # ... from the round file, without sampling again
    assert eval_values(metrics(run_dir)) == eval_values(metrics(ref_dir))


def test_sigterm_checkpoints_and_exits_then_resumes(reference, tmp_path):
    ref_dir, _ = reference
    run_dir = tmp_path / "term"
    rc, out = _watch_and_kill(run_dir, "round 2: train", sig=signal.SIGTERM)
    assert rc == 143, out[-3000:]
    assert "SIGTERM: checkpoint written" in out
    out = run_loop(run_dir)
    assert eval_values(metrics(run_dir)) == eval_values(metrics(ref_dir))
    again = run_loop(run_dir)  # a finished run prints its summary and exits 0
    assert "finished (3 rounds)" in again.stdout
    assert eval_values(metrics(run_dir)) == eval_values(metrics(ref_dir))


def test_changed_config_on_an_existing_run_dir_names_the_key(reference):
    run_dir, _ = reference
    out = subprocess.run(_cmd(run_dir, "train.loss.beta=0.5"), cwd=ROOT, env=_env(1), capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 2
    assert "train.loss.beta (0.1 -> 0.5)" in out.stderr


@pytest.mark.parametrize("bad, message", [
    (("train.loss.name=nope",), "choose one of ['dpo', 'infonca', 'ipo', 'irepo', 'lipo_lambda', 'lpo', 'lpo_abs', 'soft_dpo']"),
    (("annotate.panel=[{kind: oracle}]",), "'oracle' is not one of"),
    (("annotate.panel=[{kind: rule, name: nope}]",), "choose one of ['all_digits', 'digits', 'length', 'reward']"),
])
def test_unknown_loss_or_annotator_lists_the_valid_ones(tmp_path, bad, message):
    out = subprocess.run(_cmd(tmp_path / "bad", *bad), cwd=ROOT, env=_env(1), capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 2 and message in out.stderr, out.stderr[-2000:]


@pytest.mark.parametrize("loss", ["dpo", "ipo", "soft_dpo", "lpo", "lpo_abs", "infonca", "lipo_lambda"])
def test_each_baseline_runs_a_round_through_the_loop(tmp_path, loss):
    extra = ("train.num_responses=4", "train.seq_len=112") if loss in ("lpo", "lpo_abs", "infonca", "lipo_lambda") else ()
    run_dir = tmp_path / loss
    run_loop(run_dir, f"train.loss.name={loss}", "loop.rounds=1", "loop.prompts_per_round=8", "eval.num_prompts=8",
             "loop.epochs=1", *extra)
    recs = metrics(run_dir)
    assert [r["iteration"] for r in recs] == [0, 1]
    assert recs[1]["train/steps"] >= 1 and recs[1]["train/nonfinite_steps"] == 0
    assert all(v is None or v == v for v in recs[1].values())  # no NaN


def test_loop_on_eight_devices_matches_one_device(tmp_path):
    """fsdp=4 x data=2, sampling 8 prompts x 4 samples through 8 refilled decode slots: the same
    round-1 pairs as on one device, and close final metrics."""
    assert_eight_devices_match_one(tmp_path)


def assert_eight_devices_match_one(tmp_path, *overrides):
    """Two short rounds on 1 device and on fsdp=4 x data=2 (with ``overrides``): the same round-1
    samples and pairs, eval and train metrics within 0.05."""
    short = (*overrides, "loop.rounds=2", "loop.sample_batch=8", "loop.prompts_per_round=8", "eval.num_prompts=8")
    one, eight = tmp_path / "one", tmp_path / "eight"
    run_loop(one, *short)
    run_loop(eight, *short, "mesh.fsdp=4", "mesh.data=2", devices=8)
    r1 = [json.loads(x) for x in (one / "rounds" / "round_001.jsonl").read_text().splitlines()]
    r8 = [json.loads(x) for x in (eight / "rounds" / "round_001.jsonl").read_text().splitlines()]
    assert [r["responses"] for r in r1] == [r["responses"] for r in r8]
    assert [[(p["a"], p["b"]) for p in r["pairs"]] for r in r1] == [[(p["a"], p["b"]) for p in r["pairs"]] for r in r8]
    m1, m8 = metrics(one), metrics(eight)
    for a, b in zip(m1, m8):
        for k in ("eval/reward", "eval/win_rate", "train/loss"):
            if k in a:
                assert b[k] == pytest.approx(a[k], abs=0.05), (k, a[k], b[k])


def test_two_processes_write_the_metrics_of_one_eight_device_process(tmp_path):
    """Several hosts for real: 2 processes x 4 CPU devices (jax.distributed over 127.0.0.1, gloo
    collectives), started through the variables repo_jax.sharding reads."""
    import socket

    short = ("loop.rounds=1", "loop.prompts_per_round=8", "eval.num_prompts=8", "loop.progress=false")
    single = tmp_path / "single"
    run_loop(single, *short, devices=8)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    multi = tmp_path / "multi"
    procs = [subprocess.Popen(_cmd(multi, *short), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env=_env(4, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2",
                                       JAX_PROCESS_ID=str(i), JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo"))
             for i in range(2)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-3000:] for o in outs)
    a, b = metrics(single), metrics(multi)
    assert [r["iteration"] for r in b] == [0, 1]
    for ra, rb in zip(a, b):
        for k in EVAL_KEYS + ("train/loss",):
            if k in ra:
                assert rb[k] == pytest.approx(ra[k], abs=1e-4), (k, ra[k], rb[k])
    r1 = (single / "rounds" / "round_001.jsonl").read_text().splitlines()
    r2 = (multi / "rounds" / "round_001.jsonl").read_text().splitlines()
    assert [json.loads(x)["responses"] for x in r1] == [json.loads(x)["responses"] for x in r2]

