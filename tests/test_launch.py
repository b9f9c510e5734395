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
    assert lines[0][:6] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "n1"] and "--spot" not in lines[0]
    create = lines[0]  # the accelerator type and runtime version as Google's docs name them
    assert create[create.index("--accelerator-type") + 1] == accelerator and create[create.index("--version") + 1] == runtime
    assert lines[1][:2] == ["git", "-C"] and "archive" in lines[1]
    assert lines[2][4:7] == ["scp", "/tmp/repo_jax.tgz", "n1:repo_jax.tgz"] and "--worker=all" in lines[2]
    assert "--worker=all" in lines[3] and lines[3][-1] == "tar xzf repo_jax.tgz"
    assert "--worker=all" in lines[4] and lines[4][-1] == "cd repo_jax && bash launch/remote.sh setup tpu"
    assert "--worker=all" in lines[5]  # detached on every worker
    assert lines[5][-1] == "cd repo_jax && bash launch/remote.sh start -- python -m repo_jax.plan --devices 4"
    assert "--logs" in out.stderr


def _tpu(*args):
    out = _run("tpu_vm.sh", "--dry-run", "--name", "n1", "--zone", "z", *args)
    assert out.returncode == 0, out.stderr
    return [shlex.split(x) for x in out.stdout.strip().splitlines()]


def test_tpu_vm_spot_and_queued_resources():
    spot = _tpu("--accelerator", "v5litepod-8", "--create", "--spot", "--", "true")[0]
    assert spot[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "n1"] and spot[-1] == "--spot"
    queued = _tpu("--accelerator", "v6e-8", "--create", "--queued", "--spot", "--project", "p", "--", "true")
    assert queued[0][:6] == ["gcloud", "compute", "tpus", "queued-resources", "create", "n1"]
    q = queued[0]
    assert q[q.index("--node-id") + 1] == "n1" and q[q.index("--accelerator-type") + 1] == "v6e-8"
    assert q[q.index("--runtime-version") + 1] == "v2-alpha-tpuv6e" and "--spot" in q and q[q.index("--project") + 1] == "p"
    assert queued[1][:6] == ["gcloud", "compute", "tpus", "queued-resources", "describe", "n1"]  # waits for ACTIVE
    assert "value(state.state)" in queued[1]
    assert "--spot" not in _tpu("--accelerator", "v6e-8", "--create", "--queued", "--", "true")[0]
    out = _run("tpu_vm.sh", "--dry-run", "--name", "n1", "--zone", "z", "--accelerator", "v6e-8", "--spot", "--", "true")
    assert out.returncode == 2 and "go with --create" in out.stderr


def test_tpu_vm_logs_status_stop_and_delete():
    assert _tpu("--logs") == [["gcloud", "compute", "tpus", "tpu-vm", "ssh", "n1", "--zone", "z", "--worker=0",
                               "--command", "cd repo_jax && bash launch/remote.sh logs"]]
    assert _tpu("--logs", "--worker", "3")[0][-3] == "--worker=3"
    for action in ("status", "stop"):
        line = _tpu(f"--{action}")[0]
        assert "--worker=all" in line and line[-1] == f"cd repo_jax && bash launch/remote.sh {action}"
    assert _tpu("--delete")[0][:6] == ["gcloud", "compute", "tpus", "tpu-vm", "delete", "n1"]
    assert _tpu("--delete", "--queued")[0][:6] == ["gcloud", "compute", "tpus", "queued-resources", "delete", "n1"]


def test_gpu_dry_run_sets_up_each_host_and_starts_detached_with_the_coordinator():
    out = _run("gpu.sh", "--dry-run", "--hosts", "h1,h2", "--", "python", "-m", "repo_jax.irepo", "run_dir=runs/a")
    assert out.returncode == 0, out.stderr
    lines = [shlex.split(x) for x in out.stdout.strip().splitlines()]
    assert lines[0][:2] == ["git", "-C"] and "archive" in lines[0]
    setup, runs = lines[1:-2], lines[-2:]
    for i, host in enumerate(["h1", "h2"]):
        mine = [x for x in setup if x[1] == host or x[2].startswith(host + ":")]
        assert mine[0] == ["scp", "/tmp/repo_jax.tgz", f"{host}:repo_jax.tgz"]
        assert mine[1][:2] == ["ssh", host] and "tar xzf repo_jax.tgz -C repo_jax" in mine[1][2]
        assert mine[2] == ["ssh", host, "cd repo_jax && bash launch/remote.sh setup cuda"]
        assert runs[i][:2] == ["ssh", host]
        assert runs[i][2] == (f"cd repo_jax && bash launch/remote.sh start JAX_COORDINATOR_ADDRESS=h1:1234 "
                              f"JAX_NUM_PROCESSES=2 JAX_PROCESS_ID={i} -- python -m repo_jax.irepo run_dir=runs/a")
    assert "--logs" in out.stderr


