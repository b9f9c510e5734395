"""The ``Annotator`` protocol and the two ways annotators are built: from scores, or pairwise.

An annotator judges the ``K`` responses of each of ``P`` prompts and returns
``probs_PxKxK[p, i, j]`` = probability (or 0/1 vote) that response ``i`` beats ``j``, with
``P[i, j] + P[j, i] = 1`` off the diagonal and 0 on it. ``A`` annotators stacked give the
``[A, P, K, K]`` that :func:`repo_jax.preferences.counts_from_probs` sums into counts.

* :class:`ScoreAnnotator`: a scalar score per response (rules, reward models), turned into
  Bradley-Terry probabilities ``sigmoid((s_i - s_j) / temperature)`` (temperature 0 = hard
  votes, ties 1/2). Scores are cached by ``(prompt, response)``: each response scored once.
* :class:`PairwiseAnnotator`: judges a pair directly (an LLM judge, a simulated human). Judged
  pairs are cached by ``(prompt, response_i, response_j)``, and the reverse order is read from the
  same entry, so within a round the same pair is never judged twice; all new pairs of a call
  go to the judge in one batch. Two identical responses get 1/2 without being judged.

``reset()`` empties the cache; the host loop calls it at the start of every round.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import numpy as np

from repo_jax.preferences import bt_matrix


@runtime_checkable
class Annotator(Protocol):
    name: str

    def __call__(self, prompts: Sequence[str], responses: Sequence[Sequence[str]]) -> np.ndarray:
        """``probs_PxKxK`` (float32) for ``P`` prompts with ``K`` responses each."""
        ...

    def reset(self) -> None:
        """Forgets cached judgements (start of a round)."""
        ...


def check_responses(prompts: Sequence[str], responses: Sequence[Sequence[str]]) -> int:
    """``K``, after checking every prompt has the same number (>= 2) of responses."""
    if len(prompts) != len(responses):
        raise ValueError(f"got {len(prompts)} prompts but {len(responses)} response lists")
    ds = {len(r) for r in responses}
    if len(ds) != 1 or min(ds) < 2:
        raise ValueError(f"every prompt needs the same number K >= 2 of responses; got counts {sorted(ds)}")
    return ds.pop()


def bt_probs(scores_PxK: np.ndarray, temperature: float) -> np.ndarray:
    """``P[p, i, j] = sigmoid((s_i - s_j) / temperature)`` (:func:`repo_jax.preferences.bt_matrix`);
    temperature 0 gives hard votes (1 for the higher score, 1/2 for ties). Diagonal 0."""
    s = np.asarray(scores_PxK, np.float32)
    if temperature > 0:
        p = np.asarray(bt_matrix(s / np.float32(temperature)))
    else:
        diff = s[:, :, None] - s[:, None, :]
        p = np.where(diff > 0, 1.0, np.where(diff < 0, 0.0, 0.5))
    return (p * (1.0 - np.eye(s.shape[-1]))).astype(np.float32)


class ScoreAnnotator:
    """Base for annotators that score each response; subclasses implement :meth:`score_batch`."""

    name = "score"

    def __init__(self, *, temperature: float = 1.0, name: str | None = None):
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        self.temperature = float(temperature)
        self.name = name or self.name
        self._cache: dict[tuple[str, str], float] = {}
        self.scored = 0  # responses actually scored (not served from the cache), for tests/metrics

    def score_batch(self, prompts: Sequence[str], responses: Sequence[str]) -> Sequence[float]:
        """Scores of ``len(prompts)`` (prompt, response) items."""
        raise NotImplementedError

    def pending(self, prompts: Sequence[str], responses: Sequence[Sequence[str]]) -> list[tuple[str, str]]:
        """The distinct ``(prompt, response)`` items :meth:`scores` would score (not cached)."""
        return list(dict.fromkeys((p, r) for p, rs in zip(prompts, responses) for r in rs if (p, r) not in self._cache))

    def scores(self, prompts: Sequence[str], responses: Sequence[Sequence[str]]) -> np.ndarray:
        """``scores_PxK`` (float64), scoring each distinct ``(prompt, response)`` once."""
        todo = self.pending(prompts, responses)
        if todo:
            new = self.score_batch([p for p, _ in todo], [r for _, r in todo])
            self.scored += len(todo)
            self._cache.update(zip(todo, (float(x) for x in new)))
        return np.array([[self._cache[(p, r)] for r in rs] for p, rs in zip(prompts, responses)], np.float64)

    def __call__(self, prompts: Sequence[str], responses: Sequence[Sequence[str]]) -> np.ndarray:
        check_responses(prompts, responses)
        return bt_probs(self.scores(prompts, responses), self.temperature)

    def reset(self) -> None:
        self._cache.clear()


class PairwiseAnnotator:
    """Base for annotators that judge pairs; subclasses implement :meth:`judge_pairs`."""

    name = "pairwise"

    def __init__(self, *, name: str | None = None):
        self.name = name or self.name
        self._cache: dict[tuple[str, str, str], float] = {}
        self.judged = 0  # pairs actually sent to the judge, for tests/metrics

    def judge_pairs(self, prompts: Sequence[str], first: Sequence[str], second: Sequence[str]) -> Sequence[float]:
        """For each item, the probability (or 0/1 vote) that ``first`` beats ``second``."""
        raise NotImplementedError

    def _lookup(self, p: str, a: str, b: str) -> float | None:
        if a == b:
            return 0.5
        if (p, a, b) in self._cache:
            return self._cache[(p, a, b)]
        if (p, b, a) in self._cache:
            return 1.0 - self._cache[(p, b, a)]
        return None

    def pending(self, prompts: Sequence[str], responses: Sequence[Sequence[str]]) -> list[tuple[str, str, str]]:
        """The ``(prompt, first, second)`` pairs :meth:`__call__` would judge (not cached, in
        order, each unordered pair once)."""
        d = check_responses(prompts, responses)
        iu, ju = np.triu_indices(d, k=1)
        todo: dict[tuple[str, str, str], None] = {}
        for p, rs in zip(prompts, responses):
            for i, j in zip(iu, ju):
                if self._lookup(p, rs[i], rs[j]) is None and (p, rs[j], rs[i]) not in todo:
                    todo[(p, rs[i], rs[j])] = None
        return list(todo)

    def __call__(self, prompts: Sequence[str], responses: Sequence[Sequence[str]]) -> np.ndarray:
        d = check_responses(prompts, responses)
        iu, ju = np.triu_indices(d, k=1)
        keys = self.pending(prompts, responses)
        if keys:
            out = self.judge_pairs([k[0] for k in keys], [k[1] for k in keys], [k[2] for k in keys])
            self.judged += len(keys)
            self._cache.update(zip(keys, (float(x) for x in out)))
        probs = np.zeros((len(prompts), d, d), np.float32)
        for n, (p, rs) in enumerate(zip(prompts, responses)):
            for i, j in zip(iu, ju):
                pij = self._lookup(p, rs[i], rs[j])
                probs[n, i, j], probs[n, j, i] = pij, 1.0 - pij
        return probs

    def reset(self) -> None:
        self._cache.clear()
