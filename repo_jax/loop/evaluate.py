"""Held-out evaluation of a policy, every iteration (iteration 0 = the starting policy).

DESIGN.md's keys:

* ``eval/reward``   mean task reward of the greedy answers to the held-out prompts;
* ``eval/<metric>`` the task's own metrics of those answers (``eval/accuracy``, ``eval/format``);
* ``eval/length``   mean answer length in tokens (the stop token included);
* ``eval/win_rate`` the panel's preference of these answers over iteration 0's, ties 1/2: per
  prompt ``n(current > first) / (total weight)``, with the current answer shown first on even
  prompts and second on odd ones, so a judge's position bias cancels;
* ``eval/kl``       mean over ``eval.kl_samples`` responses per prompt, sampled at temperature 1
  from ``pi_t``, of ``log pi_t(y) - log pi_0(y)`` (an unbiased estimate of KL(pi_t || pi_0));
  0 at iteration 0. ``log pi_t`` is the sampler's own (the samples come from the same call as
  the greedy answers when ``eval.kl_samples`` is 1: one temperature per prompt), ``log pi_0`` a
  reference pass (``make_reference_logprobs``), each prompt's samples sharing its row
  (``train.layout=shared``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from repo_jax.loop.rounds import collate_batches, sample_responses


def greedy_answers(policy, prompt_ids, *, max_new_tokens: int, eos_id, pad_id: int, slots: int, mesh,
                   progress) -> list[list[int]]:
    rows = sample_responses(policy, prompt_ids, num_samples=1, max_new_tokens=max_new_tokens, temperature=0.0,
                            top_p=None, top_k=None, eos_id=eos_id, pad_id=pad_id, seed=0, slots=slots, mesh=mesh,
                            progress=progress)
    return [r[0] for r in rows]


def win_rate(panel, prompts: Sequence[str], current: Sequence[str], first: Sequence[str]) -> float:
    """Mean over prompts of the panel's weighted vote share for ``current`` over ``first``."""
    return float(np.mean(win_scores(panel, prompts, current, first)))


def win_scores(panel, prompts: Sequence[str], current: Sequence[str], first: Sequence[str]) -> np.ndarray:
    """Per prompt, the panel's weighted vote share for ``current`` over ``first`` (``[P]`` in
    ``[0, 1]``; 1/2 a tie), the current answer shown first on even prompts, second on odd ones."""
    flip = np.arange(len(prompts)) % 2 == 1
    pairs = [[b, a] if f else [a, b] for a, b, f in zip(current, first, flip)]
    panel.reset()
    counts = panel.counts_from(panel.probs(prompts, pairs))
    cur = np.where(flip, 1, 0)
    idx = np.arange(len(prompts))
    wins, losses = counts[idx, cur, 1 - cur], counts[idx, 1 - cur, cur]
    return wins / np.maximum(wins + losses, 1e-12)


def kl_estimate(ref_logprobs: Callable, weights_0, prompt_ids, samples, logps_t, *, batch_size: int,
                num_responses: int, seq_len: int, pad_id: int, to_device: Callable, to_host: Callable,
                layout: str = "shared") -> float:
    """``mean log pi_t(y) - log pi_0(y)`` over ``samples`` (a list of responses per entry of
    ``prompt_ids``; ``weights_0``: ``pi_0``'s ``(params, frozen)``, the reference program's
    first two arguments): ``logps_t`` (same nesting) are the sampler's own log-probs of them under
    ``pi_t`` (raw logits, temperature 1: equal to a forward pass up to float rounding), ``log
    pi_0`` comes from the reference program: in the ``shared`` layout each prompt's samples share
    its row (the prompt runs once); in ``rows`` the responses are packed ``num_responses`` rows to
    an example so the train shapes' reference program is reused."""
    if layout == "shared":
        items = [{"prompt_ids": list(p), "response_ids": [list(r) for r in s], "scores": [], "pref": None, "row": i}
                 for i, (p, s) in enumerate(zip(prompt_ids, samples))]
        k = max([len(s) for s in samples] or [1])
        batches = collate_batches(items, range(len(items)), batch_size=batch_size, num_responses=k, seq_len=seq_len,
                                  pad_id=pad_id, layout="shared")
    else:
        rows = [(p, r) for p, s in zip(prompt_ids, samples) for r in s]
        batches = pack_rows(rows, batch_size=batch_size, num_responses=num_responses, seq_len=seq_len, pad_id=pad_id)
    l0 = []
    for batch in batches:
        l0.append(to_host(ref_logprobs(*weights_0, to_device(batch)))[batch["list_mask_BxK"]])
    lt = np.array([x for row in logps_t for x in row], np.float64)
    return float(np.mean(lt - np.concatenate(l0))) if l0 else 0.0


def pack_rows(rows: Sequence[tuple[Sequence[int], Sequence[int]]], *, batch_size: int, num_responses: int,
              seq_len: int, pad_id: int) -> list[dict[str, np.ndarray]]:
    """``(prompt_ids, response_ids)`` rows, each with its own prompt, as ``[B, K, T]`` batches:
    rows collated one response per example, then ``B * K`` of them folded into ``B x K``."""
    b, k = batch_size, num_responses
    items = [{"prompt_ids": list(p), "response_ids": [list(r)], "scores": [], "pref": None, "row": i}
             for i, (p, r) in enumerate(rows)]
    out = []
    for flat in collate_batches(items, range(len(items)), batch_size=b * k, num_responses=1, seq_len=seq_len,
                                pad_id=pad_id, layout="rows"):
        batch = {name: x.reshape(b, k, *x.shape[2:]) for name, x in flat.items() if x.ndim >= 2}
        batch["example_mask_B"] = flat["example_mask_B"].reshape(b, k).any(axis=1)
        batch["list_mask_BxK"] = flat["list_mask_BxK"].reshape(b, k)
        out.append(batch)
    return out
