"""The scaled twins of the shipped recipes (``repo_jax.twin``), shared by tests/test_twins_*.py:
a recipe's twin runs on its slice's device count against a served judge on 127.0.0.1; its
learning rate reaches the peak and decays, its loss moves, it checkpoints, and kill -9 mid-run
then resume gives the uninterrupted metrics."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
LOOP_RECIPES = ("mistral7b_irepo.yaml", "mistral7b_irepo_lora.yaml", "phi2_irepo.yaml", "phi2_irepo_lora.yaml",
                "llama3_8b_irepo_lora.yaml")
OFFLINE_RECIPES = ("mistral7b_lpo.yaml",)


def _slice(name: str) -> str:
    return (yaml.safe_load((ROOT / "configs" / name).read_text()) or {}).get("slice", "")


def _env(devices: int, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    env.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu", **extra)
    return env


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]


def _twin_cmd(name: str, run_dir: Path, judge: str, *extra: str) -> list[str]:
    program = "lpo" if name in OFFLINE_RECIPES else "irepo"
    return [sys.executable, "-m", f"repo_jax.{program}", "--config", f"configs/{name}", "--twin", "--twin-judge",
            judge, f"run_dir={run_dir}", "progress=false" if program == "lpo" else "loop.progress=false",
            "loop.export=false" if program == "irepo" else "export=false", *extra]


def _short(name: str) -> tuple[str, ...]:
    # one round of each loop recipe; a learning rate a random 2-layer model moves at (the recipes'
    # 5e-7 to 1e-4 move it less than float32 resolves: no loss or KL change to see)
    return ("loop.rounds=1", "optim.lr=3.0e-3") if name in LOOP_RECIPES else ("optim.lr=3.0e-3",)


def _compare(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        keys = {k for k in x if not k.startswith("time/") and isinstance(x[k], (int, float))}
        assert keys == {k for k in y if not k.startswith("time/") and isinstance(y[k], (int, float))}
        for k in keys:
            assert x[k] == pytest.approx(y[k], rel=1e-5, abs=1e-6), k


@pytest.fixture(scope="module")
def judge():
    """A served judge on 127.0.0.1 that prefers the response with more digits, the same in both
    orders (the recipes' panels are one served judge: a judge that always says "A" would make
    every pair a tie and teach nothing)."""
    from test_served import Fake

    class DigitJudge(Fake):
        def answer(self, body):
            text = body["messages"][-1]["content"]
            a, rest = text.split("Response A: ", 1)[1].split("\n\nResponse B: ", 1)
            b = rest.rsplit("\n\nReply with", 1)[0]
            da, db = (sum(c.isdigit() for c in x) for x in (a, b))
            la, lb = (-0.1, -2.5) if da > db else (-2.5, -0.1) if db > da else (-0.7, -0.7)
            return 200, {"choices": [{"message": {"content": "A" if la >= lb else "B"}, "logprobs": {"content": [
                {"token": "A", "logprob": la, "top_logprobs": [{"token": "A", "logprob": la},
                                                               {"token": "B", "logprob": lb}]}]}}]}

    f = DigitJudge()
    yield f
    f.stop()


def check_twin(name, tmp_path, judge):
    """One recipe's twin end to end (see tests/test_twins_*.py)."""
    from repo_jax.plan import SLICES

    devices = SLICES[_slice(name)].chips
    env = _env(devices)
    ref_dir, kill_dir = tmp_path / "ref", tmp_path / "killed"
    short = _short(name)
    out = subprocess.run(_twin_cmd(name, ref_dir, judge.url, *short), cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    recs = _metrics(ref_dir)
    last = recs[-1]
    assert last["train/steps"] >= 2 and last["train/nonfinite_steps"] == 0
    saved = yaml.safe_load((ref_dir / "config.yaml").read_text())
    lr = saved["optim"]["lr"]
    assert last["train/lr_max"] == pytest.approx(lr, rel=1e-6)  # the schedule reached its peak
    assert last["train/lr_last"] < lr  # and decayed (cosine)
    assert last["train/loss_last"] != pytest.approx(last["train/loss_first"], rel=1e-3)  # the loss moved
    if name in LOOP_RECIPES:
        assert recs[0]["iteration"] == 0 and last["iteration"] == 1
        # the policy moved away from pi_0 (a one-sample KL estimate on 8 prompts: its sign is noise)
        assert abs(last["eval/kl"]) > 1e-4 and last["train/loss"] > 0
        assert (ref_dir / "rounds" / "round_001.jsonl").is_file()
        assert judge.requests > 0
    else:
        assert recs[0]["eval/loss"] != pytest.approx(last["eval/loss"], abs=1e-7)  # the held-out loss moved
    assert list((ref_dir / "checkpoints").iterdir())  # a checkpoint was written

    # kill -9 once the first mid-run checkpoint is on disk, then resume to the same metrics
    proc = subprocess.Popen(_twin_cmd(name, kill_dir, judge.url, *short, "checkpoint.every_steps=1"), cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 600
    ckpts = kill_dir / "checkpoints"
    while time.time() < deadline and proc.poll() is None:
        if ckpts.is_dir() and len([p for p in ckpts.iterdir() if p.name.isdigit()]) >= 2:
            break
        time.sleep(0.05)
    finished_first = proc.poll() is not None
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert not finished_first and proc.returncode == -signal.SIGKILL  # killed mid-run, not after it
    out = subprocess.run(_twin_cmd(name, kill_dir, judge.url, *short, "checkpoint.every_steps=1"), cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert f"resuming {kill_dir}" in out.stdout
    _compare(_metrics(kill_dir), recs)


