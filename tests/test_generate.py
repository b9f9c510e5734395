"""``python -m repo_jax.generate`` on a tiny random Llama saved beside the SmolLM2 tokenizer."""

from __future__ import annotations

import re

import pytest

from repo_jax import generate

models = pytest.importorskip("repo_jax.models")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    from repo_jax.assets import load_tokenizer

    try:
        tok = load_tokenizer("smollm2")
    except FileNotFoundError as e:
        pytest.skip(str(e))
    folder = tmp_path_factory.mktemp("tiny_llama")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=512, tie_word_embeddings=True,
    )
    transformers.LlamaForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def test_cli_prints_responses_and_speed(tiny_folder, capsys):
    rc = generate.main(["--model", str(tiny_folder), "--prompt", "Hello there", "--prompt", "Hi",
                        "--max-new-tokens", "5", "--temperature", "1.0", "--top-k", "5", "--top-p", "0.9",
                        "--seed", "1", "--num-samples", "2"])
    out = capsys.readouterr().out
    assert rc == 0
    assert out.count("--- prompt") == 4 and "prompt 1, sample 1" in out
    assert re.search(r"new tokens/s \(prefill \+ decode, compile excluded", out)


def test_cli_chat_template_is_applied(tiny_folder):
    tok = transformers.AutoTokenizer.from_pretrained(tiny_folder)
    ids = generate.encode_prompt(tok, "Hello")
    assert tok.decode(ids).rstrip().endswith("assistant") and "Hello" in tok.decode(ids)
    assert generate.encode_prompt(tok, "Hello", chat=False) == tok.encode("Hello")
