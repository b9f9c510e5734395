"""``python -m repo_jax.evaluate``: pass@k, win rates with intervals, MT-Bench / AlpacaEval files."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
import yaml

from repo_jax import evaluate
from repo_jax.evals import answers, stats

# ---------------------------------------------------------------------------------- estimators


def test_pass_at_k_closed_form_and_brute_force():
    assert stats.pass_at_k(5, 2, 1) == pytest.approx(0.4)
    assert stats.pass_at_k(5, 2, 2) == pytest.approx(1 - math.comb(3, 2) / math.comb(5, 2))  # 0.7
    assert stats.pass_at_k(5, 0, 3) == 0.0 and stats.pass_at_k(5, 3, 3) == 1.0  # n - c < k
    for n, c, k in [(6, 1, 2), (7, 3, 4), (8, 2, 5)]:  # P(some correct among k drawn without replacement)
        draws = list(itertools.combinations(range(n), k))
        hit = sum(any(i < c for i in d) for d in draws) / len(draws)
        assert stats.pass_at_k(n, c, k) == pytest.approx(hit)
    assert stats.mean_pass_at_k([(4, 1), (4, 4)], 1) == pytest.approx((0.25 + 1.0) / 2)
    with pytest.raises(ValueError, match="k <= n"):
        stats.pass_at_k(3, 1, 4)


def test_wilson_interval_known_values():
    lo, hi = stats.wilson_interval(0.7, 10)  # the textbook 7/10: [0.3968, 0.8922]
    assert (lo, hi) == pytest.approx((0.3968, 0.8922), abs=1e-4)
    lo, hi = stats.wilson_interval(0.6, 10)
    assert (lo, hi) == pytest.approx((0.3127, 0.8318), abs=1e-4)


def test_win_rate_counts_ties_as_half_and_bootstrap_agrees():
    scores = [1.0] * 50 + [0.5] * 20 + [0.0] * 30
    res = stats.win_rate(scores)
    assert res["win_rate"] == pytest.approx(0.6) and (res["wins"], res["ties"], res["losses"]) == (50, 20, 30)
    boot = stats.win_rate(scores, method="bootstrap")
    sd = np.std(scores) / math.sqrt(len(scores))
    assert boot["low"] == pytest.approx(0.6 - 1.96 * sd, abs=0.015) and boot["high"] == pytest.approx(0.6 + 1.96 * sd, abs=0.015)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        stats.win_rate([1.5])


# ------------------------------------------------------------------------------ win-rate program


def _write_run(tmp_path, prompts, current, baseline):
    from repo_jax import config as config_lib
    from repo_jax.irepo import default_config_path
    from repo_jax.loop.config import IrepoConfig

    cfg = config_lib.load(IrepoConfig, default_config_path(), ["annotate.panel=[{kind: rule, name: correct, temperature: 0}]"])
    (tmp_path / "eval").mkdir(parents=True)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config_lib.to_dict(cfg)))
    for it, answers_ in ((0, baseline), (2, current)):
        (tmp_path / "eval" / f"answers_{it:03d}.jsonl").write_text(
            "".join(json.dumps({"iteration": it, "prompt": p, "answer": a}) + "\n" for p, a in zip(prompts, answers_)))


def test_win_rate_of_a_run_with_a_rule_panel_on_known_pairs(tmp_path, capsys):
    from repo_jax.tasks import get_task

    task = get_task("arithmetic")
    prompts = task.prompts("eval")[:10]
    right = [f"Answer: {task.answer(p)}" for p in prompts]
    wrong = [f"Answer: {task.answer(p) + 1}" for p in prompts]
    current = right[:7] + wrong[7:]        # correct on 0-6
    baseline = wrong[:5] + right[5:]       # correct on 5-9: 5 wins, 2 ties, 3 losses
    _write_run(tmp_path / "run", prompts, current, baseline)
    out = tmp_path / "out"
    assert evaluate.main(["win-rate", "--run", str(tmp_path / "run"), "--out", str(out)]) == 0
    res = json.loads((out / "win_rate.json").read_text())
    assert res["iteration"] == 2 and res["against"] == 0 and res["panel"] == ["rule/correct"]
    assert res["win_rate"] == pytest.approx(0.6) and (res["wins"], res["ties"], res["losses"]) == (5, 2, 3)
    assert (res["low"], res["high"]) == pytest.approx((0.3127, 0.8318), abs=1e-4)
    assert "win rate" in capsys.readouterr().out


def test_win_rate_bad_inputs_give_one_clear_error(tmp_path, capsys):
    assert evaluate.main(["win-rate", "--out", str(tmp_path)]) == 2
    assert "needs --run" in capsys.readouterr().err
    (tmp_path / "run" / "eval").mkdir(parents=True)
    assert evaluate.main(["win-rate", "--run", str(tmp_path / "run"), "--out", str(tmp_path)]) == 2
    assert "config.yaml" in capsys.readouterr().err


# ---------------------------------------------------------------------------------- answer files


def test_mt_bench_answers_condition_each_turn_on_the_model_s_own_answers():
    questions = [{"question_id": 81, "category": "writing", "turns": ["Write a poem.", "Now shorter."]},
                 {"question_id": 101, "category": "math", "turns": ["What is 2+2?"]}]
    seen = []

    def generate(convs, temperature):
        seen.append((temperature, [list(c) for c in convs]))
        return [f"answer {len(c)} to {c[-1]['content']}" for c in convs]

    rows = answers.mt_bench_answers(questions, generate, model_id="m")
    assert [tuple(r) for r in rows] == [answers.ANSWER_FIELDS] * 2
    assert rows[0]["choices"] == [{"index": 0, "turns": ["answer 1 to Write a poem.", "answer 3 to Now shorter."]}]
    assert len(rows[1]["choices"][0]["turns"]) == 1
    temps = sorted({t for t, _ in seen})
    assert temps == [0.0, 0.7]  # FastChat: math greedy, writing 0.7
    second = [c for t, cs in seen for c in cs if len(c) == 3][0]
    assert [m["role"] for m in second] == ["user", "assistant", "user"]
    assert second[1]["content"] == "answer 1 to Write a poem."


def test_question_and_instruction_files_are_checked(tmp_path):
    bad = tmp_path / "q.jsonl"
    bad.write_text(json.dumps({"question_id": 1, "turns": ["x"]}) + "\n")
    with pytest.raises(ValueError, match=r"q.jsonl, line 1: question without 'category'"):
        answers.read_questions(bad)
    inst = tmp_path / "a.json"
    inst.write_text(json.dumps([{"instruction": "hi", "dataset": "d"}, {"output": "x"}]))
    with pytest.raises(ValueError, match="row 1 has no 'instruction'"):
        answers.read_instructions(inst)


@pytest.mark.slow
def test_mt_bench_and_alpaca_eval_programs_with_smollm2(tmp_path, tok):
    q = tmp_path / "question.jsonl"
    q.write_text("".join(json.dumps(x) + "\n" for x in [
        {"question_id": 1, "category": "math", "turns": ["What is 3+4?", "And times 2?"]},
        {"question_id": 2, "category": "writing", "turns": ["Name a colour."]}]))
    out = tmp_path / "out"
    assert evaluate.main(["mt-bench", "--model", "smollm2", "--questions", str(q), "--out", str(out),
                          "--max-new-tokens", "12"]) == 0
    rows = [json.loads(x) for x in (out / "model_answer" / "smollm2.jsonl").read_text().splitlines()]
    assert [r["question_id"] for r in rows] == [1, 2] and all(tuple(r) == answers.ANSWER_FIELDS for r in rows)
    assert [len(r["choices"][0]["turns"]) for r in rows] == [2, 1]
    assert all(isinstance(t, str) and t for r in rows for t in r["choices"][0]["turns"])
    inst = tmp_path / "inst.jsonl"
    inst.write_text(json.dumps({"instruction": "Say hello.", "dataset": "toy"}) + "\n")
    assert evaluate.main(["alpaca-eval", "--model", "smollm2", "--instructions", str(inst), "--out", str(out),
                          "--max-new-tokens", "8", "--generator", "g"]) == 0
    (row,) = json.loads((out / "alpaca_eval_g.json").read_text())
    assert set(row) == {"instruction", "output", "generator", "dataset"} and row["generator"] == "g" and row["output"]


@pytest.mark.slow
def test_pass_at_k_program_with_smollm2(tmp_path, tok):
    out = tmp_path / "out"
    assert evaluate.main(["pass-at-k", "--model", "smollm2", "--task", "arithmetic", "--n", "4", "--k", "1,2,4",
                          "--prompts", "4", "--max-new-tokens", "48", "--out", str(out)]) == 0
    res = json.loads((out / "pass_at_k.json").read_text())
    counts = [(4, c) for c in res["correct_per_prompt"]]
    assert len(counts) == 4 and res["pass@1"] == pytest.approx(res["mean_correct"])
    for k in (1, 2, 4):
        assert res[f"pass@{k}"] == pytest.approx(stats.mean_pass_at_k(counts, k))
    assert res["pass@1"] <= res["pass@2"] <= res["pass@4"]
    assert evaluate.main(["pass-at-k", "--model", "smollm2", "--n", "2", "--k", "4", "--out", str(out)]) == 2
