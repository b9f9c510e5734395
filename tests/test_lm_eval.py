"""Our models behind the LM Evaluation Harness (``repo_jax.evals.harness.JaxLM``), on local tasks."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

lm_eval = pytest.importorskip("lm_eval")
from lm_eval.api.instance import Instance  # noqa: E402

from repo_jax import evaluate, models  # noqa: E402
from repo_jax.evals.harness import JaxLM, cut_at_stops  # noqa: E402


def _req(kind, *args):
    return Instance(request_type=kind, doc={}, arguments=args, idx=0)


@pytest.fixture(scope="module")
def tiny_lm(tok):
    cfg = models.ModelConfig(arch="mistral", hf_model_type="llama", vocab_size=len(tok), hidden_size=32,
                             intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                             max_position_embeddings=512, tie_word_embeddings=True)
    return JaxLM(models.build(cfg, seed=3), tok, batch_size=4, max_length=64, max_gen_toks=8)


def _direct_logp(model, ids):
    """log p(ids[1:] | ids[:-1]) per token, from the model's full logits."""
    logits = model(jnp.asarray([ids], jnp.int32))[0, :-1]
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    tgt = np.asarray(ids[1:])
    return np.asarray(logp)[np.arange(len(tgt)), tgt], np.asarray(logits).argmax(-1) == tgt


def _check_loglikelihood(lm, pairs):
    res = lm.loglikelihood([_req("loglikelihood", c, x) for c, x in pairs])
    for (ctx, cont), (logp, greedy) in zip(pairs, res):
        c_ids, x_ids = lm._encode_pair(ctx, cont) if ctx else ([lm.prefix_token_id], lm.tok_encode(cont))
        per_tok, is_max = _direct_logp(lm.model, c_ids + x_ids)
        n = len(x_ids)
        assert logp == pytest.approx(float(per_tok[-n:].sum()), abs=1e-4)
        assert greedy == bool(is_max[-n:].all())
    return res


def test_loglikelihood_equals_the_model_s_own_token_logprobs(tiny_lm):
    pairs = [("The capital of France is", " Paris"), ("2 + 2 =", " 4"), ("", "Hello world"),
             ("A much longer context that spans quite a few more tokens than the others do", " indeed.")]
    _check_loglikelihood(tiny_lm, pairs)
    # is_greedy is true exactly when each continuation token is the argmax: build one greedily
    ctx = "Once upon a time"
    ids = tiny_lm.tok_encode(ctx)
    for _ in range(3):
        nxt = int(np.asarray(tiny_lm.model(jnp.asarray([ids], jnp.int32)))[0, -1].argmax())
        ids.append(nxt)
    cont_ids = ids[len(tiny_lm.tok_encode(ctx)):]
    (logp, greedy), = tiny_lm._loglikelihood_tokens([((ctx, "x"), tiny_lm.tok_encode(ctx), cont_ids)])
    assert greedy


