"""The embedded arithmetic task: problems, committed data, reward, default panel."""

from __future__ import annotations

import ast
import operator
import os

import numpy as np
import pytest

from repo_jax import preferences
from repo_jax.data import DataConfig, load_examples
from repo_jax.tasks import arithmetic, data_path, get_task, make_data

_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}


def _calc(expr: str) -> float:
    def ev(node):
        if isinstance(node, ast.BinOp):
            return _OPS[type(node.op)](ev(node.left), ev(node.right))
        assert isinstance(node, ast.Constant)
        return node.value

    return ev(ast.parse(expr, mode="eval").body)


def test_generated_problems_are_correct_distinct_and_deterministic():
    probs = arithmetic.generate(300, seed=0)
    assert probs == arithmetic.generate(300, seed=0)
    assert len({p.prompt for p in probs}) == 300
    for p in probs:
        assert _calc(p.expression) == p.answer and p.answer >= 0
        assert p.prompt.endswith(arithmetic.INSTRUCTION)
    other = arithmetic.generate(50, seed=1, exclude={p.prompt for p in probs})
    assert not {p.prompt for p in other} & {p.prompt for p in probs}


def test_committed_data_is_what_make_data_writes(capsys):
    assert make_data.main(["--check"]) == 0, capsys.readouterr().err
    for name in make_data.build():
        assert os.path.getsize(data_path(name)) < 1_000_000
    task = get_task("arithmetic")
    train, evals = task.problems("train"), task.problems("eval")
    assert len(train) == make_data.N_TRAIN and len(evals) == make_data.N_EVAL
    assert not {p.prompt for p in train} & {p.prompt for p in evals}
    with pytest.raises(ValueError, match="unknown task"):
        get_task("chess")


def test_reward_on_hand_made_responses():
    task = get_task("arithmetic")
    p = task.problems("train")[0]
    a = p.answer
    assert task.reward(p.prompt, f"{p.expression} = {a}. Answer: {a}") == arithmetic.MAX_REWARD
    assert task.reward(p.prompt, f"{a}") == 1.25  # correct, no format, short
    assert task.reward(p.prompt, f"{p.expression} = {a + 1}. Answer: {a + 1}") == 0.5
    assert task.reward(p.prompt, "I don't know.") == 0.25
    assert task.reward(p.prompt, "blah " * 200 + f"Answer: {a}") == 1.25  # correct but far too long
    with pytest.raises(KeyError, match="not a problem"):
        task.reward("What is the capital of France?", "Paris")


def test_listwise_and_prompt_files_load_without_rejects():
    examples, report = load_examples(DataConfig(path=data_path("arithmetic_listwise.jsonl")), log=None)
    assert report.schemas == ("ultrafeedback",) and not report.rejects and len(examples) == make_data.N_LIST
    assert {len(e["responses"]) for e in examples} == {3, 4}
    task = get_task("arithmetic")
    for ex in examples[:20]:  # the stored scores are the task reward on the 1-10 scale
        prompt = ex["prompt"][0]["content"]
        for r, s in zip(ex["responses"], ex["scores"]):
            assert s == pytest.approx(1 + 9 * task.reward(prompt, r) / arithmetic.MAX_REWARD, abs=0.01)
    examples, report = load_examples(DataConfig(path=data_path("arithmetic_eval.jsonl")), log=None)
    assert report.schemas == ("prompt",) and not report.rejects and len(examples) == make_data.N_EVAL


def test_default_panel_prefers_correct_formatted_answers():
    task = get_task("arithmetic")
    probs = task.problems("eval")[:4]
    responses = [[f"{p.expression} = {p.answer}. Answer: {p.answer}", f"{p.answer + 2}", "No idea.", f"{p.answer}"]
                 for p in probs]
    panel = task.panel(num_simulated=5, seed=0)
    assert len(panel) == 8 and panel.names[:3] == ["rule/correct", "rule/format", "rule/length"]
    counts = panel.counts([p.prompt for p in probs], responses)
    off = 1 - np.eye(4)
    np.testing.assert_allclose((counts + counts.transpose(0, 2, 1)) * off, np.broadcast_to(8 * off, counts.shape),
                               atol=1e-5)
    w = np.asarray(preferences.zermelo(counts, pseudo_count=0.5))
    assert (w.argmax(-1) == 0).all()  # worked, correct and formatted wins
    assert (w[:, 3] > w[:, 1]).all() and (w[:, 3] > w[:, 2]).all()  # correct beats wrong and none
