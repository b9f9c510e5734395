"""Chat-formatting, truncation, response masks and padding to length buckets.

Two training layouts (``repo_jax.training.batch``): ``collate_shared`` writes one row per example
(the prompt once, then each response; segment ids and positions let the model attend
block-causally), ``collate_responses`` one row per response. The rows layout of one training
sequence (``collate_responses``), right-padded to a bucket ``T``::

    input_ids_BxKxT[b, k]  = prompt tokens | response tokens | pad
    attention_mask_BxKxT   = 1 on prompt and response tokens, 0 on padding
    positions_BxKxT        = max(cumsum(attention_mask) - 1, 0)
    loss_mask_BxKxT[b,k,t] = 1 iff input_ids[b, k, t + 1] is a response token

The loss mask is aligned with *targets*, like :mod:`repo_jax.logprobs`: hidden state ``t``
predicts token ``t + 1``, so callers pass ``hidden[..., :-1, :]``, ``input_ids[..., 1:]`` and
``loss_mask[..., :-1]`` (its last column is always 0). Prompt tokens and padding never count.

The response text is whatever the chat template renders after the prompt (for SmolLM2 the
content, then ``<|im_end|>\\n``), tokenised separately from the prompt: exactly the tokens a
sampler continuing the prompt would have to produce. Prompts keep their *last*
``max_prompt_len`` tokens (the question usually comes last); responses keep their *first*
``max_response_len`` tokens.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from repo_jax import padding

ROLE_NAMES = {"user": "Human", "assistant": "Assistant"}


class Formatter:
    """Renders a conversation and its responses into token ids with a tokenizer.

    With ``chat_template`` (and a tokenizer that has one) prompts are rendered with
    ``add_generation_prompt=True`` and a response is the rest of the rendering of the
    conversation plus that assistant turn. Otherwise the conversation is an HH-style transcript
    ``\\n\\nHuman: ...\\n\\nAssistant:`` and the response is `` text`` plus the EOS token.
    """

    def __init__(self, tokenizer, *, chat_template: bool = True):
        self.tokenizer = tokenizer
        self.chat = bool(chat_template and getattr(tokenizer, "chat_template", None))

    def prompt_text(self, messages: Sequence[dict]) -> str:
        if self.chat:
            return self.tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=False)
        return "".join(f"\n\n{ROLE_NAMES.get(m['role'], m['role'].capitalize())}: {m['content']}" for m in messages) + "\n\nAssistant:"

    def response_text(self, messages: Sequence[dict], response: str, prompt_text: str | None = None) -> str:
        prompt_text = self.prompt_text(messages) if prompt_text is None else prompt_text
        if not self.chat:
            return " " + response + (self.tokenizer.eos_token or "")
        full = self.tokenizer.apply_chat_template(
            list(messages) + [{"role": "assistant", "content": response}], tokenize=False)
        if not full.startswith(prompt_text):
            raise ValueError("the tokenizer's chat template does not render the prompt as a prefix of the prompt "
                             "plus response; set data.chat_template=false")
        return full[len(prompt_text):]

    def prompt_ids(self, messages: Sequence[dict]) -> list[int]:
        return self._encode(self.prompt_text(messages), special=not self.chat)

    def encode(self, messages: Sequence[dict], responses: Sequence[str]) -> tuple[list[int], list[list[int]]]:
        """``(prompt_ids, [response_ids, ...])``, untruncated."""
        ptext = self.prompt_text(messages)
        return (self._encode(ptext, special=not self.chat),
                [self._encode(self.response_text(messages, r, ptext), special=False) for r in responses])

    def _encode(self, text: str, *, special: bool) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=special))


def truncate(prompt_ids: Sequence[int], responses_ids: Sequence[Sequence[int]], *, max_prompt_len: int,
             max_response_len: int) -> tuple[list[int], list[list[int]]]:
    """Prompt from the left (keeps its end), responses from the right (keep their start)."""
    return list(prompt_ids[-max_prompt_len:]), [list(r[:max_response_len]) for r in responses_ids]


def collate_responses(items: Sequence[dict | None], *, batch_size: int, num_responses: int,
                      buckets: Sequence[int], pad_id: int = 0) -> dict[str, np.ndarray]:
    """Pads encoded examples into one batch (layout in the module docstring).

    Each item has ``prompt_ids``, ``response_ids`` (list of K_i lists), ``scores`` (K_i floats or
    empty), ``pref`` (float or None) and ``row``; None items and the rows missing to reach
    ``batch_size`` are padding (``example_mask_B`` False, everything else zero).
    """
    b, k = batch_size, num_responses
    seqs = [(it["prompt_ids"], r) for it in items if it for r in it["response_ids"]]
    t = padding.fit(max([len(p) + len(r) for p, r in seqs] or [1]), buckets)
    ids = np.full((b, k, t), pad_id, np.int32)
    attn = np.zeros((b, k, t), np.int32)
    loss = np.zeros((b, k, t), np.int32)
    for i, it in enumerate(items):
        if not it:
            continue
        p = it["prompt_ids"]
        for j, r in enumerate(it["response_ids"]):
            n = len(p) + len(r)
            ids[i, j, :n] = list(p) + list(r)
            attn[i, j, :n] = 1
            padding.mark_response(loss[i, j], len(p), n)
    return {
        "input_ids_BxKxT": ids, "attention_mask_BxKxT": attn, "positions_BxKxT": padding.positions_from_mask(attn),
        "loss_mask_BxKxT": loss, **_example_fields(items, b, k),
    }


def _example_fields(items: Sequence[dict | None], b: int, k: int) -> dict[str, np.ndarray]:
    """The per-example fields of either layout: ``scores_BxK``, ``list_mask_BxK`` (the responses an
    item has), ``pref_B`` (1/2 when absent), ``example_mask_B``, ``row_B`` (-1 on padding)."""
    scores = np.zeros((b, k), np.float32)
    list_mask = np.zeros((b, k), bool)
    pref = np.full((b,), 0.5, np.float32)
    ex_mask = np.zeros((b,), bool)
    row = np.full((b,), -1, np.int32)
    for i, it in enumerate(items):
        if not it:
            continue
        if len(it["response_ids"]) > k:
            raise ValueError(f"example {it['row']} has {len(it['response_ids'])} responses, more than K={k}")
        ex_mask[i], row[i] = True, it["row"]
        list_mask[i, :len(it["response_ids"])] = True
        if it.get("pref") is not None:
            pref[i] = it["pref"]
        if it.get("scores"):
            scores[i, :len(it["scores"])] = it["scores"]
    return {"scores_BxK": scores, "list_mask_BxK": list_mask, "pref_B": pref, "example_mask_B": ex_mask, "row_B": row}


def shared_length(item: dict) -> int:
    """Tokens of one example's shared-prefix row: its prompt once plus every response."""
    return len(item["prompt_ids"]) + sum(len(r) for r in item["response_ids"])


