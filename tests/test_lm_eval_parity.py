"""Our ``JaxLM`` against lm-eval's own ``hf`` model (``HFLM``) on the same checkpoint.

Both run through ``lm_eval.simple_evaluate`` on local tasks (no download): a wikitext-style
perplexity task (``loglikelihood_rolling``, several windows per document), the arithmetic
multiple-choice task (plain and with an assistant prefill, ``gen_prefix``) and its
``generate_until`` twin, with and without ``apply_chat_template``. Every request's
log-likelihood must agree to float32 round-off (1e-3 nats), so the accuracies agree exactly and
the perplexities to 1e-4 relative (measured: <= 1e-5). A different prefix token (lm-eval's
``TemplateLM`` default, EOS, where HFLM takes BOS), a BOS added on one side only, or an assistant
prefill closed on one side moves log-likelihoods by whole nats.

Reproduce the SmolLM2 figures (printed): ``python -m pytest -q -p no:xdist -s -m slow
tests/test_lm_eval_parity.py -k smollm2``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

lm_eval = pytest.importorskip("lm_eval")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from lm_eval.models.huggingface import HFLM  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from repo_jax.evals import local_tasks  # noqa: E402
from repo_jax.evals.harness import JaxLM  # noqa: E402

DOCS = [
    "The river Thames flows through southern England, passing Oxford, Reading and Windsor before it "
    "reaches London. For centuries it carried most of the city's trade, and its banks were lined with "
    "docks, warehouses and small boatyards. Today the water is cleaner than it has been for a hundred "
    "years, and seals are sometimes seen near the bridges.",
    "A simple recipe for bread needs only flour, water, salt and yeast. Mix them, knead the dough for ten "
    "minutes, let it rise for an hour, shape it and bake it in a hot oven until the crust is brown.",
    "In 1905 Albert Einstein published four papers that changed physics: on the photoelectric effect, on "
    "Brownian motion, on special relativity, and on the equivalence of mass and energy.",
    "Cats sleep for most of the day.",
]
ROLLING_METRICS = ("word_perplexity", "byte_perplexity", "bits_per_byte")
TASKS = ["local_ppl", "arithmetic_mc", "arithmetic_mc_prefill", "arithmetic_gen"]
CHAT_TASKS = ["local_ppl", "arithmetic_mc", "arithmetic_mc_prefill"]

# the arithmetic_mc task with the answer cue as an assistant prefill: under a chat template the
# prompt ends inside an open assistant turn (HFLM renders it with continue_final_message)
_PREFILL = """task: arithmetic_mc_prefill
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}"
gen_prefix: "Answer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
"""


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    folder = local_tasks.write(tmp_path_factory.mktemp("lm_eval_tasks"))
    local_tasks.write_rolling(folder, DOCS)
    (folder / "arithmetic_mc_prefill.yaml").write_text(
        _PREFILL.format(data=(folder / "arithmetic_eval.jsonl").resolve()))
    return folder


def _evaluate(lm, task_dir, tasks, chat: bool, limits: dict) -> dict:
    """``{task: (metrics, {doc_id: filtered responses})}``, one ``simple_evaluate`` per task (each
    with its own ``limit``); lm-eval's built-in task index is not read (it takes seconds)."""
    manager = TaskManager(include_path=str(task_dir), include_defaults=False)
    out = {}
    for task in tasks:
        res = lm_eval.simple_evaluate(model=lm, tasks=[task], task_manager=manager, limit=limits[task],
                                      apply_chat_template=chat, log_samples=True, random_seed=0,
                                      numpy_random_seed=0, torch_random_seed=0, fewshot_random_seed=0)
        out[task] = (res["results"][task], {s["doc_id"]: s["filtered_resps"] for s in res["samples"][task]})
    return out


def _loglikelihoods(resps) -> list[float]:
    """A sample's log-likelihoods: one per choice (``(ll, is_greedy)`` pairs) or the document's."""
    return [float(r[0] if isinstance(r, (list, tuple)) else r) for r in resps]


def _compare(ours: dict, ref: dict, *, ll_atol: float = 1e-3, ppl_rtol: float = 1e-4) -> dict:
    """Asserts parity; returns ``{task: {metric: (ours, hf)}}`` for the report."""
    figures = {}
    for task, (res, samples) in ref.items():
        our_res, our_samples = ours[task]
        assert our_samples.keys() == samples.keys()
        if task == "arithmetic_gen":
            for doc_id, resps in samples.items():
                assert our_samples[doc_id] == resps, (task, doc_id)
            assert our_res["exact_match,first_number"] == res["exact_match,first_number"]
            figures[task] = {"exact_match": (our_res["exact_match,first_number"], res["exact_match,first_number"])}
            continue
        for doc_id, resps in samples.items():
            np.testing.assert_allclose(_loglikelihoods(our_samples[doc_id]), _loglikelihoods(resps), atol=ll_atol,
                                       rtol=0, err_msg=f"{task} doc {doc_id}")
        if task == "local_ppl":
            figures[task] = {m: (our_res[f"{m},none"], res[f"{m},none"]) for m in ROLLING_METRICS}
            for m, (a, b) in figures[task].items():
                assert a == pytest.approx(b, rel=ppl_rtol), (m, a, b)
        else:
            names = [m for m in ("acc", "acc_norm") if f"{m},none" in res]
            figures[task] = {m: (our_res[f"{m},none"], res[f"{m},none"]) for m in names}
            for m, (a, b) in figures[task].items():
                assert a == b, (task, m, a, b)
    return figures


