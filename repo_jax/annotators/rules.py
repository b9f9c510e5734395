"""Rule annotators: verifiable scorers turned into pairwise preferences.

A *scorer* is any ``(prompt, response) -> float``; the ones here check something verifiable:
the numeric answer (:class:`ExactNumber`), a regex/format constraint (:class:`RegexMatch`), a
length budget (:class:`LengthBudget`), or a weighted sum of others (:class:`Weighted`).
:class:`RuleAnnotator` wraps one as an :class:`~repo_jax.annotators.base.Annotator` with a
Bradley-Terry temperature, ``p_ij = sigmoid((s_i - s_j) / temperature)``: a small temperature is
a near-certain judge, a large one a hesitant judge; 0 gives hard votes.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Mapping, Sequence

from repo_jax.annotators.base import ScoreAnnotator
from repo_jax.annotators.custom import describe

Scorer = Callable[[str, str], float]

_NUMBER = re.compile(r"(?<![\w.])-?\d{1,3}(?:,\d{3})+(?:\.\d+)?(?![\d])|(?<![\w.])-?\d+(?:\.\d+)?")


def extract_number(text: str) -> float | None:
    """The last number in ``text`` (``-3``, ``1,200``, ``2.5``), or None. The *last* one, because
    a worked answer states its result at the end ("3 + 4 = 7, so the answer is 7")."""
    found = _NUMBER.findall(text)
    if not found:
        return None
    return float(found[-1].replace(",", ""))


@dataclasses.dataclass(frozen=True)
class ExactNumber:
    """1.0 when the last number of the response equals the reference answer of the prompt (within
    ``tol``), else 0.0. ``answers`` maps prompt text -> answer (or is a function of the prompt);
    a prompt with no reference is an error rather than a silent 0."""

    answers: Mapping[str, float] | Callable[[str], float]
    tol: float = 1e-6

    def __call__(self, prompt: str, response: str) -> float:
        ref = self.answers(prompt) if callable(self.answers) else self.answers.get(prompt)
        if ref is None:
            raise KeyError(f"no reference answer for the prompt {prompt[:80]!r}")
        got = extract_number(response)
        return float(got is not None and math.isclose(got, float(ref), rel_tol=0.0, abs_tol=self.tol))


@dataclasses.dataclass(frozen=True)
class RegexMatch:
    """``score_match`` when the response matches ``pattern`` (``re.search``), else ``score_miss``."""

    pattern: str
    score_match: float = 1.0
    score_miss: float = 0.0
    flags: int = 0

    def __call__(self, prompt: str, response: str) -> float:
        return self.score_match if re.search(self.pattern, response, self.flags) else self.score_miss


@dataclasses.dataclass(frozen=True)
class LengthBudget:
    """1.0 up to ``max_words`` words, then falling linearly to 0 at ``2 * max_words``: concise
    answers win, rambling ones lose gradually rather than all at once."""

    max_words: int

    def __call__(self, prompt: str, response: str) -> float:
        n = len(response.split())
        return float(min(1.0, max(0.0, 2.0 - n / self.max_words)))


@dataclasses.dataclass(frozen=True)
class Weighted:
    """``sum_k w_k * scorer_k(prompt, response)``."""

    terms: tuple[tuple[float, Scorer], ...]

    def __call__(self, prompt: str, response: str) -> float:
        return float(sum(w * s(prompt, response) for w, s in self.terms))


class _BadScore(ValueError):
    """A scorer returned something other than a finite number (the prompt and response it scored)."""

    def __init__(self, prompt: str, response: str, value: object):
        super().__init__(f"returned {value!r:.80} ({type(value).__name__})")
        self.prompt, self.response, self.value = prompt, response, value


class RuleAnnotator(ScoreAnnotator):
    """An annotator from a scorer: ``p_ij = sigmoid((s_i - s_j) / temperature)``.

    A score that is not a finite number (a string, None, NaN, inf) is a ``ValueError`` naming
    ``where`` (default: the annotator's name) and the index of the prompt (and response) in the
    call that scored it."""

    name = "rule"

    def __init__(self, scorer: Scorer, *, temperature: float = 0.25, name: str | None = None, where: str = ""):
        super().__init__(temperature=temperature, name=name)
        self.scorer, self.where = scorer, where

    def score_batch(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        return [self._score(p, r) for p, r in zip(prompts, responses)]

    def _score(self, prompt: str, response: str) -> float:
        value = self.scorer(prompt, response)
        try:
            x = float(value) if not isinstance(value, (str, bytes)) else math.nan
        except (TypeError, ValueError):
            x = math.nan
        if not math.isfinite(x):
            raise _BadScore(prompt, response, value)
        return x

    def scores(self, prompts: Sequence[str], responses: Sequence[Sequence[str]]):
        try:
            return super().scores(prompts, responses)
        except _BadScore as e:
            p, k = next((p, list(rs).index(e.response)) for p, (q, rs) in enumerate(zip(prompts, responses))
                        if q == e.prompt and e.response in rs)
            raise ValueError(f"{self.where or self.name}: the scorer {describe(self.scorer)} {e} for prompt {p} "
                             f"(response {k}); a scorer returns a finite number") from None
