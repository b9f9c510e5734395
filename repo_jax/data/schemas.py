"""Adapters from public row schemas to one normalised example, and the checks on each row.

A normalised example is a plain dict (so that it stores in an Arrow-backed ``datasets.Dataset``):

* ``prompt``: the conversation before the response(s), a list of ``{role, content}`` messages;
* ``responses``: the response texts (0 for a prompt row, 2 for a pair, K for a list);
* ``scores``: one float per response, or empty when the source gives none;
* ``pref``: for pairs, the probability that ``responses[0]`` beats ``responses[1]`` (1.0 for
  chosen/rejected data), None otherwise.

Every adapter raises :class:`BadRow` with a short ``code`` (counted in the report) and a
sentence (written to ``rejects.jsonl``) instead of guessing, so that nothing is silently dropped.
"""

from __future__ import annotations

import math
import re
from typing import Any

SCHEMAS = ("prompt", "sft", "pairwise", "listwise", "ultrafeedback", "ultrafeedback_binarized", "hh_rlhf")


class BadRow(ValueError):
    """A row that cannot become an example; ``code`` names the kind of problem."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


def detect_schema(row: Any) -> str:
    """The schema of a row from its keys (see ``DataConfig.schema``)."""
    keys = set(row) if isinstance(row, dict) else set()
    if {"instruction", "completions"} <= keys:
        return "ultrafeedback"
    if "chosen" in keys or "rejected" in keys:
        return "pairwise" if "prompt" in keys else "hh_rlhf"
    if "response_a" in keys or "response_b" in keys:
        return "pairwise"
    if "responses" in keys:
        return "listwise"
    if "prompt" in keys and keys & {"response", "completion"}:
        return "sft"
    if "prompt" in keys or "messages" in keys:
        return "prompt"
    raise BadRow("unknown_schema", f"cannot tell the schema from the keys {sorted(keys)}; set data.schema")


def adapt(schema: str, row: Any) -> dict:
    """One raw row -> a normalised example (see the module docstring), or :class:`BadRow`."""
    if not isinstance(row, dict):
        raise BadRow("not_object", f"row is a JSON {type(row).__name__}, not an object")
    try:
        fn = _ADAPTERS[schema]
    except KeyError:
        raise ValueError(f"unknown data.schema {schema!r}; valid: {', '.join(SCHEMAS)}") from None
    ex = fn(row)
    if not any(m["content"].strip() for m in ex["prompt"]):
        raise BadRow("empty_prompt", "empty prompt")
    return ex


# ----------------------------------------------------------------------------- field checks


def _get(row: dict, key: str) -> Any:
    if row.get(key) is None:
        raise BadRow("missing_field", f"missing field '{key}'")
    return row[key]


def _text(value: Any, key: str) -> str:
    if not isinstance(value, str):
        raise BadRow("bad_type", f"field '{key}' is a {type(value).__name__}, not a string")
    return value


def _messages(value: Any, key: str) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise BadRow("bad_type", f"field '{key}' is not a non-empty list of chat messages")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise BadRow("bad_type", f"field '{key}[{i}]' is not a chat message {{role, content}}")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def _prompt(value: Any, key: str) -> list[dict]:
    """A prompt string or message list; a trailing assistant message (a reference answer, as in
    ``messages`` of ultrafeedback_binarized) is not part of the prompt."""
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    msgs = _messages(value, key)
    return msgs[:-1] if msgs[-1]["role"] == "assistant" and len(msgs) > 1 else msgs


def _response(value: Any, key: str) -> tuple[list[dict] | None, str]:
    """A response string, or a conversation whose last message is the assistant's (returns the
    conversation before it, and its content)."""
    if isinstance(value, str):
        prefix, text = None, value
    else:
        msgs = _messages(value, key)
        if msgs[-1]["role"] != "assistant":
            raise BadRow("bad_type", f"the last message of '{key}' is from {msgs[-1]['role']!r}, not the assistant")
        prefix, text = msgs[:-1], msgs[-1]["content"]
    if not text.strip():
        raise BadRow("empty_response", f"empty response in '{key}'")
    return prefix, text


def _score(value: Any, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise BadRow("bad_score", f"score '{key}' is {value!r}, not a number")
    if not math.isfinite(value):
        raise BadRow("bad_score", f"non-finite score {value!r} in '{key}'")
    return float(value)


def _prob(value: Any, key: str) -> float:
    p = _score(value, key)
    if not 0.0 <= p <= 1.0:
        raise BadRow("bad_pref", f"probability '{key}' = {p} is outside [0, 1]")
    return p


def _example(prompt, responses, scores=(), pref=None) -> dict:
    return {"prompt": prompt, "responses": list(responses), "scores": list(scores), "pref": pref}


# ----------------------------------------------------------------------------- adapters


def _adapt_prompt(row: dict) -> dict:
    key = "prompt" if row.get("prompt") is not None else "messages"
    return _example(_prompt(_get(row, key), key), [])


def _adapt_sft(row: dict) -> dict:
    """One demonstration: ``prompt`` + ``response`` (or ``completion``, or the ``chosen`` of a
    preference row), or ``messages`` whose last message is the assistant's (the earlier turns are
    the prompt)."""
    if row.get("prompt") is None and row.get("messages") is not None:
        prefix, text = _response(row["messages"], "messages")
        if not prefix:
            raise BadRow("missing_field", "'messages' holds only the assistant's message: no prompt")
        return _example(prefix, [text])
    key = next((k for k in ("response", "completion", "chosen") if row.get(k) is not None), "response")
    prefix, text = _response(_get(row, key), key)
    return _example(prefix or _prompt(_get(row, "prompt"), "prompt"), [text])


def _pair_prompt(row: dict, prefixes: list) -> list[dict]:
    """The conversation of a pair: the one the responses continue, else the ``prompt`` field."""
    given = [p for p in prefixes if p]
    if given:
        if any(p != given[0] for p in given):
            raise BadRow("inconsistent", "the two responses continue different conversations")
        return given[0]
    return _prompt(_get(row, "prompt"), "prompt")


def _adapt_pairwise(row: dict, *, need_scores: bool = False) -> dict:
    if "chosen" in row or "rejected" in row or "response_a" not in row:
        (pa, a), (pb, b) = _response(_get(row, "chosen"), "chosen"), _response(_get(row, "rejected"), "rejected")
        score_keys, pref = ("score_chosen", "score_rejected"), 1.0
    else:
        (pa, a), (pb, b) = _response(_get(row, "response_a"), "response_a"), _response(_get(row, "response_b"), "response_b")
        score_keys, pref = ("score_a", "score_b"), _prob(_get(row, "pref"), "pref")
    scores = []
    if need_scores or any(row.get(k) is not None for k in score_keys):
        scores = [_score(_get(row, k), k) for k in score_keys]
    return _example(_pair_prompt(row, [pa, pb]), [a, b], scores, pref)


def _check_list(responses: list) -> None:
    if len(responses) < 2:
        raise BadRow("too_few_responses", f"fewer than 2 responses ({len(responses)})")


def _adapt_listwise(row: dict) -> dict:
    prompt = _prompt(_get(row, "prompt"), "prompt")
    raw_r, raw_s = _get(row, "responses"), _get(row, "scores")
    if not isinstance(raw_r, list) or not isinstance(raw_s, list):
        raise BadRow("bad_type", "fields 'responses' and 'scores' must be lists")
    if len(raw_r) != len(raw_s):
        raise BadRow("bad_type", f"'responses' has {len(raw_r)} items but 'scores' has {len(raw_s)}")
    _check_list(raw_r)
    responses = [_response(r, f"responses[{i}]")[1] for i, r in enumerate(raw_r)]
    scores = [_score(s, f"scores[{i}]") for i, s in enumerate(raw_s)]
    return _example(prompt, responses, scores)


def _adapt_ultrafeedback(row: dict) -> dict:
    prompt = _prompt(_text(_get(row, "instruction"), "instruction"), "instruction")
    comps = _get(row, "completions")
    if not isinstance(comps, list):
        raise BadRow("bad_type", "field 'completions' is not a list")
    _check_list(comps)
    responses, scores = [], []
    for i, c in enumerate(comps):
        if not isinstance(c, dict):
            raise BadRow("bad_type", f"'completions[{i}]' is not an object")
        responses.append(_response(_text(_get(c, "response"), f"completions[{i}].response"), f"completions[{i}].response")[1])
        scores.append(_score(_get(c, "overall_score"), f"completions[{i}].overall_score"))
    return _example(prompt, responses, scores)


_TURN = re.compile(r"\n\n(Human|Assistant):[ ]?")
_ASSISTANT = "\n\nAssistant:"


def _adapt_hh(row: dict) -> dict:
    """HH-RLHF: whole transcripts; the prompt is their common prefix up to (and including) the
    last ``\\n\\nAssistant:`` they share, the responses are what follows it."""
    chosen, rejected = _text(_get(row, "chosen"), "chosen"), _text(_get(row, "rejected"), "rejected")
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    cut = chosen.rfind(_ASSISTANT, 0, n)
    if cut < 0:
        raise BadRow("inconsistent", "'chosen' and 'rejected' share no '\\n\\nAssistant:' turn")
    head = cut + len(_ASSISTANT)
    responses = []
    for key, text in (("chosen", chosen), ("rejected", rejected)):
        resp = text[head:].removeprefix(" ")
        if "\n\nHuman:" in resp:
            raise BadRow("inconsistent", "'chosen' and 'rejected' differ before their last assistant turn")
        if not resp.strip():
            raise BadRow("empty_response", f"empty response in '{key}'")
        responses.append(resp)
    parts = _TURN.split(chosen[:cut])
    msgs = [{"role": "user" if who == "Human" else "assistant", "content": text}
            for who, text in zip(parts[1::2], parts[2::2])]
    if not msgs:
        raise BadRow("empty_prompt", "empty prompt")
    if parts[0].strip():
        msgs[0]["content"] = parts[0].strip() + "\n\n" + msgs[0]["content"]
    return _example(msgs, responses, [], 1.0)


_ADAPTERS = {
    "prompt": _adapt_prompt,
    "sft": _adapt_sft,
    "pairwise": _adapt_pairwise,
    "ultrafeedback_binarized": lambda row: _adapt_pairwise(row, need_scores=True),
    "listwise": _adapt_listwise,
    "ultrafeedback": _adapt_ultrafeedback,
    "hh_rlhf": _adapt_hh,
}
