"""Answers for external judges: MT-Bench (FastChat) multi-turn answers and AlpacaEval outputs.

* MT-Bench: FastChat's ``question.jsonl`` in (``question_id``, ``category``, ``turns``: the user
  messages), one JSON line per question out in FastChat's model-answer format::

      {"question_id", "answer_id", "model_id", "choices": [{"index": 0, "turns": [a1, a2, ...]}], "tstamp"}

  Turn ``i`` is generated from the chat-template rendering of ``q1, a1, ..., q_i`` (the model's
  own earlier answers), at FastChat's temperature for the question's category (greedy below
  1e-4, as FastChat's ``gen_model_answer`` does), so the file goes to FastChat's
  ``gen_judgment.py`` as is.
* AlpacaEval: a JSON list (or JSON Lines) of ``{"instruction", ...}`` in, a JSON list of
  ``{"instruction", "output", "generator"}`` out (other input fields such as ``dataset`` kept).

Generation batches every question of one turn and temperature together through
:func:`repo_jax.sampling.sample` (one compiled program per prompt-length bucket).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path

# FastChat's fastchat/llm_judge/common.py temperature_config (categories of MT-Bench's 80 questions).
MT_BENCH_TEMPERATURES = {
    "writing": 0.7, "roleplay": 0.7, "extraction": 0.0, "math": 0.0, "coding": 0.0, "reasoning": 0.0,
    "stem": 0.1, "humanities": 0.1, "arena-hard-200": 0.0,
}
DEFAULT_TEMPERATURE = 0.7  # FastChat's default for a category it does not list
ANSWER_FIELDS = ("question_id", "answer_id", "model_id", "choices", "tstamp")

# ``generate(conversations, temperature) -> answers``: conversations are lists of chat messages
# ending with a user turn.
Generate = Callable[[Sequence[list[dict]], float], list[str]]


def read_questions(path: str | Path) -> list[dict]:
    """MT-Bench questions, checked: each line needs ``question_id``, ``category`` and a non-empty
    list of string ``turns``; a bad line raises one error naming the file and line."""
    path = Path(path)
    out = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}, line {n}"
        try:
            q = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: not JSON ({e.msg})") from None
        for key in ("question_id", "category", "turns"):
            if key not in q:
                raise ValueError(f"{where}: question without {key!r} (FastChat's question.jsonl has "
                                 "question_id, category, turns)")
        if not q["turns"] or not all(isinstance(t, str) for t in q["turns"]):
            raise ValueError(f"{where}: 'turns' must be a non-empty list of strings")
        out.append(q)
    if not out:
        raise ValueError(f"{path}: no questions")
    return out


def temperature_of(category: str) -> float:
    return MT_BENCH_TEMPERATURES.get(category, DEFAULT_TEMPERATURE)


def answer_id(model_id: str, question_id) -> str:
    """A stable id (FastChat uses a random shortuuid; judges only need it to be unique)."""
    return hashlib.sha1(f"{model_id}/{question_id}".encode()).hexdigest()[:22]


def mt_bench_answers(questions: Sequence[dict], generate: Generate, *, model_id: str) -> list[dict]:
    """FastChat model answers: all questions' turn ``i`` generated together per temperature,
    each conditioned on the question's earlier turns and the model's own earlier answers."""
    answers: list[list[str]] = [[] for _ in questions]
    for turn in range(max(len(q["turns"]) for q in questions)):
        live = [i for i, q in enumerate(questions) if turn < len(q["turns"])]
        by_temp: dict[float, list[int]] = {}
        for i in live:
            by_temp.setdefault(temperature_of(questions[i]["category"]), []).append(i)
        for temp, idx in sorted(by_temp.items()):
            convs = [conversation(questions[i]["turns"][:turn + 1], answers[i]) for i in idx]
            for i, a in zip(idx, generate(convs, temp)):
                answers[i].append(a)
    now = time.time()
    return [{"question_id": q["question_id"], "answer_id": answer_id(model_id, q["question_id"]),
             "model_id": model_id, "choices": [{"index": 0, "turns": a}], "tstamp": now}
            for q, a in zip(questions, answers)]


def conversation(user_turns: Sequence[str], answers: Sequence[str]) -> list[dict]:
    """``user, assistant, user, ...``: the first ``len(answers)`` turns answered, the last one open."""
    msgs = []
    for i, u in enumerate(user_turns):
        msgs.append({"role": "user", "content": u})
        if i < min(len(answers), len(user_turns) - 1):
            msgs.append({"role": "assistant", "content": answers[i]})
    return msgs


def read_instructions(path: str | Path) -> list[dict]:
    """AlpacaEval inputs: a JSON list or JSON Lines of objects with an ``instruction`` string."""
    path = Path(path)
    text = path.read_text()
    try:
        rows = json.loads(text) if text.lstrip().startswith("[") else [json.loads(x) for x in text.splitlines() if x.strip()]
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not JSON or JSON Lines (line {e.lineno}: {e.msg})") from None
    for n, r in enumerate(rows):
        if not isinstance(r, dict) or not isinstance(r.get("instruction"), str):
            raise ValueError(f"{path}: row {n} has no 'instruction' string (AlpacaEval's input format)")
    if not rows:
        raise ValueError(f"{path}: no instructions")
    return rows


def alpaca_eval_outputs(rows: Sequence[dict], generate: Generate, *, generator: str,
                        temperature: float = 0.0) -> list[dict]:
    """AlpacaEval's model outputs: ``{"instruction", "output", "generator"}`` per input row."""
    outs = generate([[{"role": "user", "content": r["instruction"]}] for r in rows], temperature)
    return [{**r, "output": o, "generator": generator} for r, o in zip(rows, outs)]
