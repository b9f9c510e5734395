"""Panels of ``A`` annotators, and a simulated noisy human panel.

:class:`Panel` asks each member for its ``[P, K, K]`` judgements and sums them with
:func:`repo_jax.preferences.counts_from_probs` into the counts ``n_ij`` (``n_ij + n_ji = A``)
that :func:`repo_jax.preferences.zermelo` fits.

:class:`SimulatedAnnotator` stands in for a human rater with a known latent reward ``r`` and a
personal bias: it votes ``i`` (shown first) over ``j`` with probability
``sigmoid(scale * (r_i - r_j) + bias)``, a Bradley-Terry judge with position bias. Its randomness
is a pure function of ``(seed, prompt, response_i, response_j)``, so a panel's votes do not depend
on call order or batching, and a run resumed from a checkpoint re-draws exactly the same votes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence

import numpy as np

from repo_jax.annotators.base import Annotator, PairwiseAnnotator


class AnnotatorError(RuntimeError):
    """An annotator of a panel failed; the message names it."""


class Panel:
    """``A`` annotators judging the same responses, each with a weight (default 1).

    With weights, ``counts[i, j] = sum_h weight_h * p_h(i > j)``, so ``n_ij + n_ji`` is the
    total weight (``A`` when unweighted).
    """

    def __init__(self, annotators: Sequence[Annotator], weights: Sequence[float] | None = None):
        if not annotators:
            raise ValueError("a panel needs at least one annotator")
        self.annotators = list(annotators)
        self.weights = np.ones(len(self.annotators), np.float32) if weights is None else np.asarray(weights, np.float32)
        if self.weights.shape != (len(self.annotators),) or (self.weights < 0).any():
            raise ValueError(f"a panel of {len(self.annotators)} annotators needs as many non-negative weights, "
                             f"got {list(self.weights)}")

    def __len__(self) -> int:
        return len(self.annotators)

    @property
    def names(self) -> list[str]:
        return [a.name for a in self.annotators]

    def probs(self, prompts: Sequence[str], responses: Sequence[Sequence[str]], *, progress=None) -> np.ndarray:
        """``[A, P, K, K]``: member ``a``'s probability (or vote) that ``i`` beats ``j``.

        ``progress`` (optional) wraps the list of members, e.g. a progress bar. A member that
        raises is reported as :class:`AnnotatorError` naming it.
        """
        out = []
        for a in (progress(self.annotators) if progress else self.annotators):
            try:
                out.append(np.asarray(a(prompts, responses), np.float32))
            except Exception as e:
                raise AnnotatorError(f"annotator {a.name!r} failed: {type(e).__name__}: {e}") from e
        return np.stack(out)

    def counts_from(self, probs_AxPxKxK: np.ndarray) -> np.ndarray:
        """Weighted counts ``[P, K, K]`` from :meth:`probs`."""
        from repo_jax.preferences import counts_from_probs

        return np.asarray(counts_from_probs(probs_AxPxKxK * self.weights[:, None, None, None]))

    def counts(self, prompts: Sequence[str], responses: Sequence[Sequence[str]]) -> np.ndarray:
        """``counts_PxKxK`` for :func:`repo_jax.preferences.zermelo`."""
        return self.counts_from(self.probs(prompts, responses))

    def reset(self) -> None:
        for a in self.annotators:
            a.reset()

    @property
    def offloaded(self) -> list:
        """The members that ask a server (they can work while the accelerator samples)."""
        return [a for a in self.annotators if hasattr(a, "prefetch")]

    def take_counts(self, phase: str) -> dict[str, float]:
        """``{phase}/{counter}/{member}``: what each served member asked, read from its cache,
        was charged (``usage`` tokens) and could not read, since the last call."""
        return {f"{phase}/{k}/{a.name}": v for a in self.offloaded for k, v in a.take_counts().items()}


def _uniform(*parts: object) -> float:
    """A uniform [0, 1) number determined by ``parts`` (stable across runs and processes)."""
    h = hashlib.blake2b("\x1f".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") / 2.0**64


class SimulatedAnnotator(PairwiseAnnotator):
    """A noisy rater with latent reward ``reward(prompt, response)`` and position ``bias``.

    Votes are hard (0/1) unless ``soft=True``, which returns the vote probability itself.
    """

    name = "simulated"

    def __init__(self, reward: Callable[[str, str], float], *, bias: float = 0.0, scale: float = 1.0, seed: int = 0,
                 soft: bool = False, name: str | None = None):
        super().__init__(name=name)
        self.reward, self.bias, self.scale, self.seed, self.soft = reward, float(bias), float(scale), int(seed), soft

    def judge_pairs(self, prompts: Sequence[str], first: Sequence[str], second: Sequence[str]) -> list[float]:
        out = []
        for p, a, b in zip(prompts, first, second):
            z = self.scale * (self.reward(p, a) - self.reward(p, b)) + self.bias
            prob = 1.0 / (1.0 + np.exp(-z))
            out.append(prob if self.soft else float(_uniform(self.seed, p, a, b) < prob))
        return out


def simulated_panel(reward: Callable[[str, str], float], num_annotators: int, *, bias_std: float = 0.5,
                    scale: float = 1.0, seed: int = 0, soft: bool = False) -> list[SimulatedAnnotator]:
    """``num_annotators`` simulated raters with biases drawn from ``N(0, bias_std^2)`` (seeded)."""
    biases = np.random.default_rng(seed).normal(0.0, bias_std, num_annotators)
    return [SimulatedAnnotator(reward, bias=float(b), scale=scale, seed=seed * 100_003 + k, soft=soft,
                               name=f"simulated{k}") for k, b in enumerate(biases)]
