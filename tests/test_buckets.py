"""``run_dir: gs://...`` against a real GCS emulator (gcp-storage-emulator, the GCS JSON API, with
the generation header and preconditions tensorstore needs: tests/gcs_emulator.py) that the tests
start on 127.0.0.1: the mirror's transfer rules, and a loop run killed with SIGKILL in
the middle of a round whose local disk is then deleted, resumed on a "new VM" (another local
cache) from the bucket alone to the metrics of an uninterrupted run."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

BUCKET = "repo-jax-test"


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
    """The emulator's URL; ``STORAGE_EMULATOR_HOST`` points this process's gcsfs at it."""
    pytest.importorskip("gcsfs")
    from repo_jax.benchmarks.common import free_port

    port = free_port()
    proc = subprocess.Popen([sys.executable, str(Path(__file__).with_name("gcs_emulator.py")), str(port), BUCKET],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            assert proc.poll() is None and time.time() < deadline, "the GCS emulator did not start"
            time.sleep(0.2)
    url = f"http://127.0.0.1:{port}"
    saved = os.environ.get("STORAGE_EMULATOR_HOST")
    os.environ["STORAGE_EMULATOR_HOST"] = url
    yield url
    if saved is None:
        os.environ.pop("STORAGE_EMULATOR_HOST", None)
    else:
        os.environ["STORAGE_EMULATOR_HOST"] = saved
    proc.terminate()
    proc.wait(timeout=30)


def _fs():
    from repo_jax import buckets

    fs = buckets.filesystem()
    fs.invalidate_cache()
    return fs


def _remote(prefix: str) -> dict[str, bytes]:
    fs = _fs()
    return {k.split(f"{prefix}/", 1)[1]: fs.cat_file(k) for k in fs.find(prefix)}


def test_push_then_pull_on_another_machine_gives_the_same_files(gcs, tmp_path):
    from repo_jax.buckets import Mirror

    url = f"gs://{BUCKET}/mirror/a"
    here = tmp_path / "vm1"
    (here / "rounds").mkdir(parents=True)
    (here / "checkpoints" / "1").mkdir(parents=True)
    files = {"config.yaml": b"seed: 1\n", "metrics.jsonl": b'{"iteration": 0}\n',
             "rounds/round_001.jsonl": b'{"prompt": "x"}\n'}
    for rel, data in files.items():
        (here / rel).write_bytes(data)
    (here / "rounds" / "round_002.jsonl.tmp").write_bytes(b"half written")
    (here / "checkpoints" / "1" / "state").write_bytes(b"orbax writes these itself")
    m = Mirror(url, here)
    assert m.push() == 3
    assert m.push() == 0  # nothing changed since
    assert _remote(f"{BUCKET}/mirror/a") == files  # no .tmp, no checkpoints/
    other = Mirror(url, tmp_path / "vm2")
    assert other.pull() == 3
    assert {p.relative_to(tmp_path / "vm2").as_posix(): p.read_bytes()
            for p in (tmp_path / "vm2").rglob("*") if p.is_file() and p.name != ".mirror.json"} == files


def test_pull_keeps_what_was_written_here_after_the_last_upload_and_takes_what_another_vm_wrote(gcs, tmp_path):
    from repo_jax.buckets import Mirror

    url = f"gs://{BUCKET}/mirror/b"
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    (a / "config.yaml").write_text("seed: 1\n")
    (a / "annotations.jsonl").write_text("1\n")
    (a / "metrics.jsonl").write_text("0\n")
    Mirror(url, a).push()
    # VM b resumes the run and writes more; VM a, meanwhile, was killed after appending one line
    mb = Mirror(url, b)
    mb.pull()
    (b / "metrics.jsonl").write_text("0\n1\n")
    mb.push()
    (a / "annotations.jsonl").write_text("1\n2\n")
    fetched = Mirror(url, a).pull()
    assert fetched == 1
    assert (a / "metrics.jsonl").read_text() == "0\n1\n"  # unchanged here, changed there: theirs
    assert (a / "annotations.jsonl").read_text() == "1\n2\n"  # written here after the upload: ours
    assert Mirror(url, a).push() == 1 and _remote(f"{BUCKET}/mirror/b")["annotations.jsonl"] == b"1\n2\n"


def test_a_bucket_folder_without_a_run_clears_a_stale_local_copy(gcs, tmp_path):
    from repo_jax.buckets import Mirror

    stale = tmp_path / "stale"
    stale.mkdir()
    (stale / "config.yaml").write_text("seed: 9\n")
    (stale / "metrics.jsonl").write_text("old\n")
    assert Mirror(f"gs://{BUCKET}/mirror/empty", stale).pull() == 0
    assert not (stale / "config.yaml").exists() and not (stale / "metrics.jsonl").exists()


def test_a_killed_run_resumes_from_the_bucket_alone_to_the_same_metrics(gcs, tmp_path, monkeypatch):
    """SIGKILL inside round 2's training once a mid-round checkpoint and the round file are in
    the bucket; the VM's local copy is deleted; a rerun with another local cache (a new VM)
    resumes inside round 2 from the bucket, reuses the round file and the judge's answers, and
    ends with the metrics of an uninterrupted run with a local run_dir. The config, metrics,
    round files, annotation cache and exported policy are all in the bucket at the end, and
    ``repo_jax.compare`` reads the run from there."""
    from test_irepo import ROOT, _cmd, _env, eval_values, metrics, run_loop
    from test_served import Fake

    fake = Fake()
    panel = (f"annotate.panel=[{{kind: rule, name: digits, temperature: 0.1}}, {{kind: served_judge, "
             f"name: judge/fake, model: m, base_url: '{fake.url}'}}]")
    short = ("loop.rounds=2", "loop.epochs=6", "loop.progress=false", "checkpoint.every_steps=1", panel)
    url = f"gs://{BUCKET}/runs/killed"
    try:
        run_loop(tmp_path / "reference", *short)
        asked_by_reference = fake.requests

        env = _env(1, STORAGE_EMULATOR_HOST=gcs, REPO_JAX_CACHE=str(tmp_path / "vm1"))
        proc = subprocess.Popen(_cmd(url, *short), cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT)
        chunks: list[bytes] = []
        threading.Thread(target=lambda: chunks.extend(iter(lambda: os.read(proc.stdout.fileno(), 65536), b"")),
                         daemon=True).start()
        fs = _fs()

        def committed() -> set[int]:
            fs.invalidate_cache()
            return {int(p.rsplit("/", 2)[-2]) for p in fs.glob(f"{BUCKET}/runs/killed/checkpoints/*/commit_success.txt")}

        before, deadline = None, time.time() + 600
        while proc.poll() is None and time.time() < deadline:  # round 2's file is uploaded at its first save
            if before is None and fs.exists(f"{BUCKET}/runs/killed/rounds/round_002.jsonl"):
                before = max(committed(), default=-1)
            if before is not None and max(committed(), default=-1) > before:
                break
            time.sleep(0.05)
        assert proc.poll() is None, b"".join(chunks).decode(errors="replace")[-3000:]
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        shutil.rmtree(tmp_path / "vm1")  # the reclaimed VM's disk
        asked_before_resume = fake.requests

        out = subprocess.run(_cmd(url, *short), cwd=ROOT, capture_output=True, text=True, timeout=600,
                             env=_env(1, STORAGE_EMULATOR_HOST=gcs, REPO_JAX_CACHE=str(tmp_path / "vm2")))
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    finally:
        fake.stop()
    assert f"resuming {url} at iteration 1 (phase train)" in out.stdout
    assert "round 2: reusing" in out.stdout
    assert asked_by_reference > 0 and asked_before_resume > asked_by_reference
    local = tmp_path / "vm2" / "runs" / "gs" / BUCKET / "runs" / "killed"
    assert eval_values(metrics(local)) == eval_values(metrics(tmp_path / "reference"))
    from repo_jax.annotators.served import cache_file

    stored = set(_remote(f"{BUCKET}/runs/killed"))
    for name in ("config.yaml", "metrics.jsonl", "rounds/round_001.jsonl", "rounds/round_002.jsonl",
                 cache_file("annotations", "judge/fake").as_posix(), "eval/answers_002.jsonl", "policy/config.json", "report.png"):
        assert name in stored, (name, sorted(stored))
    assert _remote(f"{BUCKET}/runs/killed")["metrics.jsonl"] == (local / "metrics.jsonl").read_bytes()
    from repo_jax.compare import load_run

    monkeypatch.setenv("REPO_JAX_CACHE", str(tmp_path / "laptop"))
    _, records = load_run(url)
    assert records == metrics(local)
