"""The README as a user reads it: every block marked ``<!-- runnable: NAME -->`` runs as printed
(the quickstart at CI's shortened size, the own-model recipe on a tiny model against a served
judge on 127.0.0.1, ``plan``, ``--help``), its links resolve inside the repository, and it stays
short. The custom-reward example is run by tests/test_custom_rewards.py; the config reference's
freshness by tests/test_config_reference.py."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
from twins import judge  # noqa: E402,F401  (the served judge fixture: prefers answers with more digits)


def block(name: str) -> str:
    """The fenced block right after ``<!-- runnable: name -->``."""
    m = re.search(rf"<!-- runnable: {re.escape(name)} -->\n```\w*\n(.*?)```", README, re.S)
    assert m, f"README.md has no block marked runnable: {name}"
    return m.group(1)


def commands(text: str) -> list[list[str]]:
    """The block's command lines, comments dropped, continuation lines joined."""
    joined = text.replace("\\\n", " ")
    return [shlex.split(line, comments=True) for line in joined.splitlines() if line.split("#")[0].strip()]


def env(devices: int = 1) -> dict:
    out = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    out.update(JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", PYTHONUNBUFFERED="1")
    return out


def run(argv: list[str], cwd: Path, devices: int = 1, timeout: int = 600) -> subprocess.CompletedProcess:
    assert argv[0] == "python", argv
    out = subprocess.run([sys.executable, *argv[1:]], cwd=cwd, env=env(devices), capture_output=True, text=True,
                         timeout=timeout)
    assert out.returncode == 0, f"{shlex.join(argv)}\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out


def test_readme_is_short_and_its_links_stay_inside_the_repository():
    assert len(README.splitlines()) < 250
    assert "../shared" not in README and "issue" not in README.lower()
    for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", README):
        if not target.startswith(("http://", "https://")):
            assert (ROOT / target).exists(), f"README.md links to {target}, which does not exist"
    for page in (ROOT / "docs").glob("*.md"):
        assert "../shared" not in page.read_text(), page


def test_help_blocks_print_the_keys():
    outs = [run(argv, ROOT).stdout for argv in commands(block("help"))]
    assert "loop.sample_waves = 4" in outs[0] and "annotate.panel" in outs[0]
    assert "loop.sample_waves" in outs[1] and "int" in outs[1] and "waves" in outs[1]


def test_plan_block_plans_the_recipe_at_its_slice():
    (argv,) = commands(block("plan"))
    out = run(argv, ROOT, devices=8, timeout=900).stdout
    assert "v5litepod-8" in out and "whole round fits" in out


def _tiny_model(folder: Path) -> None:
    """A tiny random Qwen2-architecture model saved as an HF folder (the README names a Qwen)."""
    from repo_jax import models

    cfg = models.ModelConfig(arch="mistral", hf_model_type="qwen2", qkv_bias=True, vocab_size=256, hidden_size=64,
                             intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                             sliding_window=None, tie_word_embeddings=True, bos_token_id=None, eos_token_id=0,
                             max_position_embeddings=2048)
    models.save_pretrained(models.build(cfg, seed=0), folder)


def test_own_model_recipe_runs_as_printed_on_a_tiny_model(tmp_path, judge):  # noqa: F811
    """``my_run.yaml`` exactly as printed; on the command line only what makes it a tiny run here:
    the model folder (with the byte tokenizer), the judge's address, and smaller counts."""
    (tmp_path / "my_run.yaml").write_text(block("own-model-config"))
    cfg = yaml.safe_load(block("own-model-config"))
    _tiny_model(tmp_path / "tiny")
    words = ("tides", "owls", "salt", "rain", "moss", "iron", "wind", "snow", "clay", "reef", "fog", "ash")
    for name, n in ((cfg["data"]["path"], 32), (cfg["eval"]["data_path"], 8)):
        rows = [{"prompt": f"How many {words[i % 12]} are there in {i + 3} boxes of {i % 5 + 2}?"} for i in range(n)]
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    (argv,) = commands(block("own-model-command"))
    argv = argv + [f"model.weights={tmp_path / 'tiny'}", "model.tokenizer=bytes", "model.dtype=float32",
                   f"annotate.panel.0.base_url={judge.url}", "loop.rounds=1", "loop.prompts_per_round=32",
                   "loop.sample_batch=32", "sample.max_new_tokens=16", "data.max_prompt_len=64",
                   "train.seq_len=128", "eval.num_prompts=8", "loop.progress=false"]
    out = run(argv, tmp_path)
    run_dir = tmp_path / cfg["run_dir"]
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in recs] == [0, 1] and recs[-1]["train/steps"] == 2
    asked = {k: v for k, v in recs[-1].items() if k.startswith("annotate/requests/")}
    assert len(asked) == 1 and next(iter(asked.values())) > 0 and judge.requests > 0, asked
    assert (run_dir / "policy" / "config.json").is_file() and "round" in out.stdout


@pytest.mark.slow
def test_quickstart_main_command_at_ci_size(tmp_path, smollm2_path):
    """The main command's program with the overrides CI appends (.ci/run's ``short``), so the
    README's first command is run by the suite too, on the real SmolLM2 weights."""
    main = re.search(r"<!-- main-command -->\n```bash\n(.*?)\n```", README, re.S).group(1)
    program = shlex.split(main.split("&&")[-1])
    short = re.search(r'^short="(.*)"$', (ROOT / ".ci" / "run").read_text(), re.M).group(1).split()
    short = [s for s in short if not s.startswith("run_dir=")] + [f"run_dir={tmp_path / 'run'}",
                                                                  "loop.progress=false"]
    out = run(program + short, ROOT, timeout=900)
    assert re.search(r"^\s+round\s+reward\s+accuracy", out.stdout, re.M), out.stdout[-2000:]
    assert (tmp_path / "run" / "policy" / "config.json").is_file()
