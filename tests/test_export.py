"""``python -m repo_jax.export``: the policy of any checkpoint of a run, as the run's own export writes it.

The runs are short tiny loops (configs/tiny.yaml, rounds of 8 prompts, subprocesses of
``python -m repo_jax.irepo`` as in test_irepo, checkpoints at every optimiser step). The
exported folders are compared with the run's own ``run_dir/policy`` by their logits; the
in-process exports restore onto this process's 8 fake devices what the runs saved on one.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import yaml

from repo_jax import export as ex
from repo_jax.config import ConfigError
from test_buckets import BUCKET, gcs  # noqa: F401 - the GCS emulator fixture
from test_irepo import ROOT, TINY, _env, run_loop

SHORT = ("loop.prompts_per_round=8", "eval.num_prompts=8", "checkpoint.every_steps=1", "checkpoint.keep=20")
LORA = ("model.lora.rank=4", "model.lora.alpha=8", "model.lora.targets=[all-linear]", "optim.lr=3e-2")
IDS = np.random.default_rng(0).integers(1, 256, (2, 13)).astype(np.int32)


def logits(folder) -> np.ndarray:
    from repo_jax import models

    return np.asarray(models.from_pretrained(str(folder))(IDS))


def steps_by_where(run_dir) -> dict[str, int]:
    """``{what the checkpoint holds: step}`` from ``--list``'s descriptions."""
    lines = []
    ex.list_steps(run_dir, log=lines.append)
    return {line.split(": ", 1)[1]: int(line.split(":")[0].split()[1]) for line in lines}


def export_cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "repo_jax.export", *map(str, args)], cwd=ROOT, env=_env(1),
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """A run of one round (its policy kept as ``round1``), then resumed for a second one."""
    tmp = tmp_path_factory.mktemp("export")
    run_dir = tmp / "run"
    run_loop(run_dir, *SHORT, "loop.rounds=1")
    shutil.copytree(run_dir / "policy", tmp / "round1")
    run_loop(run_dir, *SHORT, "loop.rounds=2")
    return run_dir, tmp / "round1"


def test_the_command_writes_the_runs_own_policy_which_transformers_loads(full_run, tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    run_dir, _ = full_run
    out = export_cli(run_dir, "--out", tmp_path / "x")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "after round 2" in out.stdout and str(tmp_path / "x") in out.stdout
    ours = logits(tmp_path / "x")
    assert np.abs(ours - logits(run_dir / "policy")).max() <= 1e-5
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "x")).eval()
    with torch.no_grad():
        theirs = hf(input_ids=torch.tensor(IDS, dtype=torch.long)).logits.numpy()
    assert np.abs(theirs - ours).max() <= 1e-4
    # a second export to the same folder is refused (exit status 2, the folder named)
    again = export_cli(run_dir, "--out", tmp_path / "x")
    assert again.returncode == 2 and "is not an empty folder" in again.stderr and str(tmp_path / "x") in again.stderr


