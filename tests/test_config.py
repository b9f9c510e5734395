"""Frozen-dataclass configs: YAML, overrides, and one clear error for an unknown key."""

import dataclasses
from pathlib import Path

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


def test_a_list_item_is_overridden_by_its_index():
    """``annotate.panel.0.base_url=URL`` (the recipes' launch commands) sets one key of the first
    panel member and keeps the others; an index past the list is one error naming it."""
    from repo_jax.loop.config import IrepoConfig

    recipe = Path(__file__).resolve().parents[1] / "configs" / "mistral7b_irepo.yaml"
    cfg = config.load(IrepoConfig, recipe, ["annotate.panel.0.base_url=http://judge:8000/v1"])
    member = cfg.annotate.panel[0]
    saved = config.load(IrepoConfig, recipe).annotate.panel[0]
    assert member.base_url == "http://judge:8000/v1" and member.kind == saved.kind and member.model == saved.model
    assert dataclasses.replace(member, base_url=saved.base_url) == saved
    with pytest.raises(config.ConfigError, match=r"annotate.panel.3: annotate.panel has 1 item"):
        config.load(IrepoConfig, recipe, ["annotate.panel.3.weight=2"])
    with pytest.raises(config.ConfigError, match="bogus"):
        config.load(IrepoConfig, recipe, ["annotate.panel.0.bogus=2"])