def test_gpu_single_host_from_a_repo_has_no_coordinator():
    out = _run("gpu.sh", "--dry-run", "--hosts", "h1", "--repo", "https://example.com/r.git", "--extra", "cuda,eval",
               "--", "python", "-m", "repo_jax.evaluate", "pass-at-k", "--model", "smollm2")
    assert out.returncode == 0, out.stderr
    lines = [shlex.split(x) for x in out.stdout.strip().splitlines()]
    assert lines[0] == ["ssh", "h1", "[ -d repo_jax ] || git clone https://example.com/r.git repo_jax"]
    assert lines[1] == ["ssh", "h1", "cd repo_jax && bash launch/remote.sh setup cuda,eval"]
    assert lines[2][2] == "cd repo_jax && bash launch/remote.sh start -- python -m repo_jax.evaluate pass-at-k --model smollm2"
    out = _run("gpu.sh", "--dry-run", "--no-setup", "--hosts", "h1", "--", "true")
    assert out.returncode == 0 and len(out.stdout.strip().splitlines()) == 1
    out = _run("gpu.sh", "--dry-run", "--hosts", "h1,h2", "--stop")
    assert [shlex.split(x) for x in out.stdout.strip().splitlines()] == [
        ["ssh", h, "cd repo_jax && bash launch/remote.sh stop"] for h in ("h1", "h2")]
    out = _run("gpu.sh", "--dry-run", "--hosts", "h1,h2", "--logs", "--host", "h2")
    assert shlex.split(out.stdout) == ["ssh", "h2", "cd repo_jax && bash launch/remote.sh logs"]


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


def _remote_copy(tmp_path: Path) -> Path:
    """A folder laid out as the launchers leave it on a machine (launch/remote.sh runs from the
    folder above it); the venv is this test's own interpreter."""
    import shutil

    (tmp_path / "launch").mkdir(parents=True)
    shutil.copy(ROOT / "launch" / "remote.sh", tmp_path / "launch")
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    return tmp_path


def _remote(where: Path, *args, timeout=60):
    return subprocess.run(["bash", str(where / "launch" / "remote.sh"), *args], capture_output=True, text=True,
                          timeout=timeout)


def test_setup_is_skipped_only_while_the_venv_matches_pyproject(tmp_path):
    import sys

    where = _remote_copy(tmp_path)
    assert _remote(where, "setup", "tpu", "--check").returncode == 1  # no venv yet
    (where / ".venv" / "bin").mkdir(parents=True)
    (where / ".venv" / "bin" / "python").symlink_to(sys.executable)
    (where / ".venv" / "repo_jax.stamp").write_text(_remote(where, "stamp", "tpu").stdout)
    assert _remote(where, "setup", "tpu", "--check").returncode == 0
    out = _remote(where, "setup", "tpu")  # returns at once: no pip
    assert out.returncode == 0 and "skipped" in out.stdout
    assert _remote(where, "setup", "cuda", "--check").returncode == 1  # another extra
    with open(where / "pyproject.toml", "a") as f:
        f.write("\n# a changed dependency\n")
    assert _remote(where, "setup", "tpu", "--check").returncode == 1


def test_a_detached_run_outlives_its_launcher_and_stop_checkpoints_it(tmp_path):
    """remote.sh start returns at once with the loop running in its own session; its output goes
    to logs/job-<host>.log; a second start is refused; stop sends SIGTERM to the process group, the
    loop checkpoints and exits 143, and the status says so."""
    import socket
    import sys
    import time

    from test_irepo import TINY, XLA_CACHE

    where = _remote_copy(tmp_path / "vm")
    run_dir = tmp_path / "run"
    t0 = time.time()
    out = _remote(where, "start", "JAX_PLATFORMS=cpu", "XLA_FLAGS=", "PYTHONUNBUFFERED=1",
                  f"JAX_COMPILATION_CACHE_DIR={XLA_CACHE}", "--", sys.executable, "-m", "repo_jax.irepo",
                  "--config", str(TINY), f"run_dir={run_dir}", "loop.progress=false")
    assert out.returncode == 0 and "started" in out.stdout, out.stderr
    assert time.time() - t0 < 10  # the launcher does not wait for the job
    log = where / "logs" / f"job-{socket.gethostname()}.log"
    try:
        assert "running" in _remote(where, "status").stdout
        again = _remote(where, "start", "--", "true")
        assert again.returncode == 2 and "already running" in again.stderr
        deadline = time.time() + 300
        while "round    reward" not in (log.read_text() if log.exists() else ""):  # the loop is under way
            assert time.time() < deadline and "running" in _remote(where, "status").stdout, log.read_text()
            time.sleep(0.2)
    finally:
        stop = _remote(where, "stop", "240", timeout=300)
    assert stop.returncode == 0 and "exit status 143" in stop.stdout, stop.stdout + stop.stderr
    assert "SIGTERM: checkpoint written" in log.read_text()
    assert "exited with status 143" in _remote(where, "status").stdout
    assert any(p.name.isdigit() for p in (run_dir / "checkpoints").iterdir())
    tail = _remote(where, "logs", "-n", "3", "--no-follow")
    assert tail.returncode == 0 and "SIGTERM" in tail.stdout
