"""Pairs from scored lists: the LPO paper's DPO baselines, built from the same lists LPO trains on.

A list is ``K`` responses with scores ``s``. Each mode returns ordered pairs ``(i, j)`` meaning
"response ``i`` (chosen) beats response ``j`` (rejected)", with ``s_i > s_j`` always; a pair whose
two scores are equal carries no label and is never built (ties are dropped and counted):

* ``best_vs_random``: the best response (the first of equal best scores) against one response
  drawn uniformly from those scoring strictly lower (UltraFeedback-binarized's recipe, as in
  Zephyr); a list whose responses all tie gives no pair.
* ``1vsO`` ("one vs others"): the best response against each other response, ``K - 1`` pairs
  less the ties with the best.
* ``pw`` ("pairwise"): every pair ``i != j`` with ``s_i > s_j``, ``K (K - 1) / 2`` less the ties.

The draw of ``best_vs_random`` comes from ``numpy.random.default_rng([seed, row])``: the same
pairs for the same data and seed, whatever the order the rows are read in.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

MODES = ("best_vs_random", "1vsO", "pw")


def build_pairs(scores: Sequence[float], mode: str, *, seed: int = 0, row: int = 0) -> tuple[list[tuple[int, int]], int]:
    """``(pairs, ties)``: the ordered pairs of one list and how many tied pairs the mode dropped."""
    s = [float(x) for x in scores]
    k = len(s)
    if mode not in MODES:
        raise ValueError(f"pairs.mode={mode!r} is not a pair mode; choose one of {', '.join(MODES)}")
    if mode == "pw":
        pairs = [(i, j) if s[i] > s[j] else (j, i) for i in range(k) for j in range(i + 1, k) if s[i] != s[j]]
        return pairs, k * (k - 1) // 2 - len(pairs)
    best = max(range(k), key=lambda i: (s[i], -i))
    lower = [j for j in range(k) if s[j] < s[best]]
    ties = k - 1 - len(lower)
    if mode == "1vsO":
        return [(best, j) for j in lower], ties
    if not lower:
        return [], 1
    j = lower[int(np.random.default_rng([seed, row]).integers(len(lower)))]
    return [(best, j)], 0


def pair_examples(examples: Sequence[dict], mode: str, *, seed: int = 0) -> tuple[list[dict], int]:
    """Normalised list examples -> normalised pair examples (``responses = [chosen, rejected]``,
    ``scores = [s_chosen, s_rejected]``, ``pref = 1``), each keeping its list's ``source`` and
    ``line`` and naming it in ``list_row``; also the number of ties dropped."""
    out, ties = [], 0
    for row, ex in enumerate(examples):
        pairs, t = build_pairs(ex["scores"], mode, seed=seed, row=row)
        ties += t
        for i, j in pairs:
            out.append({**ex, "responses": [ex["responses"][i], ex["responses"][j]],
                        "scores": [ex["scores"][i], ex["scores"][j]], "pref": 1.0, "list_row": row, "pair": [i, j]})
    return out, ties


def pair_index(scores_NxK: np.ndarray, mask_NxK: np.ndarray, mode: str, *, seed: int = 0) -> np.ndarray:
    """The pairs of every list as an int array ``[M, 3]`` of ``(list, chosen, rejected)`` (the
    held-out loss of a pair mode gathers them from the lists' log-ratios)."""
    rows = []
    for n in range(len(scores_NxK)):
        present = np.flatnonzero(mask_NxK[n])
        pairs, _ = build_pairs(scores_NxK[n, present], mode, seed=seed, row=n)
        rows += [(n, present[i], present[j]) for i, j in pairs]
    return np.asarray(rows, np.int32).reshape(-1, 3)