def test_generate_until_stops_at_the_until_strings(tiny_lm):
    free = tiny_lm.generate_until([_req("generate_until", "Count: 1 2 3", {"until": [], "max_gen_toks": 8})])[0]
    assert free, "the tiny model produced no text to cut"
    stop = free[len(free) // 2:len(free) // 2 + 1] or free[0]
    cut = tiny_lm.generate_until([_req("generate_until", "Count: 1 2 3", {"until": [stop], "max_gen_toks": 8})])[0]
    assert cut == free[:free.index(stop)] and stop not in cut
    assert cut_at_stops("abc\n\ndef", ["\n\n", "c"]) == "ab"


def test_loglikelihood_rolling_covers_text_longer_than_one_window(tiny_lm):
    text = " ".join(["alpha beta gamma delta"] * 40)
    ids = tiny_lm.tok_encode(text)
    assert len(ids) > 2 * tiny_lm.max_length
    seen = []
    score = tiny_lm.score_tokens

    def spy(pairs):
        seen.extend(pairs)
        return score(pairs)

    tiny_lm.score_tokens = spy
    try:
        (rolling,) = tiny_lm.loglikelihood_rolling([_req("loglikelihood_rolling", text)])
    finally:
        del tiny_lm.score_tokens
    assert len(seen) > 2 and sum(len(c) for _, c in seen) == len(ids)  # every token predicted once
    assert all(len(c) + len(x) <= tiny_lm.max_length + 1 for c, x in seen)
    assert np.isfinite(rolling) and rolling == pytest.approx(sum(lp for lp, _ in score(seen)), rel=1e-6)
    short = "alpha beta gamma"  # fits one window: the whole text after the prefix token
    (whole,) = tiny_lm.loglikelihood_rolling([_req("loglikelihood_rolling", short)])
    per_tok, _ = _direct_logp(tiny_lm.model, [tiny_lm.prefix_token_id] + tiny_lm.tok_encode(short))
    assert whole == pytest.approx(float(per_tok.sum()), abs=1e-4)


def _local_task(tmp_path):
    """A multiple-choice and a generation task over one small local jsonl."""
    rows = [{"question": f"What is {a} plus {b}?", "choices": [str(a + b), str(a + b + 1), str(a * b + 2)],
             "label": 0, "answer": str(a + b)} for a, b in [(2, 3), (4, 4), (1, 6), (7, 2), (5, 5), (3, 8)]]
    data = tmp_path / "sums.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    common = (f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n")
    (tasks / "sums_mc.yaml").write_text(
        "task: sums_mc\n" + common + "output_type: multiple_choice\n"
        "doc_to_text: \"Question: {{question}}\\nAnswer:\"\ndoc_to_choice: \"{{choices}}\"\ndoc_to_target: label\n"
        "metric_list:\n  - metric: acc\n")
    (tasks / "sums_gen.yaml").write_text(
        "task: sums_gen\n" + common + "output_type: generate_until\n"
        "doc_to_text: \"Question: {{question}}\\nAnswer:\"\ndoc_to_target: \" {{answer}}\"\n"
        "generation_kwargs:\n  until: [\"\\n\"]\n  max_gen_toks: 8\n"
        "metric_list:\n  - metric: exact_match\n")
    return tasks, rows


def test_program_runs_local_tasks_and_saves_the_table(tmp_path, tiny_lm, monkeypatch, capsys):
    tasks, rows = _local_task(tmp_path)
    monkeypatch.setattr(JaxLM, "load", classmethod(lambda cls, path, **kw: tiny_lm))
    out = tmp_path / "out"
    assert evaluate.main(["lm-eval", "--model", "tiny", "--tasks", "sums_mc,sums_gen", "--include-path", str(tasks),
                          "--out", str(out)]) == 0
    res = json.loads((out / "lm_eval.json").read_text())["results"]
    assert set(res) == {"sums_mc", "sums_gen"}
    assert 0.0 <= res["sums_mc"]["acc,none"] <= 1.0 and "exact_match,none" in res["sums_gen"]
    assert "sums_mc" in capsys.readouterr().out
    assert evaluate.main(["lm-eval", "--model", "tiny", "--tasks", "nope", "--include-path", str(tasks),
                          "--out", str(out)]) == 2
    assert "no task 'nope'" in capsys.readouterr().err


@pytest.mark.slow
def test_smollm2_loglikelihood_matches_direct_logprobs(tok):
    lm = JaxLM.load("smollm2", batch_size=4, max_length=128)
    _check_loglikelihood(lm, [("Question: What is 2 plus 3?\nAnswer:", " 5"), ("The sky is", " blue"),
                              ("Question: What is 2 plus 3?\nAnswer:", " 6")])


def test_under_an_eight_device_mesh_results_match_one_device(tiny_lm, tok):
    from repo_jax import sharding as shd

    assert len(jax.devices()) == 8
    mesh = shd.make_mesh(shd.MeshConfig(fsdp=-1))
    sharded = JaxLM(tiny_lm.model, tok, batch_size=4, max_length=64, max_gen_toks=8, mesh=mesh)
    pairs = [("The capital of France is", " Paris"), ("2 + 2 =", " 4"), ("One two", " three four five")]
    reqs = [_req("loglikelihood", c, x) for c, x in pairs]
    for (a, ga), (b, gb) in zip(tiny_lm.loglikelihood(reqs), sharded.loglikelihood(reqs)):
        assert a == pytest.approx(b, abs=1e-4) and ga == gb
    gen = [_req("generate_until", "Count: 1 2 3", {"until": ["\n"], "max_gen_toks": 8})]
    assert sharded.generate_until(gen) == tiny_lm.generate_until(gen)
