"""The offline programs: ``python -m repo_jax.lpo`` (pair modes, ranking metrics, rejects, resume)
and ``python -m repo_jax.sft`` (response-only loss), on the tiny configs."""

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

import jax
import numpy as np
import pytest

from repo_jax.offline.pairs import build_pairs, pair_examples, pair_index
from repo_jax.offline.ranking import ranking_metrics

ROOT = Path(__file__).resolve().parents[1]
LISTWISE = ROOT / "repo_jax" / "tasks" / "data" / "arithmetic_listwise.jsonl"
XLA_CACHE = Path(tempfile.gettempdir()) / f"repo_jax_tests_xla_{os.getuid()}"
SHORT = ("train.steps=8", "eval.every_steps=4", "eval.holdout=16", "progress=false")
EVAL_KEYS = ("iteration", "eval/loss", "eval/kendall_tau", "eval/pair_accuracy", "eval/reward_margin", "train/loss")


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1", PYTHONUNBUFFERED="1",
               JAX_COMPILATION_CACHE_DIR=str(XLA_CACHE), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    return env


def _cmd(program: str, run_dir, *overrides) -> list[str]:
    return [sys.executable, "-m", f"repo_jax.{program}", f"run_dir={run_dir}", *overrides]


def run(program: str, run_dir, *overrides, ok: bool = True) -> subprocess.CompletedProcess:
    out = subprocess.run(_cmd(program, run_dir, *overrides), cwd=ROOT, env=_env(), capture_output=True, text=True,
                         timeout=600)
    if ok:
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    return out


def metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def lpo_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("lpo") / "ref"
    return run_dir, run("lpo", run_dir, *SHORT, "checkpoint.every_steps=2")


# ---------------------------------------------------------------------------- pairs and metrics


def test_each_pair_mode_builds_the_documented_pairs_and_drops_ties():
    scores = [3.0, 7.0, 7.0, 1.0]  # responses 1 and 2 tie for best
    pw, ties = build_pairs(scores, "pw")
    assert sorted(pw) == [(0, 3), (1, 0), (1, 3), (2, 0), (2, 3)] and ties == 1
    one_vs_others, ties = build_pairs(scores, "1vsO")
    assert one_vs_others == [(1, 0), (1, 3)] and ties == 1  # the first best; its tie with 2 dropped
    drawn = {build_pairs(scores, "best_vs_random", seed=0, row=r)[0][0] for r in range(40)}
    assert drawn == {(1, 0), (1, 3)}  # never the tied response 2, both lower ones over rows
    assert build_pairs(scores, "best_vs_random", seed=3, row=5) == build_pairs(scores, "best_vs_random", seed=3, row=5)
    assert build_pairs([5.0, 5.0, 5.0], "best_vs_random") == ([], 1)
    assert build_pairs([5.0, 5.0, 5.0], "pw") == ([], 3)
    with pytest.raises(ValueError, match="pairs.mode='list2'.*best_vs_random"):
        build_pairs(scores, "list2")

    examples = [{"prompt": [{"role": "user", "content": "q"}], "responses": ["a", "b", "c", "d"], "scores": scores,
                 "pref": None, "source": "f.jsonl", "line": 7}]
    out, ties = pair_examples(examples, "1vsO")
    assert [e["responses"] for e in out] == [["b", "a"], ["b", "d"]] and ties == 1
    assert all(e["scores"][0] > e["scores"][1] and e["pref"] == 1.0 and e["line"] == 7 for e in out)

    mask = np.array([[True, True, True, False], [True, True, True, True]])
    idx = pair_index(np.array([[1.0, 2.0, 2.0, 9.0], scores]), mask, "1vsO")
    assert idx.tolist() == [[0, 1, 0], [1, 1, 0], [1, 1, 3]]  # the masked 9.0 is not in list 0


def test_ranking_metrics_closed_form():
    scores = np.array([[1.0, 2.0, 2.0, 0.0]])
    mask = np.array([[True, True, True, False]])
    rho = np.array([[1.0, 2.0, 3.0, 50.0]])
    m = ranking_metrics(rho, scores, mask, beta=0.5)
    # tau-b over the 3 present: concordant (0,1), (0,2); (1,2) tied in scores: 2 / sqrt(2 * 3)
    assert float(m["kendall_tau"]) == pytest.approx(2 / np.sqrt(6), rel=1e-6)
    assert float(m["pair_accuracy"]) == pytest.approx(1.0)
    assert float(m["reward_margin"]) == pytest.approx(0.5 * ((2 - 1) + (3 - 1)) / 2)
    m = ranking_metrics(-rho, scores, mask, beta=0.5)
    assert float(m["kendall_tau"]) == pytest.approx(-2 / np.sqrt(6), rel=1e-6) and float(m["pair_accuracy"]) == 0.0
    m = ranking_metrics(np.zeros_like(rho), scores, mask, beta=0.5)  # the starting policy ranks nothing
    assert float(m["kendall_tau"]) == 0.0 and float(m["pair_accuracy"]) == 0.0
    # a list with all scores tied does not count in tau
    m = ranking_metrics(np.array([[1.0, 2.0], [2.0, 1.0]]), np.array([[0.0, 1.0], [3.0, 3.0]]),
                        np.ones((2, 2), bool), beta=1.0)
    assert float(m["kendall_tau"]) == pytest.approx(1.0)