def test_an_earlier_checkpoint_is_the_policy_the_run_had_then(full_run, tmp_path):
    """Round 1's checkpoint of the two-round run is the one-round run's policy; a checkpoint
    inside round 2 (where a stopped run leaves off) is neither."""
    run_dir, round1 = full_run
    where = steps_by_where(run_dir)
    assert "the starting policy" in where and "after round 1, 2 optimiser steps in all" in where, where
    mid = where["inside round 2, 1 optimiser step into it, 3 optimiser steps in all"]
    got = ex.export(run_dir, step=where["after round 1, 2 optimiser steps in all"], out=tmp_path / "r1")
    assert np.abs(logits(got) - logits(round1)).max() <= 1e-5
    inside = logits(ex.export(run_dir, step=mid))  # default --out: RUN_DIR/export/step_N
    assert (run_dir / "export" / f"step_{mid}" / "config.json").is_file()
    for other in (round1, run_dir / "policy"):
        assert np.abs(inside - logits(other)).max() > 1e-3
    half = ex.export(run_dir, out=tmp_path / "bf16", dtype="bfloat16")
    assert json.loads((half / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert np.abs(logits(half) - logits(run_dir / "policy")).max() <= 0.05


def test_errors_name_the_folder(full_run, tmp_path):
    run_dir, _ = full_run
    with pytest.raises(ConfigError, match=f"{tmp_path}: no config.yaml"):
        ex.export(tmp_path)
    with pytest.raises(ConfigError, match=r"checkpoints: no checkpoint step 99; the run has steps 1, 2, 3, "):
        ex.export(run_dir, step=99)
    copy = tmp_path / "copy"
    copy.mkdir()
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    (copy / "config.yaml").write_text(yaml.safe_dump(saved))
    with pytest.raises(ConfigError, match=f"{copy}: no checkpoints"):
        ex.export(copy)
    os.symlink(run_dir / "checkpoints", copy / "checkpoints")
    saved["mesh"] = {**saved["mesh"], "data": 16}
    (copy / "config.yaml").write_text(yaml.safe_dump(saved))
    with pytest.raises(ConfigError, match=f"{copy}: the checkpoint is restored onto the run's mesh, which does not "
                       "fit here: .*16.* 8 devices"):
        ex.export(copy, out=tmp_path / "x")
    assert not (tmp_path / "x").exists()
    out = export_cli(tmp_path / "nowhere")
    assert out.returncode == 2 and f"{tmp_path / 'nowhere'}: no config.yaml" in out.stderr


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    """A LoRA run on base weights saved as an HF folder (``base``)."""
    from repo_jax import config as config_lib
    from repo_jax import models
    from repo_jax.loop.config import IrepoConfig
    from repo_jax.training import state as st

    tmp = tmp_path_factory.mktemp("export_lora")
    cfg = st.model_config(config_lib.load(IrepoConfig, TINY).model)
    models.save_pretrained(models.build(cfg, seed=0), tmp / "base")
    run_loop(tmp / "run", *SHORT, *LORA, f"model.weights={tmp / 'base'}", "loop.rounds=1")
    return tmp / "run", tmp / "base", cfg


def test_a_lora_run_exports_a_peft_adapter_that_loads_onto_its_base(lora_run, tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    run_dir, base, _ = lora_run
    out = ex.export(run_dir, out=tmp_path / "x")
    assert np.abs(logits(out) - logits(run_dir / "policy")).max() <= 1e-5
    assert np.abs(logits(out) - logits(base)).max() > 1e-3  # the adapters trained
    adapter = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert adapter["r"] == 4 and adapter["base_model_name_or_path"] == str(base)
    pm = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(str(base)),
                                        str(out / "adapter")).eval()
    merged = transformers.AutoModelForCausalLM.from_pretrained(str(out)).eval()
    with torch.no_grad():
        ids = torch.tensor(IDS, dtype=torch.long)
        want = merged(input_ids=ids).logits.numpy()
        assert np.abs(pm(input_ids=ids).logits.numpy() - want).max() <= 1e-5
        assert np.abs(pm.merge_and_unload()(input_ids=ids).logits.numpy() - want).max() <= 1e-5


def test_a_lora_checkpoint_on_other_base_weights_is_refused(lora_run, tmp_path):
    from repo_jax import models

    run_dir, base, cfg = lora_run
    models.save_pretrained(models.build(cfg, seed=1), base)  # the same path, other weights
    try:
        with pytest.raises(ConfigError, match=f"{run_dir}/checkpoints step 3: the LoRA adapters were trained on the "
                           f"base {base} .*: export with the same base weights"):
            ex.export(run_dir, out=tmp_path / "x")
    finally:
        models.save_pretrained(models.build(cfg, seed=0), base)


def test_offline_runs_export_too(tmp_path):
    """An SFT run (``python -m repo_jax.sft``) exports as it does at its end; an LPO run's saved
    config is read as the LPO program's."""
    from repo_jax import config as config_lib
    from repo_jax.offline.config import LpoConfig, SftConfig

    run_dir = tmp_path / "sft"
    out = subprocess.run([sys.executable, "-m", "repo_jax.sft", "--config", str(ROOT / "configs" / "tiny_sft.yaml"),
                          f"run_dir={run_dir}", "train.steps=2", "eval.every_steps=0", "eval.holdout=8",
                          "eval.num_prompts=0",
                          "progress=false"], cwd=ROOT, env=_env(1), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert isinstance(ex.load_run_config(str(run_dir))[0], SftConfig)
    got = ex.export(run_dir, out=tmp_path / "x")
    assert np.abs(logits(got) - logits(run_dir / "policy")).max() <= 1e-5
    lpo = config_lib.load(LpoConfig, ROOT / "configs" / "tiny_lpo.yaml")
    (tmp_path / "lpo").mkdir()
    (tmp_path / "lpo" / "config.yaml").write_text(yaml.safe_dump(config_lib.to_dict(lpo), sort_keys=False))
    cfg, local = ex.load_run_config(str(tmp_path / "lpo"))
    assert isinstance(cfg, LpoConfig) and cfg.run_dir == str(tmp_path / "lpo") and local == tmp_path / "lpo"


def test_a_run_in_a_bucket_exports_to_a_local_folder(gcs, full_run, tmp_path, monkeypatch):
    """``gs://`` (the emulator of test_buckets): the run's files come from the bucket, the
    checkpoints are read there; the policy is the run's."""
    from repo_jax import buckets

    monkeypatch.setenv("TENSORSTORE_GCS_HTTP_URL", gcs)  # this emulator's, for this test only
    run_dir, _ = full_run
    fs = buckets.filesystem()
    newest = max(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit())
    for name in ("config.yaml", f"checkpoints/{newest}"):  # the newest checkpoint is enough
        fs.put(str(run_dir / name), f"{BUCKET}/export/{name}", recursive=True)
    url = f"gs://{BUCKET}/export"
    env = _env(1, STORAGE_EMULATOR_HOST=gcs, TENSORSTORE_GCS_HTTP_URL=gcs, REPO_JAX_CACHE=str(tmp_path / "cache"))
    with pytest.raises(ConfigError, match=f"{url}: a gs:// run needs --out, a local folder"):
        ex.export(url)
    out = subprocess.run([sys.executable, "-m", "repo_jax.export", url, "--out", str(tmp_path / "x")], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert np.abs(logits(tmp_path / "x") - logits(run_dir / "policy")).max() <= 1e-5
