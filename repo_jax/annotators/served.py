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
import re
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from repo_jax.annotators.base import PairwiseAnnotator, ScoreAnnotator
from repo_jax.annotators.judge import DEFAULT_TEMPLATE

RETRY_STATUS = frozenset({408, 409, 425, 429, 500, 502, 503, 504})
SCORE_TEMPLATE = (
    "Rate how well the response answers the question, from {low} (useless) to {high} (perfect).\n\n"
    "Question: {question}\n\nResponse: {response}\n\nReply with the number only."
)


class ServedError(RuntimeError):
    """A served annotator could not get a usable answer (after its retries)."""


class Endpoint:
    """The HTTP side of one served annotator: cache, concurrency, retries and budget."""

    def __init__(self, *, name: str, base_url: str, model: str, api_key_env: str = "", timeout: float = 60.0,
                 max_retries: int = 4, backoff: float = 0.5, max_concurrency: int = 4, max_requests: int = 0,
                 cache_path: str | Path | None = None, show_progress: bool = False):
        import httpx

        if not base_url:
            raise ValueError(f"{name}: base_url is empty (e.g. http://127.0.0.1:8000/v1)")
        key = os.environ.get(api_key_env) if api_key_env else None
        if api_key_env and not key:
            raise ValueError(f"{name}: the environment variable {api_key_env} (api_key_env) is not set")
        self.name, self.url, self.model = name, base_url.rstrip("/"), model
        self.show_progress = show_progress
        self.max_retries, self.backoff = int(max_retries), float(backoff)
        self.max_concurrency, self.max_requests = max(1, int(max_concurrency)), int(max_requests)
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self._client = httpx.Client(headers=headers, timeout=timeout,
                                    limits=httpx.Limits(max_connections=self.max_concurrency))
        self._lock = threading.Lock()
        self.cache_path = Path(cache_path) if cache_path else None
        self.cache: dict[str, dict] = {}
        if self.cache_path is not None and self.cache_path.is_file():
            for line in self.cache_path.read_text().splitlines():
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError:  # a line cut by a kill: asked again
                    continue
                self.cache[entry["key"]] = entry["answer"]
        self.sent = 0          # HTTP requests made (retries included), for tests and the benchmark
        self.round_sent = 0    # requests since the last reset (the per-round budget)

    def key(self, path: str, body: dict) -> str:
        return hashlib.sha256(json.dumps({"model": self.model, "path": path, "body": body}, sort_keys=True)
                              .encode()).hexdigest()

    def reset(self) -> None:
        self.round_sent = 0

    def post_many(self, path: str, bodies: Sequence[dict]) -> list[dict]:
        """The answers (response JSON) to ``bodies`` posted to ``base_url + path``, cached ones
        from the cache; new ones ``max_concurrency`` at a time, with a progress bar (requests/s)
        when ``show_progress``. Raises :class:`ServedError` after every request settled, with
        the answers received so far cached."""
        from repo_jax import reporting

        keys = [self.key(path, {**b, "model": self.model}) for b in bodies]
        todo = {k: {**b, "model": self.model} for k, b in zip(keys, bodies) if k not in self.cache}
        if self.max_requests and self.round_sent + len(todo) > self.max_requests:
            raise ServedError(f"{self.name}: {len(todo)} new requests would pass the budget of {self.max_requests} "
                              f"per round ({self.round_sent} sent); raise max_requests")
        errors: list[str] = []
        if todo:
            bar = reporting.progress(total=len(todo), desc=f"{self.name}: requests", unit="req",
                                     enabled=self.show_progress)
            with ThreadPoolExecutor(self.max_concurrency) as pool:
                futures = {k: pool.submit(self._post, path, body) for k, body in todo.items()}
                for k, fut in futures.items():
                    try:
                        answer = fut.result()
                    except ServedError as e:
                        errors.append(str(e))
                        continue
                    self._store(k, answer)
                    bar.update(1)
            bar.close()
        if errors:
            more = f" (and {len(errors) - 1} more failed requests)" if len(errors) > 1 else ""
            raise ServedError(errors[0] + more)
        return [self.cache[k] for k in keys]

    def _store(self, key: str, answer: dict) -> None:
        with self._lock:
            self.cache[key] = answer
            if self.cache_path is not None:
                self.cache_path.parent.mkdir(parents=True, exist_ok=True)
                with self.cache_path.open("a") as f:
                    f.write(json.dumps({"key": key, "answer": answer}) + "\n")
                    f.flush()
                    os.fsync(f.fileno())

    def _post(self, path: str, body: dict) -> dict:
        import httpx

        url, last = self.url + path, ""
        for attempt in range(self.max_retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            with self._lock:
                self.sent += 1
                self.round_sent += 1
            try:
                r = self._client.post(url, json=body)
            except httpx.HTTPError as e:  # refused, reset, timed out
                last = f"{type(e).__name__}: {e}"
                continue
            if r.status_code == 200:
                try:
                    return r.json()
                except ValueError:
                    raise ServedError(f"{self.name}: {url} answered 200 with a body that is not JSON: "
                                      f"{r.text[:300]!r}") from None
            last = f"HTTP {r.status_code}: {r.text[:300]}"
            if r.status_code not in RETRY_STATUS:
                break
        raise ServedError(f"{self.name}: {url} failed after {attempt + 1} attempt(s): {last}")


def first_top_logprobs(answer: dict, where: str) -> dict[str, float]:
    """``token -> logprob`` of the first generated position, from a chat (``logprobs.content``)
    or a completions (``logprobs.top_logprobs``) answer."""
    try:
        lp = answer["choices"][0].get("logprobs")
    except (KeyError, IndexError, TypeError):
        raise ServedError(f"{where}: the answer has no choices: {json.dumps(answer)[:300]}") from None
    if lp:
        content = lp.get("content")
        if content:
            return {t["token"]: float(t["logprob"]) for t in content[0].get("top_logprobs") or []}
        tops = lp.get("top_logprobs")
        if tops:
            return {k: float(v) for k, v in tops[0].items()}
    raise ServedError(f"{where}: the answer carries no top log-probs (does the server support "
                      f"logprobs / top_logprobs?): {json.dumps(answer)[:300]}")


def answer_text(answer: dict) -> str:
    choice = answer["choices"][0]
    return (choice.get("message") or {}).get("content") or choice.get("text") or ""


class _Served:
    """What both served kinds share: the endpoint, the request shape, and process 0 asking."""

    endpoint: Endpoint
    chat: bool

    def _body(self, text: str, max_tokens: int, top: int) -> dict:
        if self.chat:
            return {"messages": [{"role": "user", "content": text}], "max_tokens": max_tokens, "temperature": 0.0,
                    "logprobs": True, "top_logprobs": top}
        return {"prompt": text, "max_tokens": max_tokens, "temperature": 0.0, "logprobs": top}

    def _ask(self, texts: list[str], max_tokens: int, top: int) -> list[dict]:
        path = "/chat/completions" if self.chat else "/completions"
        return self.endpoint.post_many(path, [self._body(t, max_tokens, top) for t in texts])

    def _on_process_zero(self, fn, shape):
        import jax

        if jax.process_count() == 1:
            return fn()
        from jax.experimental import multihost_utils

        out = fn() if jax.process_index() == 0 else np.zeros(shape, np.float32)
        return np.asarray(multihost_utils.broadcast_one_to_all(np.asarray(out, np.float32)))


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

    def first_wins(self, prompts, first, second) -> np.ndarray:
        answers = self._ask([self.text(q, a, b) for q, a, b in zip(prompts, first, second)], 1, self.top)
        out = []
        for ans in answers:
            tops = first_top_logprobs(ans, f"{self.name} ({self.endpoint.url})")
            mass = [sum(math.exp(lp) for t, lp in tops.items() if t.strip() == v) for v in self.verdicts]
            if sum(mass) == 0.0:
                self.unreadable += 1
                out.append(0.5)
            else:
                out.append(mass[0] / sum(mass))
        return np.array(out, np.float64)

    def judge_pairs(self, prompts, first, second) -> np.ndarray:
        n = len(prompts)
        both = self.first_wins(list(prompts) * 2, list(first) + list(second), list(second) + list(first))
        return (both[:n] + 1.0 - both[n:]) / 2.0

    def __call__(self, prompts, responses):
        k = len(responses[0]) if responses else 0
        return self._on_process_zero(lambda: PairwiseAnnotator.__call__(self, prompts, responses), (len(prompts), k, k))

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

    def score_batch(self, prompts, responses):
        texts = [self.template.format(question=q, response=r[:self.max_response_chars], low=self.low, high=self.high)
                 for q, r in zip(prompts, responses)]
        where = f"{self.name} ({self.endpoint.url})"
        out = []
        for ans in self._ask(texts, 4, self.top):
            try:
                tops = first_top_logprobs(ans, where)
            except ServedError:
                tops = {}
            values = {int(t.strip()): lp for t, lp in tops.items() if t.strip().isdigit()}
            values = {v: lp for v, lp in values.items() if self.low <= v <= self.high}
            if values:
                w = {v: math.exp(lp) for v, lp in values.items()}
                out.append(sum(v * p for v, p in w.items()) / sum(w.values()))
                continue
            m = re.search(r"-?\d+(\.\d+)?", answer_text(ans))
            if m is None or not self.low <= float(m.group()) <= self.high:
                raise ServedError(f"{where}: no score in [{self.low}, {self.high}] in the answer "
                                  f"{answer_text(ans)[:200]!r} (and no score token among its top log-probs)")
            out.append(float(m.group()))
        return out

    def scores(self, prompts, responses):
        k = len(responses[0]) if responses else 0
        return self._on_process_zero(lambda: ScoreAnnotator.scores(self, prompts, responses), (len(prompts), k))

    def reset(self) -> None:
        super().reset()
        self.endpoint.reset()
