"""Frozen-dataclass configs: YAML, overrides, and one clear error for an unknown key."""

import dataclasses

import pytest

from repo_jax import config


@dataclasses.dataclass(frozen=True)
class Optim:
    lr: float = 1e-6
    warmup_steps: int = 10


@dataclasses.dataclass(frozen=True)
class Run:
    run_dir: str = "runs/x"
    beta: float = 0.1
    loss: str = "irepo"
    buckets: tuple[int, ...] = (64, 128)
    optim: Optim = Optim()
    seed: int | None = None


def test_defaults_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("beta: 0.5\noptim:\n  lr: 3\nbuckets: [8, 16]\n")
    cfg = config.load(Run, path, ["optim.warmup_steps=7", "loss=dpo", "seed=3"])
    assert cfg == Run(beta=0.5, loss="dpo", buckets=(8, 16), optim=Optim(lr=3.0, warmup_steps=7), seed=3)
    assert isinstance(cfg.optim.lr, float)
    assert config.load(Run, None, ["optim.lr=2e-5"]).optim.lr == 2e-5  # YAML 1.1 reads it as a string


def test_unknown_key_names_it_and_lists_valid_keys(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  learning_rate: 1\n")
    with pytest.raises(config.ConfigError) as e:
        config.load(Run, path)
    msg = str(e.value)
    assert str(path) in msg and "optim.learning_rate" in msg and "optim.lr" in msg and "optim.warmup_steps" in msg
    with pytest.raises(config.ConfigError, match="unknown config key betta"):
        config.load(Run, None, ["betta=1"])


def test_bad_values_are_errors(tmp_path):
    with pytest.raises(config.ConfigError, match="optim.warmup_steps: expected int"):
        config.load(Run, None, ["optim.warmup_steps=abc"])
    with pytest.raises(config.ConfigError, match="optim.lr: expected a number, got 'fast'"):
        config.load(Run, None, ["optim.lr=fast"])
    with pytest.raises(config.ConfigError, match="not of the form"):
        config.load(Run, None, ["beta"])
    with pytest.raises(config.ConfigError, match="does not exist"):
        config.load(Run, tmp_path / "missing.yaml")
