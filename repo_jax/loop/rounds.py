"""One iREPO round's host-side phases: sample -> annotate -> Zermelo -> pairs -> batches.

ALGORITHMS.md, "One iteration t". Every phase is a function of plain data, so the runner
(:mod:`repo_jax.loop.runner`) can write a round to ``run_dir/rounds/round_{t:03d}.jsonl`` and a
resumed run can rebuild the same batches from that file instead of sampling again:

    prompts (token ids) --sample_responses--> D responses (token ids, text)
      --annotate--> judgements [H, P, D, D] --> weighted counts --zermelo--> strengths
      --select--> pairs + p_hat          (one JSON record per prompt: round_records)
      --train_items--> items --collate_batches--> train batches (shared-prefix rows or one row per
      response, length-bucketed; pref / scores)

Tokens go from the sampler to the train batch as ids: a response is exactly the sampled
tokens, up to and including EOS (or the ``max_new_tokens`` cut), never re-tokenised text.

Dimension letters: P prompts, D responses per prompt (``K`` in the batches), H annotators.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import jax
import numpy as np

from repo_jax import padding, preferences, sampling
from repo_jax.data.tokenize import collate_responses, collate_shared, shared_length
from repo_jax.loop.config import IrepoConfig
from repo_jax.training import objectives

# ------------------------------------------------------------------------------------ sample


def sample_responses(policy, prompts: Sequence[Sequence[int]], *, num_samples: int, max_new_tokens: int,
                     temperature: float, top_p: float | None, top_k: int | None, eos_id, pad_id: int, seed: int,
                     slots: int, mesh=None, progress: Callable = lambda x, **k: x) -> list[list[list[int]]]:
    """``num_samples`` responses per prompt, as token-id lists (stop token included).

    Every prompt goes to one sampler call with ``slots`` decode slots (``loop.sample_batch``):
    rows that finish make room for the prompts still queued (one progress tick). The result
    depends on the seed only, not on ``slots``.
    """
    return sample_with_logps(policy, prompts, num_samples=num_samples, max_new_tokens=max_new_tokens,
                             temperature=temperature, top_p=top_p, top_k=top_k, eos_id=eos_id, pad_id=pad_id,
                             seed=seed, slots=slots, mesh=mesh, progress=progress)[0]


def sample_with_logps(policy, prompts: Sequence[Sequence[int]], *, num_samples: int, max_new_tokens: int,
                      temperature: float | Sequence[float], top_p: float | None, top_k: int | None, eos_id, pad_id: int, seed: int,
                      slots: int, mesh=None, progress: Callable = lambda x, **k: x, row_offset: int = 0
                      ) -> tuple[list[list[list[int]]], list[list[float]]]:
    """:func:`sample_responses` and, per response, ``log policy(response | prompt)`` under the
    unmodified model (temperature 1, no filtering: the sampler's ``logps_BxS`` summed over the
    response's tokens), float64 sums of the float32 per-token values. ``row_offset``: see
    ``sampling.sample`` (a wave of a round's prompts)."""
    for _ in progress(range(1), total=1):
        res = sampling.sample(policy, list(prompts), max_new_tokens=max_new_tokens, temperature=temperature,
                              top_p=top_p, top_k=top_k, eos_id=eos_id, seed=seed, num_samples=num_samples,
                              pad_id=pad_id, mesh=mesh, slots=slots, row_offset=row_offset)
    rows = [row[:n].tolist() for row, n in zip(res.tokens_BxS, res.lengths_B)]
    sums = [float(np.sum(lp[:n], dtype=np.float64)) for lp, n in zip(res.logps_BxS, res.lengths_B)]
    return ([rows[i:i + num_samples] for i in range(0, len(rows), num_samples)],
            [sums[i:i + num_samples] for i in range(0, len(sums), num_samples)])


def waves(n: int, count: int) -> list[tuple[int, int]]:
    """``[a, b)`` ranges splitting ``n`` prompts into ``count`` (at most ``n``) nearly equal
    waves, in order."""
    count = max(1, min(int(count), n))
    bounds = [round(i * n / count) for i in range(count + 1)]
    return [(a, b) for a, b in zip(bounds, bounds[1:]) if b > a]


# ---------------------------------------------------------------------------------- annotate


_zermelo = jax.jit(preferences.zermelo, static_argnames=("iters", "return_log"))


def annotate(panel, prompts: Sequence[str], responses: Sequence[Sequence[str]], *, pseudo_count: float,
             progress=None) -> dict[str, np.ndarray]:
    """The panel's judgements, weighted counts and Zermelo strengths of one round.

    Returns ``probs_AxPxKxK`` (each member's P(i beats j)), ``counts_PxKxK`` (``n_ij + n_ji`` =
    the panel's total weight) and ``strengths_PxK`` (geometric mean 1, ``pseudo_count`` added
    to every count before the fit).
    """
    panel.reset()
    probs = panel.probs(prompts, responses, progress=progress)
    counts = panel.counts_from(probs)
    strengths = np.asarray(_zermelo(counts, pseudo_count=pseudo_count), np.float64)
    return {"probs_AxPxKxK": probs, "counts_PxKxK": counts, "strengths_PxK": strengths}


def select(strengths_PxK: np.ndarray, mode: str) -> list[list[dict]]:
    """Per prompt, the pairs to train on: ``[{"a": i, "b": j, "p_hat": w_i / (w_i + w_j)}]``
    (``best_vs_worst``: strongest vs weakest; ``all_pairs``: every ``i < j``)."""
    a, b, p = (np.asarray(x) for x in preferences.select_pairs(strengths_PxK, mode))
    if a.ndim == 1:
        a, b, p = a[:, None], b[:, None], p[:, None]
    return [[{"a": int(i), "b": int(j), "p_hat": float(q)} for i, j, q in zip(*row)] for row in zip(a, b, p)]


def round_records(round_index: int, prompt_texts: Sequence[str], prompt_ids: Sequence[Sequence[int]],
                  responses_ids: Sequence[Sequence[Sequence[int]]], responses_text: Sequence[Sequence[str]],
                  annotation: dict[str, np.ndarray], panel_names: Sequence[str], pairs: Sequence[Sequence[dict]],
                  eos_id, logps: Sequence[Sequence[float]] | None = None) -> list[dict]:
    """One JSON-ready record per prompt: what the round sampled, how the panel judged it, and
    which pairs (with ``p_hat``) the policy is taught. ``judgements[name][i][j]`` is that
    member's P(response i beats response j); with ``logps``, each response also carries
    ``logp``, its log-prob under the sampling policy (the round's reference)."""
    stops = set(np.atleast_1d(eos_id).tolist()) if eos_id is not None else set()
    probs = annotation["probs_AxPxKxK"]
    out = []
    for p, (text, ids) in enumerate(zip(prompt_texts, prompt_ids)):
        out.append({
            "round": round_index, "prompt_index": p, "prompt": text, "prompt_ids": list(map(int, ids)),
            "responses": [{"text": t, "token_ids": list(map(int, r)), "length": len(r),
                           "stopped": bool(r) and int(r[-1]) in stops,
                           **({} if logps is None else {"logp": float(logps[p][d])})}
                          for d, (t, r) in enumerate(zip(responses_text[p], responses_ids[p]))],
            "judgements": {name: np.round(probs[h, p], 6).tolist() for h, name in enumerate(panel_names)},
            "counts": annotation["counts_PxKxK"][p].tolist(),
            "strengths": annotation["strengths_PxK"][p].tolist(),
            "pairs": list(pairs[p]),
        })
    return out


# ------------------------------------------------------------------------------- train items


def list_scores(strengths_D: Sequence[float], kind: str) -> list[float]:
    """Scores of an online list: ``win_rate`` = 10 x mean ``p_hat`` against the others (0-10,
    UltraFeedback's scale), ``strength`` = the Zermelo strengths themselves."""
    w = np.asarray(strengths_D, np.float64)
    if kind == "strength":
        return w.tolist()
    p = w[:, None] / (w[:, None] + w[None, :])
    d = len(w)
    return (10.0 * (p.sum(1) - 0.5) / (d - 1)).tolist()


def train_items(records: Sequence[dict], cfg: IrepoConfig) -> tuple[list[dict], int]:
    """The round's training examples in ``collate_responses``'s item format, and how many
    selected pairs were dropped as ties.

    * ``irepo``, ``soft_dpo``: each selected pair ``(a, b)`` with ``pref = p_hat``;
    * ``dpo``, ``ipo`` (Iter-DPO / Iter-IPO): the pair oriented by the panel (the response with
      the higher strength first, i.e. ``p_hat > 1/2``); tied pairs (``p_hat = 1/2``) carry no
      hard label and are dropped;
    * listwise losses (``lpo``, ``lpo_abs``, ``infonca``): all D responses with
      :func:`list_scores`.
    """
    name = cfg.train.loss.name
    objective = objectives.get(name)
    items, ties = [], 0
    for rec in records:
        responses = [r["token_ids"] for r in rec["responses"]]
        logp = [r.get("logp") for r in rec["responses"]]
        base = {"prompt_ids": rec["prompt_ids"], "scores": [], "pref": None}
        if not objective.pairwise:
            items.append({**base, "response_ids": responses, "scores": list_scores(rec["strengths"], cfg.loop.list_scores),
                          "row": len(items), "ref_logps": logp})
            continue
        for pair in rec["pairs"]:
            a, b, p = pair["a"], pair["b"], pair["p_hat"]
            if "pref_B" not in objective.needs:  # hard label
                if p == 0.5:
                    ties += 1
                    continue
                a, b, p = (a, b, 1.0) if p > 0.5 else (b, a, 1.0)
            items.append({**base, "response_ids": [responses[a], responses[b]], "pref": p, "row": len(items),
                          "ref_logps": [logp[a], logp[b]]})
    return items, ties


def collate_batches(items: Sequence[dict], order: Sequence[int], *, batch_size: int, num_responses: int,
                    seq_len: int, pad_id: int, layout: str = "shared") -> list[dict[str, np.ndarray]]:
    """``items`` in ``order``, ``batch_size`` per batch (the last one filled with masked rows) in
    ``layout`` (``shared``: one row per example; ``rows``: one per response), each batch padded
    to the smallest rung of ``padding.ladder(seq_len)`` that holds its longest row: a handful of
    shapes, so a handful of compiled steps. A row longer than ``seq_len`` is an error naming it."""
    collate = collate_shared if layout == "shared" else collate_responses
    buckets = padding.ladder(seq_len)
    out = []
    for start in range(0, len(order), batch_size):
        chunk = [items[i] for i in order[start:start + batch_size]]
        for it in chunk:
            n = row_length(it, layout)
            if n > seq_len:
                raise ValueError(f"example {it['row']} needs a row of {n} tokens (train.layout={layout}), more than "
                                 f"train.seq_len={seq_len}; raise train.seq_len")
        out.append(collate(chunk, batch_size=batch_size, num_responses=num_responses, buckets=buckets, pad_id=pad_id))
    return out


def epoch_order(lengths: Sequence[int], batch_size: int, seed: int, *, group_by_length: bool) -> np.ndarray:
    """The order of one epoch's items, ``batch_size`` at a time: a seeded permutation; with
    ``group_by_length``, that permutation sorted by ``lengths`` (stable), cut into batches, the
    full batches in a seeded random order and a short one last. Depends on the seed only, so a
    resumed round rebuilds the same batches."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(lengths))
    if not group_by_length:
        return order
    order = order[np.argsort(np.asarray(lengths)[order], kind="stable")]
    full = len(order) // batch_size
    batches = [order[i * batch_size:(i + 1) * batch_size] for i in rng.permutation(full)]
    return np.concatenate([*batches, order[full * batch_size:]]).astype(np.int64)


def row_length(item: dict, layout: str) -> int:
    """Tokens of an item's longest row in ``layout``."""
    if layout == "shared":
        return shared_length(item)
    return len(item["prompt_ids"]) + max(map(len, item["response_ids"]))


def token_counts(batch: dict[str, np.ndarray]) -> tuple[int, int]:
    """``(real tokens, padded tokens)`` of a host batch in either layout (what the model runs)."""
    if "segment_ids_BxT" in batch:
        seg = batch["segment_ids_BxT"]
        return int((seg >= 0).sum()), int(seg.size)
    mask = batch["attention_mask_BxKxT"]
    return int(mask.sum()), int(mask.size)


def num_batches(num_items: int, batch_size: int) -> int:
    return math.ceil(num_items / batch_size)