def collate_shared(items: Sequence[dict | None], *, batch_size: int, num_responses: int,
                   buckets: Sequence[int], pad_id: int = 0) -> dict[str, np.ndarray]:
    """Pads encoded examples into one shared-prefix batch (``repo_jax.training.batch``): one row
    per example, ``prompt | response 0 | ... | response K_i - 1 | pad``, right-padded to the
    smallest bucket that holds the longest row; segment ids 0 / ``k + 1`` / -1 and positions that
    restart at the prompt's end for every response. Items as in :func:`collate_responses`."""
    b, k = batch_size, num_responses
    t = padding.fit(max([shared_length(it) for it in items if it] or [1]), buckets)
    ids = np.full((b, t), pad_id, np.int32)
    seg = np.full((b, t), -1, np.int32)
    pos = np.zeros((b, t), np.int32)
    fields = _example_fields(items, b, k)
    for i, it in enumerate(items):
        if not it:
            continue
        p = it["prompt_ids"]
        n = at = len(p)
        ids[i, :n], seg[i, :n], pos[i, :n] = p, 0, np.arange(n)
        for j, r in enumerate(it["response_ids"]):
            ids[i, at:at + len(r)], seg[i, at:at + len(r)], pos[i, at:at + len(r)] = r, j + 1, np.arange(n, n + len(r))
            at += len(r)
    return {"input_ids_BxT": ids, "segment_ids_BxT": seg, "positions_BxT": pos, **fields}


def collate_prompts(items: Sequence[dict | None], *, batch_size: int, buckets: Sequence[int],
                    pad_id: int = 0) -> dict[str, np.ndarray]:
    """Left-pads prompts (ready for a sampler: the last column is every prompt's last token).

    Returns ``prompt_ids_BxT``, ``attention_mask_BxT``, ``positions_BxT``, ``prompt_len_B``,
    ``example_mask_B``, ``row_B`` and ``prompt_text_B`` (the conversation as plain text, for
    annotators; an object array, so keep it off the device).
    """
    b = batch_size
    t = padding.fit(max([len(it["prompt_ids"]) for it in items if it] or [1]), buckets)
    ids = np.full((b, t), pad_id, np.int32)
    attn = np.zeros((b, t), np.int32)
    lens = np.zeros((b,), np.int32)
    ex_mask = np.zeros((b,), bool)
    row = np.full((b,), -1, np.int32)
    text = np.full((b,), "", object)
    for i, it in enumerate(items):
        if not it:
            continue
        p = it["prompt_ids"]
        ids[i, t - len(p):], attn[i, t - len(p):] = p, 1
        lens[i], ex_mask[i], row[i], text[i] = len(p), True, it["row"], it["prompt_text"]
    return {"prompt_ids_BxT": ids, "attention_mask_BxT": attn, "positions_BxT": padding.positions_from_mask(attn),
            "prompt_len_B": lens, "example_mask_B": ex_mask, "row_B": row, "prompt_text_B": text}


def unpad_prompts(prompt_ids_BxT: np.ndarray, prompt_len_B: np.ndarray, example_mask_B: np.ndarray) -> list[list[int]]:
    """The token-id lists of the real prompts of a prompt batch (what ``sampling.generate`` takes)."""
    t = prompt_ids_BxT.shape[1]
    return [prompt_ids_BxT[i, t - n:].tolist() for i, n in enumerate(prompt_len_B) if example_mask_B[i]]


def plain_prompt(messages: Sequence[dict]) -> str:
    """A conversation as plain text for annotators: the content of a lone user turn as is,
    longer conversations as ``Role: content`` paragraphs."""
    if len(messages) == 1:
        return messages[0]["content"]
    return "\n\n".join(f"{ROLE_NAMES.get(m['role'], m['role'].capitalize())}: {m['content']}" for m in messages)