def _print(title: str, figures: dict) -> None:
    print(f"\n{title}")
    for task, metrics in figures.items():
        for m, (a, b) in metrics.items():
            rel = abs(a - b) / abs(b) if b else abs(a - b)
            print(f"  {task:24s} {m:16s} ours {a:12.6f}  hf {b:12.6f}  rel {rel:.1e}")


# ---- a tiny random Llama, with a BOS distinct from EOS -----------------------------------------


@pytest.fixture(scope="module", params=["tokenizer_default", "adds_bos"])
def tiny_folder(request, tok, tmp_path_factory):
    """A seeded random ``LlamaForCausalLM`` (float32) saved with the SmolLM2 tokenizer, whose BOS
    (``<|im_start|>``) differs from its EOS (``<|im_end|>``); ``adds_bos``: the tokenizer also
    prepends BOS by default, as Llama's do."""
    assert tok.bos_token_id is not None and tok.bos_token_id != tok.eos_token_id
    folder = tmp_path_factory.mktemp(f"tiny_{request.param}")
    cfg = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                   max_position_embeddings=128, tie_word_embeddings=False,
                                   bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # sharper than the init's near-uniform output, so every token's context matters
        for p in hf.parameters():
            if p.dim() > 1:
                p.mul_(8.0)
    hf.save_pretrained(folder)
    from repo_jax.assets import load_tokenizer

    saved = load_tokenizer("smollm2")  # a fresh copy: the shared fixture stays as it is
    if request.param == "adds_bos":
        saved.add_bos_token = True
        assert saved.encode("Hi")[0] == tok.bos_token_id
    saved.save_pretrained(folder)
    return folder


def test_tiny_llama_matches_lm_eval_hf(tiny_folder, task_dir):
    kw = dict(batch_size=8, max_length=48)  # documents span several 48-token windows
    ours = JaxLM.load(str(tiny_folder), max_gen_toks=16, **kw)
    hf = HFLM(pretrained=str(tiny_folder), device="cpu", dtype="float32", **kw)
    assert ours.prefix_token_id == hf.prefix_token_id == hf.tokenizer.bos_token_id
    for text in DOCS[:2] + ["<|im_start|>user\nHi<|im_end|>\n"]:
        assert ours.tok_encode(text) == hf.tok_encode(text)
    limits = {"local_ppl": None, "arithmetic_mc": 6, "arithmetic_mc_prefill": 6, "arithmetic_gen": 4}
    for chat, tasks in ((False, TASKS), (True, CHAT_TASKS)):
        figures = _compare(_evaluate(ours, task_dir, tasks, chat, limits), _evaluate(hf, task_dir, tasks, chat, limits))
        _print(f"tiny llama ({tiny_folder.name}, apply_chat_template={chat})", figures)


# ---- SmolLM2-135M-Instruct: the same GGUF through our loader and transformers' -----------------


@pytest.mark.slow
def test_smollm2_gguf_matches_lm_eval_hf(smollm2_path, task_dir):
    """Kept small (torch runs SmolLM2 at ~10 GFLOP/s on two shared cores): under the chat
    template only the multiple-choice tasks go through HFLM; the rolling task, which lm-eval
    renders without a template, is checked on our side against the plain run."""
    kw = dict(batch_size=8, max_length=64)  # 64-token windows: the long documents span several
    ours = JaxLM.load(str(smollm2_path), max_gen_toks=32, **kw)
    hf = HFLM(pretrained=str(smollm2_path.parent), gguf_file=smollm2_path.name, device="cpu", dtype="float32", **kw)
    assert ours.prefix_token_id == hf.prefix_token_id == 1  # <|im_start|>, not EOS <|im_end|> (2)
    limits = {"local_ppl": None, "arithmetic_mc": 4, "arithmetic_mc_prefill": 4, "arithmetic_gen": 1}
    tasks = ["local_ppl", "arithmetic_mc", "arithmetic_gen"]
    plain = _compare(_evaluate(ours, task_dir, tasks, False, limits), _evaluate(hf, task_dir, tasks, False, limits))
    _print("SmolLM2-135M-Instruct GGUF, no chat template", plain)
    tasks = ["arithmetic_mc", "arithmetic_mc_prefill"]
    chat = _compare(_evaluate(ours, task_dir, tasks, True, limits), _evaluate(hf, task_dir, tasks, True, limits))
    _print("SmolLM2-135M-Instruct GGUF, apply_chat_template=True", chat)
    (res, _), = _evaluate(ours, task_dir, ["local_ppl"], True, limits).values()
    for m in ROLLING_METRICS:  # lm-eval renders no template for a rolling request
        assert res[f"{m},none"] == pytest.approx(plain["local_ppl"][m][0], rel=1e-6)
    assert all(math.isfinite(v) for v, _ in plain["local_ppl"].values())
