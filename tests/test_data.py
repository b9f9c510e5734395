"""Data pipelines: schema adapters, validation and rejects, tokenisation masks, grain state."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from repo_jax import config as config_lib
from repo_jax.data import DataConfig, DataError, Formatter, adapt, detect_schema, load_examples, make_pipeline
from repo_jax.data import tokenize as tk


def _jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def _cfg(path, **kw):
    kw.setdefault("shard_index", 0)
    kw.setdefault("shard_count", 1)
    return DataConfig(path=str(path), **kw)


# ----------------------------------------------------------------------------- adapters

UF_ROW = {"instruction": "Name a colour.", "source": "x", "models": ["m1", "m2", "m3"],
          "completions": [{"model": "m1", "response": "Red.", "overall_score": 8.5, "critique": "ok"},
                          {"model": "m2", "response": "Blue is one.", "overall_score": 6},
                          {"model": "m3", "response": "Dog.", "overall_score": 1.0}]}
BIN_ROW = {"prompt": "Hi?", "prompt_id": "0",
           "chosen": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello!"}],
           "rejected": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Go away."}],
           "messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello!"}],
           "score_chosen": 9.0, "score_rejected": 2.0}
HH_ROW = {"chosen": "\n\nHuman: What is 2+2?\n\nAssistant: It is 4.\n\nHuman: Sure?\n\nAssistant: Yes, 4.",
          "rejected": "\n\nHuman: What is 2+2?\n\nAssistant: It is 4.\n\nHuman: Sure?\n\nAssistant: No, 5."}


def test_adapters_on_each_schema():
    assert adapt("prompt", {"prompt": "Q?"}) == {"prompt": [{"role": "user", "content": "Q?"}], "responses": [],
                                                 "scores": [], "pref": None}
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]
    assert adapt("prompt", {"messages": msgs})["prompt"] == msgs[:2]  # a trailing answer is not prompt

    ex = adapt("pairwise", {"prompt": "Q?", "chosen": "good", "rejected": "bad"})
    assert ex == {"prompt": [{"role": "user", "content": "Q?"}], "responses": ["good", "bad"], "scores": [], "pref": 1.0}
    ex = adapt("pairwise", {"prompt": "Q?", "response_a": "a", "response_b": "b", "pref": 0.25})
    assert ex["responses"] == ["a", "b"] and ex["pref"] == 0.25

    ex = adapt("ultrafeedback_binarized", BIN_ROW)
    assert ex == {"prompt": [{"role": "user", "content": "Hi?"}], "responses": ["Hello!", "Go away."],
                  "scores": [9.0, 2.0], "pref": 1.0}
    ex = adapt("listwise", {"prompt": "Q", "responses": ["a", "b", "c"], "scores": [1, 3, 2]})
    assert ex["responses"] == ["a", "b", "c"] and ex["scores"] == [1.0, 3.0, 2.0] and ex["pref"] is None
    ex = adapt("ultrafeedback", UF_ROW)
    assert ex["prompt"] == [{"role": "user", "content": "Name a colour."}]
    assert ex["responses"] == ["Red.", "Blue is one.", "Dog."] and ex["scores"] == [8.5, 6.0, 1.0]

    ex = adapt("hh_rlhf", HH_ROW)
    assert ex["prompt"] == [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "It is 4."},
                            {"role": "user", "content": "Sure?"}]
    assert ex["responses"] == ["Yes, 4.", "No, 5."] and ex["pref"] == 1.0


def test_detect_schema():
    assert detect_schema(UF_ROW) == "ultrafeedback"
    assert detect_schema(BIN_ROW) == "pairwise"
    assert detect_schema(HH_ROW) == "hh_rlhf"
    assert detect_schema({"prompt": "q", "response_a": "a", "response_b": "b", "pref": 0.5}) == "pairwise"
    assert detect_schema({"prompt": "q", "responses": [], "scores": []}) == "listwise"
    assert detect_schema({"messages": []}) == "prompt"


# ----------------------------------------------------------------------------- validation

GOOD = [
    {"prompt": "p1", "responses": ["a", "b"], "scores": [1, 2]},
    {"prompt": "p2", "responses": ["a", "b", "c"], "scores": [3, 2, 1]},
    {"prompt": "p3", "responses": ["x", "y", "z", "w"], "scores": [0, 0, 1, 2]},
]
BAD = [  # (raw line, expected code, a phrase of the reason)
    ("{not json", "invalid_json", "invalid JSON"),
    ('{"prompt": "q", "responses": ["a", "b"]}', "missing_field", "missing field 'scores'"),
    ('{"prompt": "q", "responses": ["a", "  "], "scores": [1, 2]}', "empty_response", "empty response"),
    ('{"prompt": "q", "responses": ["a", "b"], "scores": [1, NaN]}', "bad_score", "non-finite score"),
    ('{"prompt": "q", "responses": ["a"], "scores": [1]}', "too_few_responses", "fewer than 2 responses"),
    ('[1, 2]', "not_object", "not an object"),
    ('{"prompt": "' + "word " * 300 + '", "responses": ["a", "b"], "scores": [1, 2]}', "prompt_too_long", "over data.max_prompt_len"),
]


def _mixed_file(tmp_path):
    lines = [json.dumps(GOOD[0]), BAD[0][0], BAD[1][0], json.dumps(GOOD[1]), "", BAD[2][0], BAD[3][0], BAD[4][0],
             BAD[5][0], json.dumps(GOOD[2]), BAD[6][0]]
    bad_lines = [2, 3, 6, 7, 8, 9, 11]  # 1-based; line 5 is blank (not a row)
    return _jsonl(tmp_path / "mixed.jsonl", lines), bad_lines


def test_mixed_file_keeps_good_rows_and_writes_rejects(tmp_path, tok, capsys):
    path, bad_lines = _mixed_file(tmp_path)
    cfg = _cfg(path, schema="listwise", prompt_overflow="reject", max_prompt_len=64)
    examples, report = load_examples(cfg, tokenizer=tok, run_dir=tmp_path / "run")
    assert [e["prompt"][0]["content"] for e in examples] == ["p1", "p2", "p3"]
    assert [e["line"] for e in examples] == [1, 4, 10]
    assert report.rows_read == 10 and report.kept == 3 and len(report.rejects) == 7
    printed = capsys.readouterr().out
    assert "10 rows read, 3 kept, 7 rejected" in printed and "invalid_json 1" in printed

    rejects = [json.loads(x) for x in (tmp_path / "run" / "rejects.jsonl").read_text().splitlines()]
    assert [r["line"] for r in rejects] == bad_lines
    assert all(r["source"] == path for r in rejects)
    for r, (raw, code, phrase) in zip(rejects, BAD):
        assert r["code"] == code and phrase in r["reason"], r
        assert r["row"] == raw[:1000]

    # Loading again replaces this source's lines instead of duplicating them.
    load_examples(cfg, tokenizer=tok, run_dir=tmp_path / "run", log=None)
    assert len((tmp_path / "run" / "rejects.jsonl").read_text().splitlines()) == 7


def test_strict_mode_names_file_and_line(tmp_path):
    path, _ = _mixed_file(tmp_path)
    with pytest.raises(DataError, match=r"mixed\.jsonl:2: invalid JSON"):
        load_examples(_cfg(path, schema="listwise", strict=True), log=None)


def test_probability_outside_unit_interval_and_missing_path(tmp_path):
    path = _jsonl(tmp_path / "p.jsonl", [{"prompt": "q", "response_a": "a", "response_b": "b", "pref": 1.5},
                                          {"prompt": "q", "response_a": "a", "response_b": "b", "pref": 0.7}])
    examples, report = load_examples(_cfg(path), log=None)
    assert len(examples) == 1 and examples[0]["pref"] == 0.7
    assert report.rejects[0].line == 1 and "outside [0, 1]" in report.rejects[0].reason
    with pytest.raises(DataError, match="does not exist"):
        load_examples(_cfg(tmp_path / "nope.jsonl"), log=None)


def test_json_parquet_and_arrow_files(tmp_path):
    import datasets

    rows = [{"prompt": f"q{i}", "chosen": "a", "rejected": "b"} for i in range(3)]
    (tmp_path / "a.json").write_text("[\n" + ",\n".join(json.dumps(r) for r in rows[:2]) + ',\n{"prompt": 1}\n]')
    examples, report = load_examples(_cfg(tmp_path / "a.json", schema="pairwise"), log=None)
    assert [e["line"] for e in examples] == [2, 3] and report.rejects[0].line == 4

    ds = datasets.Dataset.from_list(rows)
    ds.to_parquet(str(tmp_path / "a.parquet"))
    ds.save_to_disk(str(tmp_path / "disk"))
    arrow = next((tmp_path / "disk").glob("*.arrow"))
    for path in (tmp_path / "a.parquet", arrow, tmp_path / "disk"):
        examples, _ = load_examples(_cfg(path), log=None)
        assert [e["prompt"][0]["content"] for e in examples] == ["q0", "q1", "q2"]
        assert [e["line"] for e in examples] == [1, 2, 3]


def test_data_config_loads_nested_with_overrides(tmp_path):
    @dataclasses.dataclass(frozen=True)
    class Prog:
        data: DataConfig = DataConfig()

    cfg = config_lib.load(Prog, None, ["data.path=uf.jsonl", "data.length_buckets=[32,64]", "data.strict=true"])
    assert cfg.data.path == "uf.jsonl" and cfg.data.length_buckets == (32, 64) and cfg.data.strict
    with pytest.raises(config_lib.ConfigError, match="data.max_prompt_len"):
        config_lib.load(Prog, None, ["data.max_promt_len=3"])


# ----------------------------------------------------------------------------- tokenisation


def test_response_mask_is_exactly_the_chat_formatted_response(tok):
    fmt = Formatter(tok)
    msgs = [{"role": "user", "content": "What is 12 + 30?"}]
    responses = ["It is 42.", "Forty-two, I think."]
    prompt_ids, resp_ids = fmt.encode(msgs, responses)
    batch = tk.collate_responses([{"prompt_ids": prompt_ids, "response_ids": resp_ids, "scores": [], "pref": 1.0, "row": 0}],
                                 batch_size=2, num_responses=2, buckets=(16, 64, 128), pad_id=tok.pad_token_id)
    ptext = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    for k, r in enumerate(responses):
        full = tok.apply_chat_template(msgs + [{"role": "assistant", "content": r}], tokenize=False)
        ids, mask = batch["input_ids_BxKxT"][0, k], batch["loss_mask_BxKxT"][0, k]
        targets = ids[1:][mask[:-1] == 1]  # the logprobs alignment: hidden[:, :-1] predicts ids[:, 1:]
        assert tok.decode(targets) == full[len(ptext):] == r + "<|im_end|>\n"
        assert tok.decode(ids[batch["attention_mask_BxKxT"][0, k] == 1]) == full
        assert mask[-1] == 0 and mask.sum() == len(resp_ids[k])
    assert batch["input_ids_BxKxT"].shape[-1] == 64
    assert not batch["example_mask_B"][1] and not batch["list_mask_BxK"][1].any()
    np.testing.assert_array_equal(batch["positions_BxKxT"][0, 0, :len(prompt_ids)], np.arange(len(prompt_ids)))


def test_truncation_sides(tmp_path, tok):
    path = _jsonl(tmp_path / "d.jsonl", [{"prompt": "one two three four five six seven eight nine ten",
                                          "chosen": "alpha beta gamma delta epsilon", "rejected": "zeta eta theta iota"}])
    cfg = _cfg(path, max_prompt_len=6, max_response_len=3, batch_size=1, shuffle=False)
    b = make_pipeline(cfg, tok, kind="pair", log=None).batches[0]
    full_p, full_r = Formatter(tok).encode([{"role": "user", "content": "one two three four five six seven eight nine ten"}],
                                           ["alpha beta gamma delta epsilon"])
    ids = b["input_ids_BxKxT"][0, 0]
    assert ids[:6].tolist() == full_p[-6:]  # the prompt keeps its end...
    assert ids[6:9].tolist() == full_r[0][:3]  # ...the response its start
    assert b["loss_mask_BxKxT"][0, 0].tolist()[:9] == [0, 0, 0, 0, 0, 1, 1, 1, 0]


def test_listwise_batches_pad_ragged_lists(tmp_path, tok):
    path = _jsonl(tmp_path / "l.jsonl", GOOD)
    p = make_pipeline(_cfg(path, batch_size=4, shuffle=False), tok, kind="list", log=None)
    b = p.batches[0]
    assert p.num_responses == 4 and b["input_ids_BxKxT"].shape[:2] == (4, 4)
    assert b["list_mask_BxK"].tolist() == [[1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1], [0, 0, 0, 0]]
    np.testing.assert_array_equal(b["scores_BxK"][1], [3, 2, 1, 0])
    assert b["input_ids_BxKxT"].shape[-1] in p.buckets
    with pytest.raises(DataError, match=r"l\.jsonl:1: this program needs pairs"):
        make_pipeline(_cfg(path), tok, kind="pair", log=None)


def test_prompt_batches_are_left_padded(tmp_path, tok):
    path = _jsonl(tmp_path / "p.jsonl", [{"prompt": "Hi"}, {"prompt": "A much longer question about things?"}])
    b = make_pipeline(_cfg(path, batch_size=2, shuffle=False), tok, kind="prompt", log=None).batches[0]
    lists = tk.unpad_prompts(b["prompt_ids_BxT"], b["prompt_len_B"], b["example_mask_B"])
    fmt = Formatter(tok)
    assert lists == [fmt.prompt_ids([{"role": "user", "content": t}]) for t in ("Hi", "A much longer question about things?")]
    assert (b["prompt_ids_BxT"][:, -1] == lists[0][-1]).all()  # every row ends at the last column
    assert b["prompt_text_B"].tolist() == ["Hi", "A much longer question about things?"]


# ----------------------------------------------------------------------------- grain iterator


def _rows(batch):
    return batch["row_B"][batch["example_mask_B"]].tolist()


def test_iterator_state_restores_the_following_batches(tmp_path, tok):
    import grain
    import orbax.checkpoint as ocp

    path = _jsonl(tmp_path / "d.jsonl", [{"prompt": f"q{i}", "chosen": "a", "rejected": "b"} for i in range(11)])
    p = make_pipeline(_cfg(path, batch_size=3, num_epochs=2, seed=7), tok, kind="pair", log=None)
    it = p.iterator()
    seen = [_rows(next(it)) for _ in range(3)]
    state = it.get_state()
    json.dumps(state)  # JSON-able: grain's Orbax handler writes it as JSON
    ckpt = ocp.Checkpointer(grain.checkpoint.CheckpointHandler())
    ckpt.save(tmp_path / "ckpt", args=grain.checkpoint.CheckpointSave(it))
    rest = [_rows(b) for b in it]

    it2 = p.iterator()
    it2.set_state(state)
    assert [_rows(b) for b in it2] == rest
    it3 = ckpt.restore(tmp_path / "ckpt", args=grain.checkpoint.CheckpointRestore(p.iterator()))
    assert [_rows(b) for b in it3] == rest

    every = sorted(sum(seen + rest, []))
    assert every == sorted(list(range(11)) * 2)  # each epoch sees every row exactly once
    assert seen[0] + seen[1] + seen[2][:2] != list(range(11))[:8]  # shuffled


def test_host_shards_are_disjoint_and_equal_length(tmp_path, tok):
    path = _jsonl(tmp_path / "d.jsonl", [{"prompt": f"q{i}"} for i in range(7)])
    shards = [list(make_pipeline(_cfg(path, batch_size=2, shard_index=i, shard_count=3), tok, kind="prompt",
                                 log=None).iterator()) for i in range(3)]
    assert len({len(s) for s in shards}) == 1  # every host runs the same number of steps
    rows = [sum((_rows(b) for b in s), []) for s in shards]
    assert sorted(sum(rows, [])) == list(range(7))


def test_resolve_local_folders_globs_and_hub_names(tmp_path):
    from repo_jax.data import sources

    assert sources.resolve("HuggingFaceH4/ultrafeedback_binarized") == [("HuggingFaceH4/ultrafeedback_binarized", "hub")]
    with pytest.raises(DataError, match="does not exist"):
        sources.resolve("./missing/rows.jsonl")
    for name in ("b.jsonl", "a.parquet", "notes.txt"):
        (tmp_path / name).write_text("")
    assert sources.resolve(str(tmp_path)) == [(str(tmp_path / "a.parquet"), "parquet"), (str(tmp_path / "b.jsonl"), "jsonl")]
    assert sources.resolve(str(tmp_path / "*.jsonl")) == [(str(tmp_path / "b.jsonl"), "jsonl")]


def test_hh_transcripts_without_chat_template(tmp_path, tok):
    path = _jsonl(tmp_path / "hh.jsonl", [HH_ROW])
    p = make_pipeline(_cfg(path, batch_size=1, chat_template=False), tok, kind="pair", log=None)
    b = p.batches[0]
    text = tok.decode(b["input_ids_BxKxT"][0, 1][b["attention_mask_BxKxT"][0, 1] == 1])
    assert text == HH_ROW["rejected"] + tok.eos_token
    targets = b["input_ids_BxKxT"][0, 1, 1:][b["loss_mask_BxKxT"][0, 1, :-1] == 1]
    assert tok.decode(targets) == " No, 5." + tok.eos_token
