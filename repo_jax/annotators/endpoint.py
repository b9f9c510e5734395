"""The HTTP side of a served annotator (``repo_jax.annotators.served``): one OpenAI-compatible
endpoint with its answer cache, concurrency, retries (``Retry-After``, jittered backoff, a retry
budget), client-side rate limits and per-round budget. What the answers mean is the annotators'
business: :meth:`Endpoint.post_many` takes their reader and caches only answers it accepts."""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from email.utils import parsedate_to_datetime
from pathlib import Path

RETRY_STATUS = frozenset({408, 409, 425, 429, 500, 502, 503, 504})
MAX_BACKOFF_S = 60.0  # one wait between attempts never exceeds this (Retry-After included)

class ServedError(RuntimeError):
    """A served annotator could not get a usable answer (after its retries)."""


def cache_file(folder: str | Path, name: str) -> Path:
    """``folder/<name, made safe>-<8 hex of name>.jsonl``: distinct names never share a file."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "annotator"
    return Path(folder) / f"{safe}-{hashlib.sha256(name.encode()).hexdigest()[:8]}.jsonl"


def retry_after_seconds(value: str | None, now: float | None = None) -> float | None:
    """A ``Retry-After`` header's wait: delta-seconds or an HTTP date (RFC 9110); None if absent
    or unreadable."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError, IndexError):
        return None
    return max(0.0, when - (time.time() if now is None else now))


class RateLimiter:
    """Client-side token buckets: at most ``requests_per_minute`` requests and
    ``tokens_per_minute`` tokens (prompt + completion, estimated before sending) in any minute,
    with bursts of up to a minute's allowance; 0 = no limit. :meth:`acquire` reserves and
    returns how long the caller must wait (callers sleep outside the lock, so threads queue)."""

    def __init__(self, requests_per_minute: float = 0, tokens_per_minute: float = 0, clock=time.monotonic):
        self.limits = (float(requests_per_minute), float(tokens_per_minute))
        self.levels = list(self.limits)
        self.clock, self.stamp = clock, clock()
        self._lock = threading.Lock()

    def acquire(self, tokens: int) -> float:
        with self._lock:
            now = self.clock()
            elapsed, self.stamp = now - self.stamp, now
            wait = 0.0
            for i, (limit, need) in enumerate(zip(self.limits, (1.0, float(tokens)))):
                if limit <= 0:
                    continue
                self.levels[i] = min(limit, self.levels[i] + elapsed * limit / 60.0)
                wait = max(wait, (need - self.levels[i]) * 60.0 / limit)
                self.levels[i] -= need  # may go below 0: the debt the wait pays off
            return max(0.0, wait)


