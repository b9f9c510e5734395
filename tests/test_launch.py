"""Launch scripts print the commands they would run (--dry-run) and reject bad arguments."""

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(script, *args):
    return subprocess.run(["bash", str(ROOT / "launch" / script), *args], capture_output=True, text=True)


def test_tpu_vm_dry_run_prints_gcloud_commands():
    out = _run("tpu_vm.sh", "--dry-run", "--name", "n1", "--zone", "us-central2-b", "--accelerator", "v5p-8",
               "--create", "--", "python", "-m", "repo_jax.plan", "--devices", "4")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert lines[0].startswith("gcloud compute tpus tpu-vm create n1") and "v5p-8" in lines[0]
    assert lines[1].startswith("git -C") and "archive" in lines[1]
    assert "scp /tmp/repo_jax.tgz n1:repo_jax.tgz" in lines[2] and "--worker=all" in lines[2]
    assert "tar\\ xzf" in lines[3]
    assert "pip\\ install" in lines[4] and "tpu" in lines[4]
    assert "repo_jax.plan" in lines[5] and "--worker=all" in lines[5]


def test_gpu_dry_run_sets_coordinator_for_each_host():
    out = _run("gpu.sh", "--dry-run", "--hosts", "h1,h2", "--", "python", "-m", "repo_jax.irepo", "run_dir=runs/a")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 2
    for i, line in enumerate(lines):
        assert line.startswith(f"ssh h{i + 1} ")
        assert "JAX_COORDINATOR_ADDRESS=h1:1234" in line and f"JAX_PROCESS_ID={i}" in line and "JAX_NUM_PROCESSES=2" in line


def test_missing_arguments_are_one_clear_error():
    out = _run("tpu_vm.sh", "--dry-run", "--name", "n1", "--", "true")
    assert out.returncode == 2 and "--zone" in out.stderr
    out = _run("gpu.sh", "--dry-run", "--bogus")
    assert out.returncode == 2 and "unknown argument --bogus" in out.stderr
