"""Annotators served by an inference engine over the OpenAI API (vLLM, SGLang, llama.cpp's
server, a hosted API): the panel's judges run on their own machines, not on the training devices.

* :class:`ServedJudge` (``served_judge``): a pairwise judge. Each pair is asked in both orders,
  as the in-process ``judge`` asks it, with ``max_tokens 1``, ``temperature 0`` and the top
  log-probs of the first position; ``p(A > B)`` is the probability mass of the verdict token A
  renormalised over A and B (tokens compared after stripping spaces, so ``" A"`` and ``"A"``
  both count). When neither verdict token is among the returned top log-probs the order counts
  as a tie (1/2) and :attr:`ServedJudge.unreadable` counts it. ``endpoint: chat`` sends the
  judge template as a user message (what hosted APIs accept); ``endpoint: completions`` with a
  ``tokenizer`` sends exactly the text the in-process judge feeds its model (the chat template
  applied and the ``Answer:`` prefix), so the two can be compared pair by pair.
* :class:`ServedScore` (``served_score``): a scalar score per response from a rubric; the
  expected value over the score tokens' top log-probs where the server returns them, else the
  number parsed from the reply.

Every request goes through one :class:`Endpoint`: ``max_concurrency`` requests in flight
(threads over one ``httpx.Client``), a timeout, retries with exponential backoff on 408 / 409 /
425 / 429 / 5xx and connection errors, a budget of requests per round, and a cache in
``run_dir/annotations/<name>.jsonl`` keyed by the model and the request body: each answer is
appended (and flushed) as it arrives, so a resumed or re-run round, or one killed by ``kill -9``
mid-annotation, asks nothing twice. After the retries a failure is one error naming the
annotator, the URL and the server's own message; the answers received before it stay cached.

The API key is read from the environment variable ``api_key_env`` names, sent in the
``Authorization`` header, and never written anywhere (the config holds the variable's name).

``httpx`` rather than the ``openai`` package: the client needs raw control of retries (the
``openai`` client retries on its own policy), of the error body (quoted in our error) and of
the two OpenAI response shapes of log-probs that servers return; ``httpx`` is one small
dependency with explicit timeouts and a thread-safe connection pool.

On several hosts only process 0 talks to the server; the judgements reach the other hosts by
``multihost_utils.broadcast_one_to_all`` (every host calls the panel in the same order), so a
server sees each request once per run.
"""

from __future__ import annotations

import hashlib
import json
import math
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

import numpy as np

from repo_jax.annotators.base import PairwiseAnnotator, ScoreAnnotator
from repo_jax.annotators.judge import DEFAULT_TEMPLATE

RETRY_STATUS = frozenset({408, 409, 425, 429, 500, 502, 503, 504})
MAX_BACKOFF_S = 60.0  # one wait between attempts never exceeds this (Retry-After included)
SCORE_TEMPLATE = (
    "Rate how well the response answers the question, from {low} (useless) to {high} (perfect).\n\n"
    "Question: {question}\n\nResponse: {response}\n\nReply with the number only."
)


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


def choice_of(answer: dict, where: str) -> dict:
    """The answer's first choice; a :class:`ServedError` naming ``where`` if it has none."""
    try:
        choice = answer["choices"][0]
    except (KeyError, IndexError, TypeError):
        choice = None
    if not isinstance(choice, dict):
        raise ServedError(f"{where}: the answer has no choices: {json.dumps(answer)[:300]}")
    return choice


def positions(answer: dict, where: str) -> list[tuple[str, dict[str, float]]]:
    """Per generated position: ``(token, {top token: logprob})``, from a chat
    (``logprobs.content``) or a completions (``logprobs.tokens`` / ``top_logprobs``) answer;
    ``[]`` when the answer carries no log-probs."""
    lp = choice_of(answer, where).get("logprobs") or {}
    content = lp.get("content")
    if content:
        return [(str(c.get("token", "")), {t["token"]: float(t["logprob"]) for t in c.get("top_logprobs") or []})
                for c in content]
    tops = lp.get("top_logprobs")
    if tops:
        tokens = lp.get("tokens") or [max(t, key=t.get) if t else "" for t in tops]
        return [(str(tok), {k: float(v) for k, v in (t or {}).items()}) for tok, t in zip(tokens, tops)]
    return []


