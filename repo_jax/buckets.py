"""Run folders in a bucket: ``run_dir: gs://bucket/path``.

A spot or preemptible VM loses its disk when it is reclaimed, so a run that must survive it keeps
everything in Cloud Storage. Orbax writes the checkpoints there itself (``run_dir/checkpoints``:
tensorstore and ``etils.epath`` speak ``gs://``). Every other file of the run (``config.yaml``,
``metrics.jsonl``, round files, the served annotators' caches, evaluation answers, TensorBoard,
the report, an exported policy) is written by ordinary file code into a local working copy and
*mirrored*: :class:`Mirror` uploads what changed since the last upload after every checkpoint,
every ``every_s`` seconds in a background thread, and when the run ends or is preempted; at start
it downloads the bucket's files, so a run on a new VM resumes from the bucket alone.

Which copy wins. A manifest (``.mirror.json`` in the local copy) records each file's local
``(size, mtime)`` and the bucket's ``md5Hash`` as of the last transfer. At start a file is
downloaded when it is missing locally, when the local one is unchanged since the last transfer but
the bucket's changed (another VM ran since), or when the local one has no record (a copy of
unknown origin); a local file written after the last upload (this VM was killed before it could
upload) is kept and uploaded. A bucket folder without ``config.yaml`` holds no run: the local copy
is cleared, so a run deleted from the bucket starts afresh.

The local copy is ``$REPO_JAX_CACHE/runs/gs/<bucket>/<path>`` (``repo_jax.assets.cache_dir``).
Credentials are Google's defaults (a TPU or GCE VM's service account, or ``gcloud auth
application-default login``). ``STORAGE_EMULATOR_HOST=http://host:port`` points every writer
(gcsfs, and tensorstore through ``TENSORSTORE_GCS_HTTP_URL``) at a local emulator instead.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from pathlib import Path

SCHEMES = ("gs://",)
MANIFEST = ".mirror.json"
SKIP_SUFFIXES = (".tmp",)  # files written then renamed: the rename is what gets uploaded


def is_remote(path) -> bool:
    return str(path).startswith(SCHEMES)


def local_path(run_dir) -> Path:
    """Where a run's files are written on this machine: ``run_dir`` itself, or for ``gs://b/p``
    the working copy ``cache_dir()/runs/gs/b/p``."""
    if not is_remote(run_dir):
        return Path(run_dir)
    from repo_jax.assets import cache_dir

    scheme, rest = str(run_dir).split("://", 1)
    return cache_dir() / "runs" / scheme / rest.strip("/")


def use_emulator_everywhere() -> None:
    """With ``STORAGE_EMULATOR_HOST`` set, the settings that send tensorstore (Orbax's arrays) to
    the same emulator, and keep gcsfs from asking the emulator for a bucket layout it does not
    serve (a 60 s gRPC timeout per bucket)."""
    host = os.environ.get("STORAGE_EMULATOR_HOST")
    if host:
        url = host if "://" in host else f"http://{host}"
        os.environ.setdefault("TENSORSTORE_GCS_HTTP_URL", url)
        os.environ.setdefault("GOOGLE_AUTH_TOKEN_FOR_TESTING", "emulator")
        os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")


def filesystem():
    use_emulator_everywhere()
    try:
        import gcsfs
    except ImportError:
        raise ImportError("a gs:// run_dir needs gcsfs: pip install -e '.[gcs]' (the tpu and cuda extras "
                          "include it)") from None
    return gcsfs.GCSFileSystem()


class Mirror:
    """The local working copy ``local`` of the bucket folder ``url`` (see the module doc).
    ``exclude``: top-level names that are not mirrored (``checkpoints``: Orbax writes those to
    the bucket itself). ``writer=False`` (every process but 0) only downloads."""

    def __init__(self, url: str, local: Path | None = None, *, exclude=("checkpoints",), writer: bool = True,
                 fs=None):
        self.url = str(url).rstrip("/")
        self.remote = self.url.split("://", 1)[1]
        self.local = Path(local) if local is not None else local_path(url)
        self.exclude, self.writer = tuple(exclude), writer
        self.fs = fs or filesystem()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.uploaded = 0  # files uploaded by this process (the end-of-run log line)
        self._manifest = self._read_manifest()

    # ------------------------------------------------------------------ manifest

    def _read_manifest(self) -> dict:
        try:
            return json.loads((self.local / MANIFEST).read_text())
        except (OSError, ValueError):
            return {}

    def _write_manifest(self) -> None:
        path = self.local / MANIFEST
        tmp = path.with_name(MANIFEST + ".tmp")
        tmp.write_text(json.dumps(self._manifest, sort_keys=True))
        tmp.replace(path)

    @staticmethod
    def _stat(path: Path) -> list[int] | None:
        try:
            s = path.stat()
        except OSError:
            return None
        return [s.st_size, s.st_mtime_ns]

    def _mirrored(self, rel: str) -> bool:
        return (rel != MANIFEST and rel.split("/", 1)[0] not in self.exclude and not rel.endswith(SKIP_SUFFIXES))

    def _remote_files(self) -> dict[str, dict]:
        self.fs.invalidate_cache(self.remote)
        found = self.fs.find(self.remote, detail=True)
        out = {}
        for name, info in found.items():
            rel = name[len(self.remote):].lstrip("/")
            if rel and info.get("type", "file") == "file" and self._mirrored(rel):
                out[rel] = info
        return out

    @staticmethod
    def _tag(info: dict) -> str:
        return str(info.get("md5Hash") or info.get("generation") or info.get("etag") or info.get("size"))

    # ------------------------------------------------------------------ transfers

    def pull(self) -> int:
        """Downloads the bucket's run files into the local copy (see the module doc); returns how
        many it fetched."""
        with self._lock:
            remote = self._remote_files()
            if "config.yaml" not in remote and self.local.exists():  # no run in the bucket: a stale
                shutil.rmtree(self.local)                              # local copy must not resume
                self._manifest = {}
            fetched = 0
            for rel, info in sorted(remote.items()):
                path, seen = self.local / rel, self._manifest.get(rel)
                now = self._stat(path)
                unchanged_here = seen is not None and now == seen["local"]
                if now is not None and (unchanged_here and seen["remote"] == self._tag(info)):
                    continue  # same on both sides
                if now is not None and seen is not None and not unchanged_here:
                    continue  # written here after the last upload: keep it, the next push sends it
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_name(path.name + ".tmp")
                self.fs.get_file(f"{self.remote}/{rel}", str(tmp))
                tmp.replace(path)
                self._manifest[rel] = {"local": self._stat(path), "remote": self._tag(info)}
                fetched += 1
            self.local.mkdir(parents=True, exist_ok=True)
            self._write_manifest()
            return fetched

    def push(self) -> int:
        """Uploads every local file written since its last transfer; returns how many."""
        if not self.writer:
            return 0
        with self._lock:
            sent = 0
            for path in sorted(p for p in self.local.rglob("*") if p.is_file()):
                rel = path.relative_to(self.local).as_posix()
                if not self._mirrored(rel):
                    continue
                now = self._stat(path)
                seen = self._manifest.get(rel)
                if now is None or (seen is not None and seen["local"] == now):
                    continue
                target = f"{self.remote}/{rel}"
                self.fs.put_file(str(path), target)
                self.fs.invalidate_cache(target)
                self._manifest[rel] = {"local": now, "remote": self._tag(self.fs.info(target))}
                sent += 1
            if sent:
                self._write_manifest()
            self.uploaded += sent
            return sent

    # ------------------------------------------------------------------ background

    def start(self, every_s: float) -> None:
        """Uploads in a background thread every ``every_s`` seconds and whenever :meth:`push_soon`
        is called (after a checkpoint)."""
        if not self.writer or self._thread is not None:
            return

        def loop():
            while not self._stop.is_set():
                self._wake.wait(every_s)
                self._wake.clear()
                try:
                    self.push()
                except Exception:  # noqa: BLE001 - the next push retries; close()'s final push raises
                    time.sleep(1.0)

        self._thread = threading.Thread(target=loop, name=f"mirror {self.url}", daemon=True)
        self._thread.start()

    def push_soon(self) -> None:
        self._wake.set()

    def close(self, *, upload: bool = True) -> None:
        """Stops the background thread and uploads what is left (raises if that fails)."""
        if self._thread is not None:
            self._stop.set()
            self._wake.set()
            self._thread.join()
            self._thread = None
        if upload:
            self.push()

    def remove(self, rel: str) -> None:
        """Deletes one file of the run from the bucket (and forgets it)."""
        with self._lock:
            target = f"{self.remote}/{rel}"
            if self.writer and self.fs.exists(target):
                self.fs.rm(target)
            self._manifest.pop(rel, None)
            self._write_manifest()
