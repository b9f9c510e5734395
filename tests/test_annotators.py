"""Annotators: rule scorers, Bradley-Terry probabilities, caches, panels, the LLM judge (on a
tiny stand-in NNX model and on a tiny random Llama through repo_jax.models), reward models."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from repo_jax import preferences
from repo_jax.annotators import (
    ExactNumber, HFRewardModel, JaxRewardModel, LengthBudget, LLMJudge, PairwiseAnnotator, Panel, RegexMatch,
    RuleAnnotator, ScoreHead, Weighted, bt_probs, extract_number, simulated_panel,
)


# ----------------------------------------------------------------------------- rules


def test_extract_number():
    assert extract_number("3 + 4 = 7, so the answer is 7.") == 7
    assert extract_number("Answer: -12") == -12
    assert extract_number("She has 1,200 apples") == 1200
    assert extract_number("It costs 2.5 dollars.") == 2.5
    assert extract_number("5-3=2") == 2
    assert extract_number("no digits here") is None
    assert extract_number("x2 is a name") is None


def test_rule_scorers_on_hand_made_responses():
    exact = ExactNumber({"What is 3+4?": 7})
    assert exact("What is 3+4?", "3 + 4 = 7. Answer: 7") == 1.0
    assert exact("What is 3+4?", "The answer is 8") == 0.0
    assert exact("What is 3+4?", "seven") == 0.0
    with pytest.raises(KeyError, match="no reference answer"):
        exact("other", "7")
    fmt = RegexMatch(r"Answer:\s*-?\d+\s*$")
    assert fmt("q", "so... Answer: 7") == 1.0 and fmt("q", "Answer: 7 apples") == 0.0
    budget = LengthBudget(max_words=4)
    assert budget("q", "one two three four") == 1.0
    assert budget("q", "one two three four five six") == 0.5
    assert budget("q", "w " * 20) == 0.0
    both = Weighted(((1.0, exact), (0.5, fmt)))
    assert both("What is 3+4?", "Answer: 7") == 1.5


def test_rule_annotator_bradley_terry_probabilities():
    ann = RuleAnnotator(ExactNumber({"q": 7}), temperature=0.5)
    probs = ann(["q"], [["Answer: 7", "Answer: 8", "It is 7"]])[0]
    s = np.array([1.0, 0.0, 1.0])
    expected = 1 / (1 + np.exp(-(s[:, None] - s[None, :]) / 0.5)) * (1 - np.eye(3))
    np.testing.assert_allclose(probs, expected, rtol=1e-6)
    hard = RuleAnnotator(ExactNumber({"q": 7}), temperature=0.0)(["q"], [["7", "8", "7"]])[0]
    np.testing.assert_array_equal(hard, [[0, 1, 0.5], [0, 0, 0], [0.5, 1, 0]])
    # Scores are cached per (prompt, response): a repeated response is scored once per round.
    ann([("q")], [["Answer: 7", "Answer: 7 again", "Answer: 8"]])
    assert ann.scored == 4
    ann.reset()
    ann(["q"], [["Answer: 7", "x"]])
    assert ann.scored == 6


def test_bt_probs_is_symmetric():
    p = bt_probs(np.random.default_rng(0).normal(size=(3, 5)) * 30, temperature=0.1)
    off = 1 - np.eye(5)
    np.testing.assert_allclose((p + p.transpose(0, 2, 1)) * off, np.broadcast_to(off, p.shape), atol=1e-6)


# ----------------------------------------------------------------------------- caches and panels


class Counting(PairwiseAnnotator):
    """Prefers the longer response; records every pair it is asked to judge."""

    def __init__(self):
        super().__init__(name="counting")
        self.calls: list[tuple[str, str, str]] = []

    def judge_pairs(self, prompts, first, second):
        self.calls += list(zip(prompts, first, second))
        return [float(len(a) > len(b)) for a, b in zip(first, second)]


def test_pair_cache_never_judges_the_same_pair_twice():
    ann = Counting()
    p1 = ann(["q", "q"], [["a", "bb", "ccc"], ["ccc", "a", "bb"]])  # same prompt, same pairs reordered
    assert len(ann.calls) == 3 and len(set(ann.calls)) == 3
    np.testing.assert_array_equal(p1[0], [[0, 0, 0], [1, 0, 0], [1, 1, 0]])
    np.testing.assert_array_equal(p1[1], [[0, 1, 1], [0, 0, 0], [0, 1, 0]])
    ann(["q"], [["bb", "a", "a"]])  # cached both ways; identical responses are a tie, never judged
    assert len(ann.calls) == 3
    ann.reset()
    ann(["q"], [["a", "bb"]])
    assert len(ann.calls) == 4


def _known_strengths(num_prompts=20, d=4, seed=0):
    r = np.random.default_rng(seed).normal(size=(num_prompts, d))
    prompts = [f"prompt {p}" for p in range(num_prompts)]
    responses = [[f"p{p} response {i}" for i in range(d)] for p in range(num_prompts)]
    table = {(prompts[p], responses[p][i]): r[p, i] for p in range(num_prompts) for i in range(d)}
    return prompts, responses, r, lambda q, y: table[(q, y)]


def test_panel_counts_sum_to_panel_size():
    prompts, responses, _, reward = _known_strengths(num_prompts=3)
    members = simulated_panel(reward, 5, seed=1) + [RuleAnnotator(lambda q, y: reward(q, y), temperature=1.0)]
    panel = Panel(members)
    counts = panel.counts(prompts, responses)
    assert counts.shape == (3, 4, 4) and len(panel) == 6
    off = 1 - np.eye(4)
    np.testing.assert_allclose((counts + counts.transpose(0, 2, 1)) * off, np.broadcast_to(6 * off, counts.shape), atol=1e-5)
    votes = panel.probs(prompts, responses)[:5]
    assert set(np.unique(votes)) <= {0.0, 1.0}  # simulated raters vote
    np.testing.assert_array_equal(panel.counts(prompts, responses), counts)  # deterministic, cached


def test_simulated_panel_zermelo_error_shrinks_with_panel_size():
    prompts, responses, r, reward = _known_strengths(num_prompts=30, d=4, seed=3)
    errors = []
    for h in (3, 30, 300):
        counts = Panel(simulated_panel(reward, h, bias_std=0.3, seed=h)).counts(prompts, responses)
        log_w = np.asarray(preferences.zermelo(counts, pseudo_count=0.5, return_log=True))
        errors.append(np.sqrt(np.mean((log_w - (r - r.mean(-1, keepdims=True))) ** 2)))
    assert errors[0] > errors[1] > errors[2], errors
    assert errors[2] < 0.25, errors


# ----------------------------------------------------------------------------- LLM judge


class TinyLM(nnx.Module):
    """One causal attention layer with learned positions; honours positions and attention_mask
    (left padding), exposing ``hidden_states``/``logits`` like the model ports."""

    def __init__(self, vocab: int, d: int = 16, seed: int = 0):
        r = nnx.Rngs(seed)
        init = nnx.initializers.normal(1.0)
        self.embed = nnx.Param(init(r.params(), (vocab, d)))
        self.pos = nnx.Param(init(r.params(), (1024, d)))
        self.wqkv = nnx.Param(init(r.params(), (3, d, d)) * 4 / d**0.5)  # sharp attention: content matters
        self.head = nnx.Param(init(r.params(), (d, vocab)) * 2)

    def hidden_states(self, input_ids_BxT, positions_BxT=None, attention_mask_BxT=None):
        b, t = input_ids_BxT.shape
        mask_BxT = jnp.ones((b, t), jnp.int32) if attention_mask_BxT is None else attention_mask_BxT
        pos_BxT = jnp.maximum(jnp.cumsum(mask_BxT, 1) - 1, 0) if positions_BxT is None else positions_BxT
        x_BxTxD = self.embed[...][input_ids_BxT] + self.pos[...][pos_BxT]
        q, k, v = (jnp.einsum("BTD,DE->BTE", x_BxTxD, self.wqkv[...][i]) for i in range(3))
        s_BxTxS = jnp.einsum("BTE,BSE->BTS", q, k) / q.shape[-1] ** 0.5
        allowed = jnp.tril(jnp.ones((t, t), bool))[None] & (mask_BxT[:, None, :] > 0)
        a_BxTxS = jax.nn.softmax(jnp.where(allowed, s_BxTxS, -1e9), axis=-1)
        return jnp.tanh(x_BxTxD + jnp.einsum("BTS,BSE->BTE", a_BxTxS, v))

    def logits(self, h_BxTxD):
        return jnp.einsum("BTD,DV->BTV", h_BxTxD, self.head[...]).astype(jnp.float32)

    def __call__(self, input_ids_BxT, positions_BxT=None, attention_mask_BxT=None):
        return self.logits(self.hidden_states(input_ids_BxT, positions_BxT, attention_mask_BxT))


class CallOnly(nnx.Module):
    """The bare interface: ``model(ids, positions, mask) -> logits``."""

    def __init__(self, inner):
        self.inner = inner

    def __call__(self, input_ids_BxT, positions_BxT=None, attention_mask_BxT=None):
        return self.inner(input_ids_BxT, positions_BxT, attention_mask_BxT)


QUESTION = "What is 2 + 3?"
ANSWERS = ["It is 5.", "2 + 3 = 6", "Five. Answer: 5", "I am not sure, maybe 4 or so."]


@nnx.jit
def _last_logits(model, ids_BxT):
    return model(ids_BxT)[:, -1]


@nnx.jit
def _last_hidden(model, ids_BxT):
    return model.hidden_states(ids_BxT)[:, -1]


def _manual_first_wins(model, judge, q, a, b):
    ids = jnp.asarray([judge.prompt_ids(q, a, b)], jnp.int32)
    logits = np.asarray(_last_logits(model, ids))[0]
    a_id, b_id = judge.tokenizer.encode(" A", add_special_tokens=False)[0], judge.tokenizer.encode(" B", add_special_tokens=False)[0]
    return 1 / (1 + np.exp(-(float(logits[a_id]) - float(logits[b_id]))))


def _check_judge(model, judge):
    probs = judge([QUESTION], [ANSWERS])[0]
    off = 1 - np.eye(4)
    np.testing.assert_allclose((probs + probs.T) * off, off, atol=1e-6)
    assert judge.judged == 6
    # Both orders, averaged: p_01 = (p(0 first wins) + 1 - p(1 first wins)) / 2.
    p0, p1 = (_manual_first_wins(model, judge, QUESTION, x, y) for x, y in ((ANSWERS[0], ANSWERS[1]), (ANSWERS[1], ANSWERS[0])))
    np.testing.assert_allclose(probs[0, 1], (p0 + 1 - p1) / 2, atol=1e-5)
    # Swapping the responses swaps the matrix (fresh cache: really re-judged in the other order).
    judge.reset()
    swapped = judge([QUESTION], [ANSWERS[::-1]])[0]
    np.testing.assert_allclose(swapped, probs[::-1, ::-1], atol=1e-5)
    assert judge.judged == 12
    judge([QUESTION], [ANSWERS])  # every pair is cached (in one order or the other)
    assert judge.judged == 12
    return probs


def test_llm_judge_on_a_stand_in_model(tok):
    model = TinyLM(len(tok))
    judge = LLMJudge(model, tok, batch_size=4, max_response_tokens=32)
    probs = _check_judge(model, judge)
    assert probs[np.triu_indices(4, 1)].std() > 0.05  # a random judge is not exactly indifferent
    assert all(b in (1, 2, 4) and t in judge.forward.buckets for b, t in judge.forward.shapes)
    bare = LLMJudge(CallOnly(model), tok, batch_size=4, max_response_tokens=32)(["What is 2 + 3?"], [ANSWERS])[0]
    np.testing.assert_allclose(bare, probs, atol=1e-5)


def test_llm_judge_on_a_tiny_llama_through_repo_jax_models(tok, tmp_path):
    models = pytest.importorskip("repo_jax.models")
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("torch")
    cfg = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=1024,
                                   tie_word_embeddings=True)
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path)
    model = models.from_pretrained(str(tmp_path))
    _check_judge(model, LLMJudge(model, tok, batch_size=8, max_response_tokens=32))


# ----------------------------------------------------------------------------- reward models


def test_jax_reward_model_scores_with_a_head_on_the_last_hidden_state(tok):
    model = TinyLM(len(tok), seed=1)
    head = ScoreHead(16, rngs=nnx.Rngs(2))
    rm = JaxRewardModel(model, head, tok, temperature=2.0, batch_size=4)
    scores = rm.scores([QUESTION], [ANSWERS])[0]
    from repo_jax.data import Formatter

    for s, a in zip(scores, ANSWERS):
        p_ids, (r_ids,) = Formatter(tok).encode([{"role": "user", "content": QUESTION}], [a])
        h = _last_hidden(model, jnp.asarray([p_ids + r_ids], jnp.int32))
        np.testing.assert_allclose(s, float(head(h)[0]), atol=1e-5)
    probs = rm([QUESTION], [ANSWERS])[0]
    np.testing.assert_allclose(probs, bt_probs(scores[None], 2.0)[0], atol=1e-6)


def test_hf_reward_model_from_a_tiny_random_checkpoint(tok, tmp_path):
    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1, num_labels=1,
                                   pad_token_id=tok.pad_token_id)
    net = transformers.LlamaForSequenceClassification(cfg).eval()
    net.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    rm = HFRewardModel(str(tmp_path), temperature=0.5, batch_size=3)
    scores = rm.scores([QUESTION], [ANSWERS])[0]
    from repo_jax.data import Formatter

    for s, a in zip(scores, ANSWERS):
        p_ids, (r_ids,) = Formatter(tok).encode([{"role": "user", "content": QUESTION}], [a])
        with torch.no_grad():
            ref = net(input_ids=torch.tensor([p_ids + r_ids])).logits[0, 0].item()
        np.testing.assert_allclose(s, ref, atol=1e-4)
    np.testing.assert_allclose(rm([QUESTION], [ANSWERS])[0], bt_probs(scores[None], 0.5)[0], atol=1e-6)
    assert rm.scored == 4


def test_panel_weights_scale_the_counts_and_a_failing_member_names_itself():
    from repo_jax.annotators import AnnotatorError, Panel, RuleAnnotator

    long_wins = RuleAnnotator(lambda p, r: len(r), temperature=0.0, name="long")
    short_wins = RuleAnnotator(lambda p, r: -len(r), temperature=0.0, name="short")
    panel = Panel([long_wins, short_wins], weights=[3.0, 1.0])
    counts = panel.counts(["q"], [["a", "bbb"]])
    assert counts[0, 1, 0] == 3.0 and counts[0, 0, 1] == 1.0  # n_ij + n_ji = total weight 4

    def broken(p, r):
        raise RuntimeError("no connection")

    with pytest.raises(AnnotatorError, match="annotator 'remote' failed: RuntimeError: no connection"):
        Panel([long_wins, RuleAnnotator(broken, name="remote")]).probs(["q"], [["a", "b"]])
    with pytest.raises(ValueError, match="2 annotators needs as many non-negative weights"):
        Panel([long_wins, short_wins], weights=[1.0])


def test_panel_from_config_builds_named_weighted_members():
    from repo_jax.config import ConfigError
    from repo_jax.loop.config import AnnotatorSpec
    from repo_jax.loop.panels import build_panel
    from repo_jax.tasks import get_task

    task = get_task("arithmetic")
    panel = build_panel((AnnotatorSpec(kind="rule", name="correct", weight=2.0),
                         AnnotatorSpec(kind="simulated", count=3, seed=1)), task)
    assert panel.names == ["rule/correct", "simulated0", "simulated1", "simulated2"]
    assert panel.weights.tolist() == [2.0, 1.0, 1.0, 1.0]
    with pytest.raises(ConfigError, match=r"annotate.panel\[0\]: rule 'nope' is not a scorer.*'correct', 'format'"):
        build_panel((AnnotatorSpec(kind="rule", name="nope"),), task)
    with pytest.raises(ConfigError, match="two members named 'rule/correct'"):
        build_panel((AnnotatorSpec(kind="rule", name="correct"), AnnotatorSpec(kind="rule", name="correct")), task)