def first_top_logprobs(answer: dict, where: str) -> dict[str, float]:
    """``token -> logprob`` of the first generated position (see :func:`positions`)."""
    pos = positions(answer, where)
    if pos and pos[0][1]:
        return pos[0][1]
    raise ServedError(f"{where}: the answer carries no top log-probs (does the server support "
                      f"logprobs / top_logprobs?): {json.dumps(answer)[:300]}")


def answer_text(answer: dict, where: str = "served answer") -> str:
    choice = choice_of(answer, where)
    return (choice.get("message") or {}).get("content") or choice.get("text") or ""


def number_distribution(pos: list[tuple[str, dict[str, float]]]) -> dict[str, float]:
    """The probability of each number the answer could have written, from the top log-probs of
    every position of the number it did write (a tokenizer may split "10" into "1", "0").

    Walking the written digits with ``P(prefix)``: a digit candidate other than the written one
    is taken as the number it spells (``P(prefix) x p``); the mass of the non-digit candidates
    ends the number at ``prefix``; the written digit extends the prefix. Keys are digit strings;
    the values sum to at most 1 (the top log-probs are a truncated distribution)."""
    out: dict[str, float] = {}
    start = next((i for i, (tok, _) in enumerate(pos) if tok.strip()), None)
    if start is None:
        return out
    prefix, mass = "", 1.0
    for tok, tops in pos[start:]:
        probs: dict[str, float] = {}
        for t, lp in tops.items():  # " 7" and "7" are the same digit
            probs[t.strip()] = probs.get(t.strip(), 0.0) + math.exp(lp)
        digit = {t: p for t, p in probs.items() if t.isdigit()}
        written = tok.strip()
        for t, p in digit.items():
            if t != written:
                out[prefix + t] = out.get(prefix + t, 0.0) + mass * p
        if prefix:
            out[prefix] = out.get(prefix, 0.0) + mass * max(0.0, 1.0 - sum(digit.values()))
        if not written.isdigit():
            return out
        mass *= probs.get(written, 0.0)
        prefix += written
    out[prefix] = out.get(prefix, 0.0) + mass  # the answer ended inside the number
    return out


STATUS_BYTES = 2048  # the failure message every host receives from process 0


class _Served:
    """What both served kinds share: the endpoint, the request shape, process 0 asking (every
    host failing together when it fails), the per-phase counters and :meth:`prefetch`."""

    endpoint: Endpoint
    chat: bool
    name: str

    def _body(self, text: str, max_tokens: int, top: int) -> dict:
        if self.chat:
            return {"messages": [{"role": "user", "content": text}], "max_tokens": max_tokens, "temperature": 0.0,
                    "logprobs": True, "top_logprobs": top}
        return {"prompt": text, "max_tokens": max_tokens, "temperature": 0.0, "logprobs": top}

    @property
    def where(self) -> str:
        return f"{self.name} ({self.endpoint.url})"

    def _ask(self, texts: list[str], max_tokens: int, top: int, parse) -> list:
        path = "/chat/completions" if self.chat else "/completions"
        return self.endpoint.post_many(path, [self._body(t, max_tokens, top) for t in texts], parse)

    def _on_process_zero(self, fn, shape):
        """``fn()`` on process 0, its result broadcast to every process. Process 0 first
        broadcasts its status: when ``fn`` failed there, every process raises the same
        :class:`ServedError` at once instead of waiting for a result that never comes."""
        import jax

        if jax.process_count() == 1:
            return fn()
        from jax.experimental import multihost_utils

        out, failure = np.zeros(shape, np.float32), None
        if jax.process_index() == 0:
            try:
                out = np.asarray(fn(), np.float32)
            except Exception as e:  # noqa: BLE001 - every host raises it below
                failure = e
        msg = (str(failure) if isinstance(failure, ServedError) else f"{self.where}: {type(failure).__name__}: "
               f"{failure}") if failure is not None else ""
        status = np.frombuffer(msg.encode()[:STATUS_BYTES].ljust(STATUS_BYTES, b"\0"), np.uint8)
        status = bytes(np.asarray(multihost_utils.broadcast_one_to_all(status), np.uint8)).rstrip(b"\0")
        if status:
            raise ServedError(status.decode(errors="replace")) from failure
        return np.asarray(multihost_utils.broadcast_one_to_all(out))

    def take_counts(self) -> dict[str, float]:
        """This member's counters since the last call (requests, cached answers, tokens, and
        the kind's own), for the phase's metrics."""
        return {k: float(v) for k, v in self.endpoint.take_usage().items()}

    def prefetch(self, prompts, responses) -> None:
        """Asks (and caches) what judging ``responses`` will ask, without judging: the host loop
        calls it from a thread while the sampler decodes the next prompts (process 0 only)."""
        raise NotImplementedError


