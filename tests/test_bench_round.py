"""``python -m repo_jax.bench round``: what TRL is given matches what our loop uses (no torch needed)."""

import pytest

from repo_jax.benchmarks import round as bench_round
from repo_jax.tasks import get_task


def test_trl_reward_is_the_task_reward_in_both_prompt_forms():
    task = get_task("arithmetic")
    problem = task.problems("train")[0]
    replies = [f"The total is {problem.answer}. Answer: {problem.answer}", f"Answer: {problem.answer + 1}",
               "  I am not sure.\n", f"\n{problem.answer}\n"]
    expected = [task.reward(problem.prompt, r.strip()) for r in replies]
    reward = bench_round.TaskReward(task)
    assert reward([problem.prompt] * 4, replies) == pytest.approx(expected)
    convs = [[{"role": "user", "content": problem.prompt}]] * 4
    completions = [[{"role": "assistant", "content": r}] for r in replies]
    assert reward(convs, completions, problem=["unused"] * 4) == pytest.approx(expected)
    assert expected[0] == pytest.approx(max(expected)) and expected[1] < expected[0]


def test_our_config_is_the_compared_round():
    args = bench_round.parse_args(["--prompts", "16", "--batch", "4", "--new-tokens", "32"])
    cfg = bench_round.our_config(args, "/tmp/unused")
    assert (cfg.loop.num_responses, cfg.loop.prompts_per_round, cfg.loop.epochs) == (2, 16, 1)
    assert [(s.kind, s.name) for s in cfg.annotate.panel] == [("rule", "reward")]
    assert (cfg.sample.max_new_tokens, cfg.train.batch_size, cfg.train.num_responses) == (32, 4, 2)
    assert cfg.train.seq_len == cfg.data.max_prompt_len + 2 * 32 and cfg.data.max_prompt_len >= 72  # one shared row per pair
    assert cfg.task == "arithmetic" and cfg.train.loss.name == "irepo" and cfg.sample.temperature == 0.5
    assert cfg.annotate.pseudo_count == 0.5  # the default config's
    race = bench_round.our_config(args, "/tmp/unused", race=True)  # D and pseudo-count from the race's flags
    assert (race.loop.num_responses, race.annotate.pseudo_count, race.train.num_responses) == (4, 0.05, 2)
    assert race.loop.pairs == "best_vs_worst" and race.train.seq_len == cfg.train.seq_len


def test_parser_wants_whole_updates():
    with pytest.raises(SystemExit):
        bench_round.parse_args(["--prompts", "10", "--batch", "4"])
    assert bench_round.parse_args([]).race_minutes == 10


def test_race_stops_at_the_nearest_boundary():
    assert not bench_round.should_stop(elapsed=49, last=20, budget=60)  # the next would end 9 s past: run it
    assert bench_round.should_stop(elapsed=51, last=20, budget=60)  # 11 s past: closer to stop now
    assert bench_round.should_stop(elapsed=61, last=0, budget=60)