# ---------------------------------------------------------------------------- the LPO program


def test_lpo_program_lowers_the_held_out_loss_and_writes_its_outputs(lpo_run):
    run_dir, out = lpo_run
    recs = metrics(run_dir)
    assert [r["iteration"] for r in recs] == [0, 4, 8]
    assert recs[-1]["eval/loss"] < recs[0]["eval/loss"]
    assert recs[-1]["train/loss"] < recs[1]["train/loss"]
    assert recs[0]["eval/pair_accuracy"] == 0.0 and recs[-1]["eval/pair_accuracy"] > 0.5  # rho = 0 at the start
    assert recs[-1]["eval/kendall_tau"] > 0.0
    assert "eval/accuracy" in recs[0] and (run_dir / "eval" / "answers_000008.jsonl").is_file()  # task answers
    for name in ("report.png", "config.yaml", "reference/train.npy", "reference/eval.npy", "policy/config.json"):
        assert (run_dir / name).is_file(), name
    assert list((run_dir / "tb").glob("events.out.tfevents.*"))
    assert "train: 284 list examples, 8 steps of 8; held out: 16 lists" in out.stdout
    assert "finished (8 steps)" in out.stdout
    again = run("lpo", run_dir, *SHORT, "checkpoint.every_steps=2")  # a finished run prints its table
    assert "finished (8 steps)" in again.stdout and metrics(run_dir) == recs