class Endpoint:
    """The HTTP side of one served annotator: cache, concurrency, retries, rate limits, budget."""

    def __init__(self, *, name: str, base_url: str, model: str, api_key_env: str = "", timeout: float = 60.0,
                 max_retries: int = 8, backoff: float = 0.5, retry_budget_s: float = 120.0, max_concurrency: int = 4,
                 max_requests: int = 0, max_requests_per_minute: float = 0, max_tokens_per_minute: float = 0,
                 cache_path: str | Path | None = None, show_progress: bool = False, sleep=time.sleep):
        import httpx

        if not base_url:
            raise ValueError(f"{name}: base_url is empty (e.g. http://127.0.0.1:8000/v1)")
        key = os.environ.get(api_key_env) if api_key_env else None
        if api_key_env and not key:
            raise ValueError(f"{name}: the environment variable {api_key_env} (api_key_env) is not set")
        self.name, self.url, self.model = name, base_url.rstrip("/"), model
        self.show_progress = show_progress
        self.max_retries, self.backoff, self.retry_budget_s = int(max_retries), float(backoff), float(retry_budget_s)
        self.max_concurrency, self.max_requests = max(1, int(max_concurrency)), int(max_requests)
        self.limiter = RateLimiter(max_requests_per_minute, max_tokens_per_minute)
        self._sleep, self._jitter = sleep, random.Random()
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self._client = httpx.Client(headers=headers, timeout=timeout,
                                    limits=httpx.Limits(max_connections=self.max_concurrency))
        self._lock = threading.Lock()
        self._served_model: str | None = None
        self.cache_path = Path(cache_path) if cache_path else None
        self.cache: dict[str, dict] = self._load_cache() if self.cache_path is not None else {}
        self.sent = 0          # HTTP requests made (retries included), for tests and the benchmark
        self.round_sent = 0    # requests since the last reset (the per-round budget)
        self.usage: Counter = Counter()  # requests / cached / prompt_tokens / completion_tokens (take_usage)

    # ---------------------------------------------------------------- cache

    def _load_cache(self) -> dict[str, dict]:
        """The cache file's answers. A last line without its newline was cut by a kill: it is
        dropped and the file truncated to the last whole line; any other unreadable line is an
        error naming the file and line."""
        path, out = self.cache_path, {}
        if not path.is_file():
            return out
        data = path.read_bytes()
        if data and not data.endswith(b"\n"):
            keep = data.rfind(b"\n") + 1
            with path.open("r+b") as f:
                f.truncate(keep)
            data = data[:keep]
        for n, line in enumerate(data.decode().splitlines(), 1):
            try:
                entry = json.loads(line)
                out[entry["key"]] = entry["answer"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise ServedError(f"{self.name}: {path} line {n} is not a cache entry ({line[:120]!r}); "
                                  "delete that line (its request is asked again)") from None
        return out

    def served_model(self) -> str:
        """The model id the server reports at ``GET /models`` for this endpoint (the configured
        ``model`` when listed, else the only one listed); "" when it reports none."""
        if self._served_model is None:
            ids: list[str] = []
            try:
                r = self._client.get(self.url + "/models", timeout=10.0)
                if r.status_code == 200:
                    ids = [str(m.get("id")) for m in (r.json().get("data") or []) if isinstance(m, dict)]
            except Exception:  # noqa: BLE001 - an endpoint without /models: the URL alone identifies it
                ids = []
            self._served_model = self.model if self.model in ids else ids[0] if len(ids) == 1 else ""
        return self._served_model

    def key(self, path: str, body: dict) -> str:
        """The cache key: the endpoint (base URL and the model id it reports), the path and the body."""
        ident = {"url": self.url, "served": self.served_model(), "model": self.model, "path": path, "body": body}
        return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()

    def reset(self) -> None:
        self.round_sent = 0

    def take_usage(self) -> dict[str, int]:
        """Requests answered, answers read from the cache, and the ``usage`` tokens the server
        reported since the last call."""
        with self._lock:
            out = {k: int(self.usage.get(k, 0)) for k in ("requests", "cached", "prompt_tokens", "completion_tokens")}
            self.usage.clear()
        return out

    # ---------------------------------------------------------------- requests

    def post_many(self, path: str, bodies: Sequence[dict], parse: Callable[[dict], object]) -> list:
        """``parse(answer)`` of the answer to each body posted to ``base_url + path``: cached
        answers from the cache, new ones ``max_concurrency`` at a time (a requests bar with
        ``show_progress``). Each new answer is parsed (a :class:`ServedError` if it is not
        usable), then cached and appended to the cache file, in the worker, as it arrives,
        whatever happens to the other requests. Raises :class:`ServedError` once every request
        settled, naming the first failure and how many more failed."""
        from repo_jax import reporting

        full = [{**b, "model": self.model} for b in bodies]
        keys = [self.key(path, b) for b in full]
        results = {k: parse(self.cache[k]) for k in dict.fromkeys(keys) if k in self.cache}
        todo = {k: b for k, b in zip(keys, full) if k not in results}
        with self._lock:
            self.usage["cached"] += len(keys) - len(todo)
        if self.max_requests and self.round_sent + len(todo) > self.max_requests:
            raise ServedError(f"{self.name}: {len(todo)} new requests would pass the budget of {self.max_requests} "
                              f"per round ({self.round_sent} sent); raise max_requests")
        errors: list[str] = []
        if todo:
            def work(k, body):
                answer = self._post(path, body)
                value = parse(answer)  # validated before it is cached
                self._store(k, answer)
                return value

            bar = reporting.progress(total=len(todo), desc=f"{self.name}: requests", unit="req",
                                     enabled=self.show_progress)
            with ThreadPoolExecutor(self.max_concurrency) as pool:
                futures = {pool.submit(work, k, b): k for k, b in todo.items()}
                for fut in as_completed(futures):
                    try:
                        results[futures[fut]] = fut.result()
                    except ServedError as e:
                        errors.append(str(e))
                    except Exception as e:  # noqa: BLE001 - e.g. the cache write: named, the rest still land
                        errors.append(f"{self.name}: {type(e).__name__}: {e}")
                    bar.update(1)
            bar.close()
        if errors:
            more = f" (and {len(errors) - 1} more failed requests)" if len(errors) > 1 else ""
            raise ServedError(errors[0] + more)
        return [results[k] for k in keys]

    def _store(self, key: str, answer: dict) -> None:
        line = json.dumps({"key": key, "answer": answer}) + "\n"
        with self._lock:
            self.cache[key] = answer
            if self.cache_path is not None:
                self.cache_path.parent.mkdir(parents=True, exist_ok=True)
                with self.cache_path.open("a") as f:
                    f.write(line)
                    f.flush()
                    os.fsync(f.fileno())

    def _estimate_tokens(self, body: dict) -> int:
        """Prompt tokens (about 4 characters each) plus the completion's ``max_tokens``."""
        text = json.dumps(body.get("messages") or body.get("prompt") or "")
        return len(text) // 4 + int(body.get("max_tokens") or 0)

    def _post(self, path: str, body: dict) -> dict:
        import httpx

        url, last, attempt, waited = self.url + path, "", 0, 0.0
        while True:
            pause = self.limiter.acquire(self._estimate_tokens(body))
            if pause:
                self._sleep(pause)
            with self._lock:
                self.sent += 1
                self.round_sent += 1
            attempt += 1
            retry_after = None
            try:
                r = self._client.post(url, json=body)
            except (httpx.HTTPError, httpx.StreamError, OSError) as e:  # refused, reset, timed out
                last = f"{type(e).__name__}: {e}"
            else:
                if r.status_code == 200:
                    try:
                        answer = r.json()
                    except ValueError:
                        raise ServedError(f"{self.name}: {url} answered 200 with a body that is not JSON: "
                                          f"{r.text[:300]!r}") from None
                    usage = answer.get("usage") if isinstance(answer, dict) else None
                    with self._lock:
                        self.usage["requests"] += 1
                        for k in ("prompt_tokens", "completion_tokens"):
                            self.usage[k] += int((usage or {}).get(k) or 0)
                    return answer
                last = f"HTTP {r.status_code}: {r.text[:300]}"
                if r.status_code not in RETRY_STATUS:
                    break
                retry_after = retry_after_seconds(r.headers.get("Retry-After"))
            if attempt > self.max_retries:
                break
            # the server's Retry-After, else exponential backoff with full jitter
            delay = retry_after if retry_after is not None else self._jitter.uniform(0, self.backoff * 2 ** (attempt - 1))
            delay = min(delay, MAX_BACKOFF_S)
            if waited + delay > self.retry_budget_s:
                last += f" (retry_budget_s={self.retry_budget_s:g} spent)"
                break
            self._sleep(delay)
            waited += delay
        raise ServedError(f"{self.name}: {url} failed after {attempt} attempt(s) and {waited:.1f} s of waits: {last}")