class ServedJudge(_Served, PairwiseAnnotator):
    """``served_judge``: see the module doc. ``tokenizer`` (with ``endpoint='completions'``)
    builds the in-process judge's exact prompt text; ``verdicts`` are the two answer tokens."""

    name = "served_judge"

    def __init__(self, endpoint: Endpoint, *, chat: bool = True, tokenizer=None, template: str = DEFAULT_TEMPLATE,
                 verdicts: tuple[str, str] = ("A", "B"), top_logprobs: int = 10, max_response_chars: int = 2000,
                 max_response_tokens: int = 256, name: str | None = None):
        super().__init__(name=name or endpoint.name)
        self.max_response_tokens = int(max_response_tokens)
        self.endpoint, self.chat, self.tokenizer, self.template = endpoint, chat, tokenizer, template
        self.verdicts, self.top = tuple(v.strip() for v in verdicts), int(top_logprobs)
        self.max_response_chars = int(max_response_chars)
        self.unreadable = 0  # orders whose top log-probs held neither verdict (counted as ties)

    def text(self, question: str, response_a: str, response_b: str) -> str:
        cut = self._cut
        body = self.template.format(question=question, response_a=cut(response_a), response_b=cut(response_b))
        if self.chat or self.tokenizer is None:
            return body
        if getattr(self.tokenizer, "chat_template", None):  # as LLMJudge.prompt_ids builds it
            return self.tokenizer.apply_chat_template([{"role": "user", "content": body}], add_generation_prompt=True,
                                                      tokenize=False) + "Answer:"
        return body + "\n\nAnswer:"

    def _cut(self, text: str) -> str:
        """With a tokenizer, the in-process judge's cut (``max_response_tokens``); else characters."""
        if self.tokenizer is None:
            return text[:self.max_response_chars]
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        return text if len(ids) <= self.max_response_tokens else self.tokenizer.decode(ids[:self.max_response_tokens])

    def verdict(self, answer: dict) -> float | None:
        """``P(A)`` from one answer: the verdict tokens' mass renormalised over the two; None
        when neither is among the top log-probs (a tie). Raises :class:`ServedError` for an
        answer without choices or log-probs (then it is not cached)."""
        tops = first_top_logprobs(answer, self.where)
        mass = [sum(math.exp(lp) for t, lp in tops.items() if t.strip() == v) for v in self.verdicts]
        return mass[0] / sum(mass) if sum(mass) > 0 else None

    def _texts(self, prompts, first, second) -> list[str]:
        """Each pair in both orders: the first half shows ``first`` as A, the second as B."""
        return [self.text(q, a, b) for q, a, b in zip(list(prompts) * 2, list(first) + list(second),
                                                       list(second) + list(first))]

    def judge_pairs(self, prompts, first, second) -> np.ndarray:
        n = len(prompts)
        p = self._ask(self._texts(prompts, first, second), 1, self.top, self.verdict)
        self.unreadable += sum(x is None for x in p)
        both = np.array([0.5 if x is None else x for x in p], np.float64)
        return (both[:n] + 1.0 - both[n:]) / 2.0

    def __call__(self, prompts, responses):
        k = len(responses[0]) if responses else 0
        return self._on_process_zero(lambda: PairwiseAnnotator.__call__(self, prompts, responses), (len(prompts), k, k))

    def prefetch(self, prompts, responses) -> None:
        keys = self.pending(prompts, responses)
        if keys:
            self._ask(self._texts(*zip(*keys)), 1, self.top, self.verdict)

    def take_counts(self) -> dict[str, float]:
        out = {**super().take_counts(), "unreadable": float(self.unreadable)}
        self.unreadable = 0
        return out

    def reset(self) -> None:
        super().reset()
        self.endpoint.reset()