def test_kill_mid_training_then_resume_equals_the_uninterrupted_run(lpo_run, tmp_path):
    ref_dir, _ = lpo_run
    run_dir = tmp_path / "killed"
    proc = subprocess.Popen(_cmd("lpo", run_dir, *SHORT, "checkpoint.every_steps=2"), cwd=ROOT, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    chunks: list[bytes] = []
    reader = threading.Thread(target=lambda: chunks.extend(iter(lambda: os.read(proc.stdout.fileno(), 65536), b"")),
                              daemon=True)
    reader.start()
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        if len(metrics(run_dir) if (run_dir / "metrics.jsonl").is_file() else []) == 2:  # step 4 evaluated
            break
        time.sleep(0.02)
    assert proc.poll() is None, b"".join(chunks).decode()[-3000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    out = run("lpo", run_dir, *SHORT, "checkpoint.every_steps=2")
    assert "resuming" in out.stdout
    keys = lambda recs: [{k: r.get(k) for k in EVAL_KEYS} for r in recs]  # noqa: E731
    assert keys(metrics(run_dir)) == keys(metrics(ref_dir))


def test_dpo_on_all_pairs_of_the_lists(tmp_path):
    out = run("lpo", tmp_path / "pw", *SHORT, "eval.num_prompts=0", "train.loss.name=dpo", "pairs.mode=pw")
    recs = metrics(tmp_path / "pw")
    assert "pairs.mode=pw:" in out.stdout and "tied pairs dropped" in out.stdout
    assert recs[0]["eval/loss"] == pytest.approx(np.log(2), abs=1e-5)  # DPO at rho = 0
    assert recs[-1]["eval/loss"] < recs[0]["eval/loss"]
    assert recs[0]["train/ties_dropped"] >= 0


def test_listwise_loss_with_a_pair_mode_names_the_keys(tmp_path):
    out = run("lpo", tmp_path / "bad", "pairs.mode=pw", ok=False)
    assert out.returncode == 2 and "train.loss.name='lpo' is listwise: it needs pairs.mode=list" in out.stderr
    out = run("lpo", tmp_path / "bad2", "train.loss.name=dpo", ok=False)
    assert out.returncode == 2 and "set pairs.mode to one of best_vs_random, 1vsO, pw" in out.stderr


def test_bad_rows_go_to_rejects_and_strict_mode_names_the_file_and_line(tmp_path):
    rows = LISTWISE.read_text().splitlines()[:40]
    bad = json.loads(rows[0])
    bad["completions"][1]["overall_score"] = "ten"
    data = tmp_path / "lists.jsonl"
    data.write_text("\n".join(rows[:10] + ["{not json", json.dumps(bad)] + rows[10:]) + "\n")
    args = ("eval.num_prompts=0", "train.steps=2", "eval.every_steps=0", "eval.holdout=8", "progress=false", f"data.path={data}")
    out = run("lpo", tmp_path / "run", *args)
    rejects = [json.loads(x) for x in (tmp_path / "run" / "rejects.jsonl").read_text().splitlines()]
    assert [(r["line"], r["code"]) for r in rejects] == [(11, "invalid_json"), (12, "bad_score")]
    assert "42 rows read, 40 kept, 2 rejected" in out.stdout
    assert "train: 32 list examples" in out.stdout
    strict = run("lpo", tmp_path / "strict", *args, "data.strict=true", ok=False)
    assert strict.returncode == 2 and f"{data}:11:" in strict.stderr and "data.strict=true" in strict.stderr


# ---------------------------------------------------------------------------- SFT


def test_sft_loss_is_the_mean_nll_of_the_response_tokens_only():
    from repo_jax import config as config_lib
    from repo_jax import sharding as shd
    from repo_jax.data.byte_tokenizer import ByteTokenizer
    from repo_jax.data.tokenize import Formatter, collate_responses
    from repo_jax.offline.config import SftConfig
    from repo_jax.training import optim
    from repo_jax.training import state as st
    from repo_jax.training import step as sp

    cfg = config_lib.load(SftConfig, ROOT / "configs" / "tiny_sft.yaml", ["train.batch_size=2"])
    model = st.model_factory(cfg.model, seed=1)()
    fmt = Formatter(ByteTokenizer(), chat_template=False)
    items = []
    for n, (q, a) in enumerate([("Digits for abc", "012"), ("Digits for hello", "74114")]):
        p, (r,) = fmt.encode([{"role": "user", "content": q}], [a])
        items.append({"prompt_ids": p, "response_ids": [r], "scores": [], "pref": None, "row": n})
    batch = collate_responses(items, batch_size=2, num_responses=1, buckets=(48,))
    for n, it in enumerate(items):  # the mask selects exactly the response's targets
        lp, lr = len(it["prompt_ids"]), len(it["response_ids"][0])
        assert np.flatnonzero(batch["loss_mask_BxKxT"][n, 0]).tolist() == list(range(lp - 1, lp + lr - 1))
    logits = np.asarray(model(batch["input_ids_BxKxT"][:, 0]), np.float64)
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(-1, keepdims=True)
    want = []
    for n, it in enumerate(items):
        lp, lr = len(it["prompt_ids"]), len(it["response_ids"][0])
        targets = batch["input_ids_BxKxT"][n, 0, lp:lp + lr]
        want.append(-np.mean([logp[n, lp - 1 + t, targets[t]] for t in range(lr)]))
    mesh = shd.make_mesh(cfg.mesh, devices=jax.devices()[:1])
    tx = optim.make_optimizer(cfg.optim)
    graphdef, state, shardings = st.state_from_model(model, tx, cfg.train, mesh)
    step = sp.make_train_step(graphdef, cfg, mesh, shardings)
    host = {**batch, "ref_logps_BxK": np.zeros((2, 1), np.float32)}
    host.pop("scores_BxK"), host.pop("pref_B")
    _, m = step(state, shd.global_batch(host, mesh))
    assert float(m["loss"]) == pytest.approx(float(np.mean(want)), rel=1e-5)


def test_sft_program_lowers_the_held_out_loss(tmp_path):
    out = run("sft", tmp_path / "sft", "train.steps=8", "eval.every_steps=4", "eval.num_prompts=4", "progress=false")
    recs = metrics(tmp_path / "sft")
    assert [r["iteration"] for r in recs] == [0, 4, 8]
    assert recs[-1]["eval/loss"] < recs[1]["eval/loss"] < recs[0]["eval/loss"]
    assert "eval/accuracy" in recs[-1] and "eval/kendall_tau" not in recs[-1]
    assert "train: 368 sft examples" in out.stdout


def test_sft_rows_in_each_accepted_shape():
    from repo_jax.data.schemas import BadRow, adapt, detect_schema

    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    assert adapt("sft", {"messages": msgs})["responses"] == ["hello"]
    assert adapt("sft", {"messages": msgs})["prompt"] == msgs[:1]
    assert adapt("sft", {"prompt": "q", "completion": "a"})["responses"] == ["a"]
    assert adapt("sft", {"prompt": "q", "chosen": "a", "rejected": "b"})["responses"] == ["a"]
    assert detect_schema({"prompt": "q", "response": "a"}) == "sft"
    with pytest.raises(BadRow, match="missing field 'response'"):
        adapt("sft", {"prompt": "q"})
    with pytest.raises(BadRow, match="only the assistant"):
        adapt("sft", {"messages": msgs[1:]})
