"""The iREPO loop with LoRA adapters on configs/tiny.yaml (subprocesses of ``python -m
repo_jax.irepo``, as in test_irepo): it learns the toy task, exports a PEFT adapter, checkpoints
the adapters without the base, resumes after kill -9 to the uninterrupted run's metrics (also
with ``loop.lora_merge=every_round``, whose checkpoints hold the base), runs on 8 devices like
on 1, and refuses to resume on a different base."""

from __future__ import annotations

import json
import signal
import subprocess

import pytest

from test_irepo import ROOT, _cmd, _env, _watch_and_kill, assert_eight_devices_match_one, eval_values, metrics, run_loop

# rank 32 on the 64-wide tiny model; a LoRA learning rate (10x the full fine-tune's)
LORA = ("model.lora.rank=32", "model.lora.alpha=64", "model.lora.targets=[all-linear]", "optim.lr=3e-2")


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("lora") / "ref"
    return run_dir, run_loop(run_dir, *LORA)


def test_lora_loop_learns_and_exports_a_peft_adapter(lora_run):
    run_dir, out = lora_run
    recs = metrics(run_dir)
    assert [r["iteration"] for r in recs] == [0, 1, 2, 3]
    assert recs[-1]["eval/reward"] > recs[0]["eval/reward"] + 0.5  # the toy task is learnt
    assert recs[-1]["eval/win_rate"] > 0.5 and recs[-1]["eval/kl"] != 0.0
    assert all(r["train/nonfinite_steps"] == 0 for r in recs[1:])
    cfg = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 32 and cfg["lora_alpha"] == 64.0
    assert set(cfg["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
    assert (run_dir / "policy" / "config.json").is_file() and "PEFT adapter" in out.stdout
    newest = max((p for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit()), key=lambda p: int(p.name))
    assert {p.name for p in newest.iterdir() if p.is_dir()} == {"state", "loop"}  # no base in the checkpoint
    loop = json.loads((newest / "loop" / "metadata").read_text())  # Orbax's JSON item
    assert len(loop["lora_base"]["checksum"]) == 32 and loop["lora_base"]["weights"] == "random init"


@pytest.mark.parametrize("merge", ["never", "every_round"])
def test_lora_loop_resumes_after_kill_to_the_same_metrics(lora_run, tmp_path, merge):
    extra = (*LORA, "checkpoint.every_steps=1", f"loop.lora_merge={merge}")
    if merge == "never":
        want = eval_values(metrics(lora_run[0]))
    else:
        ref = tmp_path / "uninterrupted"
        run_loop(ref, *extra)
        want = eval_values(metrics(ref))
    run_dir = tmp_path / "killed"
    rc, _ = _watch_and_kill(run_dir, "round 2: train", wait_for_new_checkpoint=True, overrides=extra)
    assert rc == -signal.SIGKILL
    out = run_loop(run_dir, *extra)
    assert "(phase train)" in out.stdout
    assert eval_values(metrics(run_dir)) == want
    if merge == "every_round":
        newest = max((p for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit()), key=lambda p: int(p.name))
        assert "base" in {p.name for p in newest.iterdir()}  # the folded base is not the loaded one


def test_lora_loop_on_eight_devices_matches_one_device(tmp_path):
    assert_eight_devices_match_one(tmp_path, *LORA)


def test_resuming_on_other_base_weights_is_refused(tmp_path):
    """The checkpoints hold the adapters, not the base: a resume checks the base's checksum."""
    from repo_jax import config as config_lib
    from repo_jax import models
    from repo_jax.loop.config import IrepoConfig
    from repo_jax.training import state as st
    from test_irepo import TINY

    cfg = st.model_config(config_lib.load(IrepoConfig, TINY).model)
    base = tmp_path / "base"
    models.save_pretrained(models.build(cfg, seed=0), base)
    short = (*LORA, f"model.weights={base}", "loop.prompts_per_round=8", "eval.num_prompts=8")
    run_loop(tmp_path / "run", *short, "loop.rounds=1")
    models.save_pretrained(models.build(cfg, seed=1), base)  # the same path, other weights
    out = subprocess.run(_cmd(tmp_path / "run", *short, "loop.rounds=2"), cwd=ROOT, env=_env(1),
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 2, out.stderr[-2000:]
    assert "the LoRA adapters were trained on the base" in out.stderr and str(base) in out.stderr
