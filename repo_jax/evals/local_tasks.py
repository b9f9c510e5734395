"""LM Evaluation Harness tasks over the embedded arithmetic task's held-out problems.

``python -m repo_jax.evaluate lm-eval --tasks arithmetic_mc,arithmetic_gen`` writes them (a
JSON Lines file and two task YAMLs) into ``--out/lm_eval_tasks`` and includes that folder, so
the harness runs on this machine with no download:

* ``arithmetic_mc`` (``multiple_choice``, ``acc`` / ``acc_norm``): the problem, then
  ``Answer:``; choices the right number and three near misses (answer +- 1, answer + 10) in a
  fixed per-problem order;
* ``arithmetic_gen`` (``generate_until``, ``exact_match`` after taking the first number):
  greedy answer to the same text, cut at the first newline.

:func:`write_rolling` writes a perplexity task over given documents, laid out as lm-eval's
``wikitext`` (``loglikelihood_rolling``; ``word_perplexity``, ``byte_perplexity``,
``bits_per_byte``), for text that is on this machine.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

NAMES = ("arithmetic_mc", "arithmetic_gen")

_COMMON = """dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
"""
_YAML = {
    "arithmetic_mc": """task: arithmetic_mc
{common}output_type: multiple_choice
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - {{metric: acc, aggregation: mean, higher_is_better: true}}
  - {{metric: acc_norm, aggregation: mean, higher_is_better: true}}
""",
    "arithmetic_gen": """task: arithmetic_gen
{common}output_type: generate_until
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 32
filter_list:
  - name: first_number
    filter:
      - function: regex
        regex_pattern: "(-?[0-9]+)"
        group_select: 0
      - function: take_first
metric_list:
  - {{metric: exact_match, aggregation: mean, higher_is_better: true}}
""",
}


def rows(limit: int | None = None) -> list[dict]:
    """One row per held-out problem: ``question``, ``answer`` (text), ``choices`` and ``label``."""
    from repo_jax.tasks import get_task

    out = []
    for p in get_task("arithmetic").problems("eval")[:limit]:
        choices = [p.answer, p.answer + 1, p.answer - 1, p.answer + 10]
        order = list(range(4))
        random.Random(p.id).shuffle(order)
        out.append({"id": p.id, "question": p.prompt, "answer": str(p.answer),
                    "choices": [f" {choices[i]}" for i in order], "label": order.index(0)})
    return out


def write(folder: str | Path) -> Path:
    """Writes the data and both YAMLs into ``folder``; returns it (an lm-eval include path)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / "arithmetic_eval.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows()))
    common = _COMMON.format(data=data.resolve())
    for name, text in _YAML.items():
        (folder / f"{name}.yaml").write_text(text.format(common=common))
    return folder


_ROLLING_YAML = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: page
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
"""


def write_rolling(folder: str | Path, docs: list[str], name: str = "local_ppl") -> Path:
    """Writes ``docs`` (one ``page`` each) and a ``loglikelihood_rolling`` task ``name`` over them
    into ``folder``; returns the folder (an lm-eval include path)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / f"{name}.jsonl"
    data.write_text("".join(json.dumps({"page": d}) + "\n" for d in docs))
    (folder / f"{name}.yaml").write_text(_ROLLING_YAML.format(name=name, data=data.resolve()))
    return folder
