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
  expectation over the numbers the top log-probs of every position of the written number give
  (a tokenizer may split "10"), else the whole number parsed from the reply.

Every request goes through one :class:`~repo_jax.annotators.endpoint.Endpoint`:
``max_concurrency`` requests in flight (threads over one ``httpx.Client``), a timeout, retries
on 408 / 409 / 425 / 429 / 5xx and connection errors after the server's ``Retry-After`` or a
jittered exponential backoff (``max_retries``, ``retry_budget_s``), client-side requests- and
tokens-per-minute limits, a budget of requests per round, and a cache in
``run_dir/annotations/<name>-<hash>.jsonl`` keyed by the endpoint (URL, reported model id) and
the request body: each answer is checked by the annotator's reader, then appended (and fsynced)
as it arrives, so a resumed or re-run round, or one killed by ``kill -9`` mid-annotation, asks
nothing twice, and a malformed answer is never cached. After the retries a failure is one error
naming the annotator, the URL and the server's own message; the answers received before it stay
cached. :meth:`_Served.prefetch` asks what judging will ask (the loop calls it while sampling).

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

import json
import math
import re
from collections import Counter

import numpy as np

from repo_jax.annotators.base import PairwiseAnnotator, ScoreAnnotator
from repo_jax.annotators.endpoint import (  # noqa: F401 (the HTTP side, re-exported)
    Endpoint, RateLimiter, ServedError, cache_file, retry_after_seconds)
from repo_jax.annotators.judge import DEFAULT_TEMPLATE

SCORE_TEMPLATE = (
    "Rate how well the response answers the question, from {low} (useless) to {high} (perfect).\n\n"
    "Question: {question}\n\nResponse: {response}\n\nReply with the number only."
)


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
