"""Small helpers shared by the benchmarks: timing of jitted functions and the JSON last line."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import jax


def wall_times(fn: Callable[[], Any], *, repeats: int = 3, warmup: int = 1) -> list[float]:
    """Sorted wall times in seconds of ``repeats`` calls of ``fn()`` (jax results blocked on,
    anything else -- torch tensors, host arrays -- returned as is), after ``warmup`` calls."""
    for _ in range(warmup):
        jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return sorted(times)


def time_fn(fn: Callable[[], Any], *, repeats: int = 3, warmup: int = 1) -> float:
    """Median wall time in seconds of ``fn()`` (see :func:`wall_times`)."""
    times = wall_times(fn, repeats=repeats, warmup=warmup)
    return times[len(times) // 2]


def emit(result: dict[str, Any]) -> None:
    """Prints the benchmark's machine-readable last line."""
    print(json.dumps(result, sort_keys=False), flush=True)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LlamaServer:
    """``python -m llama_cpp.server`` on ``model`` (a GGUF) at 127.0.0.1 on a free port, started
    and waited for (``/v1/models``) on enter, stopped by its pid on exit; ``url`` is its
    OpenAI base URL. Needs ``llama-cpp-python[server]`` (the test extra)."""

    def __init__(self, model, *, log_path, threads: int = 2, n_ctx: int = 2048, timeout: float = 180.0):
        self.model, self.log_path, self.threads, self.n_ctx, self.timeout = model, log_path, threads, n_ctx, timeout

    def __enter__(self) -> "LlamaServer":
        import os
        import subprocess
        import sys

        import httpx

        port = free_port()
        self.url = f"http://127.0.0.1:{port}/v1"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "llama_cpp.server", "--model", str(self.model), "--host", "127.0.0.1", "--port",
             str(port), "--n_ctx", str(self.n_ctx), "--n_threads", str(self.threads), "--n_threads_batch",
             str(self.threads), "--verbose", "false"],
            stdout=open(self.log_path, "w"), stderr=subprocess.STDOUT, env=dict(os.environ))
        deadline = time.time() + self.timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the llama.cpp server exited: {open(self.log_path).read()[-2000:]}")
            try:
                if httpx.get(self.url + "/models", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.__exit__()
        raise RuntimeError(f"the llama.cpp server did not answer {self.url}/models within {self.timeout:.0f} s")

    def __exit__(self, *exc) -> None:
        import signal
        import subprocess

        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
