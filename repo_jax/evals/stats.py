"""Estimators of the evaluation programs: pass@k and win rates with confidence intervals.

* ``pass_at_k(n, c, k)``: the unbiased estimator of Chen et al. (2021), "Evaluating Large
  Language Models Trained on Code": with ``n`` samples of a prompt of which ``c`` are correct,
  ``1 - C(n - c, k) / C(n, k)``, the probability that ``k`` of the ``n`` samples drawn without
  replacement contain a correct one. Averaged over prompts.
* ``win_rate(scores_P)``: the mean per-prompt score (1 win, 1/2 tie, 0 loss, or a panel's
  weighted vote share) with a 95% interval, Wilson's score interval on ``n = P`` or a
  percentile bootstrap over prompts.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

Z95 = 1.959963984540054  # the standard normal's 97.5% quantile


def pass_at_k(n: int, c: int, k: int) -> float:
    """``1 - C(n - c, k) / C(n, k)`` for one prompt (``k <= n``), as a stable product."""
    if not 0 <= c <= n:
        raise ValueError(f"pass_at_k: need 0 <= c <= n, got c={c}, n={n}")
    if not 1 <= k <= n:
        raise ValueError(f"pass_at_k: need 1 <= k <= n, got k={k}, n={n}")
    if n - c < k:
        return 1.0
    # C(n-c, k) / C(n, k) = prod_{i = n-c+1}^{n} (1 - k / i)
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def mean_pass_at_k(counts: Sequence[tuple[int, int]], k: int) -> float:
    """Mean of :func:`pass_at_k` over prompts given as ``(n, c)`` pairs."""
    if not counts:
        raise ValueError("mean_pass_at_k: no prompts")
    return float(np.mean([pass_at_k(n, c, k) for n, c in counts]))


def wilson_interval(mean: float, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson's score interval for a proportion ``mean`` observed over ``n`` trials."""
    if n <= 0:
        raise ValueError("wilson_interval: n must be positive")
    centre = (mean + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(mean * (1 - mean) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def bootstrap_interval(scores_P: Sequence[float], *, resamples: int = 10_000, seed: int = 0,
                       level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``scores_P`` (prompts resampled with replacement)."""
    x = np.asarray(scores_P, np.float64)
    idx = np.random.default_rng(seed).integers(0, len(x), size=(resamples, len(x)))
    means = x[idx].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def win_rate(scores_P: Sequence[float], *, method: str = "wilson", seed: int = 0) -> dict[str, float]:
    """``{"win_rate", "low", "high", "wins", "ties", "losses", "prompts"}`` of per-prompt scores
    in ``[0, 1]`` (a score above 1/2 counts as a win, exactly 1/2 as a tie)."""
    x = np.asarray(scores_P, np.float64)
    if x.ndim != 1 or not len(x):
        raise ValueError("win_rate: need a non-empty 1-D array of per-prompt scores")
    if np.any((x < 0) | (x > 1)) or not np.all(np.isfinite(x)):
        raise ValueError("win_rate: per-prompt scores must lie in [0, 1]")
    mean = float(x.mean())
    if method == "wilson":
        lo, hi = wilson_interval(mean, len(x))
    elif method == "bootstrap":
        lo, hi = bootstrap_interval(x, seed=seed)
    else:
        raise ValueError(f"win_rate: unknown interval method {method!r} (wilson | bootstrap)")
    return {"win_rate": mean, "low": lo, "high": hi, "wins": int(np.sum(x > 0.5)), "ties": int(np.sum(x == 0.5)),
            "losses": int(np.sum(x < 0.5)), "prompts": len(x)}
