"""LLM-judge annotator: a causal LM asked which of two responses is better, read from logits.

The judge prompt shows the question and two responses labelled A and B and ends with an answer
prefix (``Answer:``); the preference is read from the next-token logits of the two answer
tokens, ``p(A > B) = sigmoid(logit_A - logit_B)`` -- no sampling, no parsing of free text.

Judges favour one position (usually the first). Every pair is therefore judged in *both*
orders and averaged::

    p_ij = ( p(i wins when shown first) + 1 - p(j wins when shown first) ) / 2

which makes the judgement exactly symmetric (``p_ij + p_ji = 1``) and cancels a constant
position bias. All pairs of a call (both orders) are batched into bucketed forwards of one
jitted function (see :mod:`repo_jax.models.forward`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from repo_jax.annotators.base import PairwiseAnnotator
from repo_jax.models.forward import BucketedForward, last_logits

DEFAULT_TEMPLATE = (
    "Which response answers the question better?\n\n"
    "Question: {question}\n\n"
    "Response A: {response_a}\n\n"
    "Response B: {response_b}\n\n"
    "Reply with the letter of the better response, A or B."
)


def _single_token(tokenizer, text: str) -> int:
    ids = tokenizer.encode(text, add_special_tokens=False)
    if len(ids) != 1:
        raise ValueError(f"the judge's answer token {text!r} is {len(ids)} tokens for this tokenizer; choose answer "
                         "tokens that are one token each")
    return ids[0]


class LLMJudge(PairwiseAnnotator):
    """A judge from an NNX causal LM ``model(input_ids_BxT, positions_BxT, attention_mask_BxT)
    -> logits [B, T, V]`` and its tokenizer.

    Args:
      template: the judge's question, with ``{question}``, ``{response_a}``, ``{response_b}``.
      answer_prefix / answer_tokens: text the judge's reply starts with, and the two tokens read
        after it (each must be a single token; ``" A"`` after ``"Answer:"`` is how BPE
        tokenizers write a letter after a colon).
      chat_template: put the judge prompt in a user turn of the tokenizer's chat template (when it
        has one) and the answer prefix at the start of the assistant turn.
      max_response_tokens: each response is cut to this many tokens inside the judge prompt.
      max_len: longer judge prompts keep their last ``max_len`` tokens.
      batch_size: rows per forward (the last micro-batch is padded to a power of two).
    """

    name = "judge"

    def __init__(self, model, tokenizer, *, template: str = DEFAULT_TEMPLATE, answer_prefix: str = "Answer:",
                 answer_tokens: tuple[str, str] = (" A", " B"), chat_template: bool = True,
                 max_response_tokens: int = 256, max_len: int = 2048, batch_size: int = 16, name: str | None = None):
        super().__init__(name=name)
        self.tokenizer, self.template, self.answer_prefix = tokenizer, template, answer_prefix
        self.chat = bool(chat_template and getattr(tokenizer, "chat_template", None))
        self.max_response_tokens, self.max_len = int(max_response_tokens), int(max_len)
        a_id, b_id = (_single_token(tokenizer, t) for t in answer_tokens)

        def logit_diff(m, ids_BxT, pos_BxT, mask_BxT):
            logits_BxV = last_logits(m, ids_BxT, pos_BxT, mask_BxT)
            return logits_BxV[:, a_id] - logits_BxV[:, b_id]

        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.forward = BucketedForward(model, logit_diff, batch_size=batch_size, max_len=max_len, pad_id=pad)

    def update(self, model) -> None:
        """Judge with new weights from now on (clears the cache: old judgements are stale)."""
        self.forward.update(model)
        self.reset()

    def _cut(self, text: str) -> str:
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        return text if len(ids) <= self.max_response_tokens else self.tokenizer.decode(ids[:self.max_response_tokens])

    def prompt_ids(self, question: str, response_a: str, response_b: str) -> list[int]:
        """Token ids of the judge prompt, ending with the answer prefix."""
        text = self.template.format(question=question, response_a=self._cut(response_a),
                                    response_b=self._cut(response_b))
        if self.chat:
            text = self.tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                                      tokenize=False) + self.answer_prefix
            ids = self.tokenizer.encode(text, add_special_tokens=False)
        else:
            ids = self.tokenizer.encode(text + "\n\n" + self.answer_prefix)
        return list(ids[-self.max_len:])

    def first_wins(self, prompts: Sequence[str], first: Sequence[str], second: Sequence[str]) -> np.ndarray:
        """One-order judgement: ``sigmoid(logit_A - logit_B)`` with ``first`` shown as A."""
        diffs = self.forward([self.prompt_ids(q, a, b) for q, a, b in zip(prompts, first, second)])
        return 1.0 / (1.0 + np.exp(-diffs.astype(np.float64)))

    def judge_pairs(self, prompts: Sequence[str], first: Sequence[str], second: Sequence[str]) -> np.ndarray:
        n = len(prompts)
        both = self.first_wins(list(prompts) * 2, list(first) + list(second), list(second) + list(first))
        return (both[:n] + 1.0 - both[n:]) / 2.0
