"""A byte-level tokenizer (ids 0-255 are the UTF-8 bytes) for tiny random models and tests.

A random-init model has no tokenizer of its own; with ``model.tokenizer: bytes`` the loop uses
this one. Id 0 (the NUL byte) is both EOS and padding; there is no chat template, so prompts
render as ``\\n\\nHuman: ...\\n\\nAssistant:`` transcripts (:class:`repo_jax.data.Formatter`).
It implements the part of the ``transformers`` tokenizer API the library calls.
"""

from __future__ import annotations

from collections.abc import Sequence

VOCAB_SIZE = 256


class ByteTokenizer:
    eos_token = "\x00"
    eos_token_id = 0
    pad_token_id = 0
    bos_token_id = None
    chat_template = None
    vocab_size = VOCAB_SIZE

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        data = bytes(int(i) for i in ids if not (skip_special_tokens and int(i) == self.eos_token_id))
        return data.decode("utf-8", errors="replace")

    def __len__(self) -> int:
        return VOCAB_SIZE