class ServedScore(_Served, ScoreAnnotator):
    """``served_score``: a score in ``[low, high]`` per response (see the module doc), turned
    into Bradley-Terry probabilities with ``temperature`` like every score annotator."""

    name = "served_score"

    def __init__(self, endpoint: Endpoint, *, chat: bool = True, template: str = SCORE_TEMPLATE, low: int = 1,
                 high: int = 10, top_logprobs: int = 20, temperature: float = 1.0, max_response_chars: int = 2000,
                 name: str | None = None):
        super().__init__(temperature=temperature, name=name or endpoint.name)
        self.endpoint, self.chat, self.template = endpoint, chat, template
        self.low, self.high, self.top = int(low), int(high), int(top_logprobs)
        self.max_response_chars = int(max_response_chars)
        self.max_tokens = max(len(str(self.low)), len(str(self.high))) + 3  # every digit of a split number
        self.read = Counter()  # scores read as an expectation over log-probs ("logprobs") or from the text

    def score(self, answer: dict) -> tuple[float, str]:
        """``(score, how)``: the expectation over the numbers in ``[low, high]`` that the
        log-probs of every position of the written number give (:func:`number_distribution`),
        else the whole number parsed from the text; a :class:`ServedError` when neither is in
        range (then the answer is not cached)."""
        dist = {int(k): p for k, p in number_distribution(positions(answer, self.where)).items()
                if self.low <= int(k) <= self.high}
        if sum(dist.values()) > 0:
            return sum(v * p for v, p in dist.items()) / sum(dist.values()), "logprobs"
        text = answer_text(answer, self.where)
        m = re.search(r"-?\d+(\.\d+)?", text)
        if m is None or not self.low <= float(m.group()) <= self.high:
            raise ServedError(f"{self.where}: no score in [{self.low}, {self.high}] in the answer "
                              f"{text[:200]!r} (and no score among its top log-probs)")
        return float(m.group()), "text"

    def score_batch(self, prompts, responses):
        texts = [self.template.format(question=q, response=r[:self.max_response_chars], low=self.low, high=self.high)
                 for q, r in zip(prompts, responses)]
        out = self._ask(texts, self.max_tokens, self.top, self.score)
        self.read.update(how for _, how in out)
        return [v for v, _ in out]

    def scores(self, prompts, responses):
        k = len(responses[0]) if responses else 0
        return self._on_process_zero(lambda: ScoreAnnotator.scores(self, prompts, responses), (len(prompts), k))

    def prefetch(self, prompts, responses) -> None:
        todo = self.pending(prompts, responses)
        if todo:
            texts = [self.template.format(question=q, response=r[:self.max_response_chars], low=self.low,
                                          high=self.high) for q, r in todo]
            self._ask(texts, self.max_tokens, self.top, self.score)

    def take_counts(self) -> dict[str, float]:
        out = {**super().take_counts(), **{f"read_from_{k}": float(v) for k, v in self.read.items()}}
        self.read.clear()
        return out

    def reset(self) -> None:
        super().reset()
        self.endpoint.reset()
