"""``python -m repo_jax.compare``: runs grouped by a config key, final/best with 95% intervals over seeds."""

from __future__ import annotations

import json
import math

import pytest
import yaml

from repo_jax import compare


def _run(path, loss, seed, rewards):
    path.mkdir(parents=True)
    (path / "config.yaml").write_text(yaml.safe_dump({"train": {"loss": {"name": loss}, "seed": seed}}))
    (path / "metrics.jsonl").write_text("".join(
        json.dumps({"iteration": i, "eval/reward": r, "eval/kl": 0.1 * i}) + "\n" for i, r in enumerate(rewards)))
    return str(path)


def test_groups_final_and_best_with_student_t_intervals(tmp_path, capsys):
    runs = [_run(tmp_path / f"irepo{s}", "irepo", s, [0.5, 0.6 + 0.1 * s, 0.55 + 0.1 * s]) for s in range(3)]
    runs += [_run(tmp_path / f"dpo{s}", "dpo", s, [0.5, 0.52, 0.5 + 0.01 * s]) for s in range(3)]
    out = tmp_path / "cmp" / "compare.png"
    assert compare.main([*runs, "--by", "loss.name", "--metrics", "eval/reward,eval/kl", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "irepo" in text and "dpo" in text
    rows = {(r["group"], r["metric"]): r for r in json.loads(out.with_suffix(".json").read_text())["rows"]}
    r = rows[("irepo", "eval/reward")]
    finals = [0.55, 0.65, 0.75]
    sd = math.sqrt(sum((x - 0.65) ** 2 for x in finals) / 2)
    assert r["runs"] == 3 and r["final_mean"] == pytest.approx(0.65)
    assert r["final_ci95"] == pytest.approx(4.303 * sd / math.sqrt(3))
    assert r["best"] == pytest.approx([0.6, 0.7, 0.8])  # the max over trained iterations
    assert rows[("dpo", "eval/kl")]["best_mean"] == pytest.approx(0.1)  # lower is better for KL
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_folder_that_is_not_a_run_is_one_clear_error(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert compare.main([str(tmp_path / "empty"), "--out", str(tmp_path / "c.png")]) == 2
    assert "has no config.yaml" in capsys.readouterr().err
    run = _run(tmp_path / "r", "irepo", 0, [0.5])
    assert compare.main([run, "--by", "train.nope", "--out", str(tmp_path / "c.png")]) == 2
    assert "no key 'train.nope'" in capsys.readouterr().err


def test_a_structured_key_is_labelled_by_the_fields_that_differ(tmp_path):
    runs = []
    for h in (1, 3):
        for s in range(2):
            path = tmp_path / f"h{h}_s{s}"
            path.mkdir()
            panel = [{"kind": "simulated", "count": h, "seed": 0, "temperature": 0.25}]
            (path / "config.yaml").write_text(yaml.safe_dump({"annotate": {"panel": panel}, "train": {"seed": s}}))
            (path / "metrics.jsonl").write_text(json.dumps({"iteration": 0, "eval/reward": 0.1 * h + s}) + "\n")
            runs.append(str(path))
    groups = compare.group_runs(runs, "annotate.panel")
    assert sorted(groups) == ["count=1", "count=3"] and all(len(v) == 2 for v in groups.values())
    both = compare.group_runs(runs, "annotate.panel,train.seed")
    assert sorted(both) == ["count=1/0", "count=1/1", "count=3/0", "count=3/1"]


def test_paired_differences_match_runs_by_seed_and_name_the_unpaired(tmp_path, capsys):
    # irepo's final reward is dpo's + 0.1, 0.2, 0.3 for seeds 0..2 (listed in another order);
    # dpo also has a seed-3 run with no partner
    runs = [_run(tmp_path / f"irepo{s}", "irepo", s, [0.5, 0.5 + 0.1 * (s + 1)]) for s in (2, 0, 1)]
    runs += [_run(tmp_path / f"dpo{s}", "dpo", s, [0.5, 0.5]) for s in range(4)]
    out = tmp_path / "c.png"
    assert compare.main([*runs, "--by", "loss.name", "--metrics", "eval/reward", "--paired", "irepo",
                         "--out", str(out)]) == 0
    text = capsys.readouterr().out
    row, = json.loads(out.with_suffix(".json").read_text())["paired"]
    assert (row["group"], row["pairs"]) == ("dpo", 3)
    assert sorted(row["final_diffs"]) == pytest.approx([0.1, 0.2, 0.3])
    assert row["final_mean"] == pytest.approx(0.2)
    assert row["final_ci95"] == pytest.approx(4.303 * 0.1 / math.sqrt(3))
    assert not row["final_separable"]  # 0.2 +- 0.248 includes 0
    assert "no partner" in text and "dpo3" in text
    # differences 0.19 / 0.20 / 0.21 are separable from 0
    tight = [_run(tmp_path / f"t_irepo{s}", "irepo", s, [0.5, 0.69 + 0.01 * s]) for s in range(3)]
    rows, unpaired = compare.paired(compare.group_runs(tight + runs[3:6], "loss.name"), ["eval/reward"], "irepo")
    assert rows[0]["final_separable"] and rows[0]["final_mean"] == pytest.approx(0.2) and unpaired == []
    assert compare.main([*runs, "--paired", "ipo", "--out", str(out)]) == 2  # not a group: one clear error
