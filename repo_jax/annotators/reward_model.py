"""Reward-model annotators: a scalar score per (prompt, response), compared Bradley-Terry style.

* :class:`JaxRewardModel`: one of our NNX models plus a :class:`ScoreHead` on its final hidden
  state, ``score = w . h_last + b`` (the usual reward-model head: the last token has read the
  whole conversation).
* :class:`HFRewardModel`: a ``transformers`` ``AutoModelForSequenceClassification`` checkpoint
  (``num_labels=1``) run through PyTorch; torch is imported only when one is built. HF pools
  at the last token that is not ``pad_token_id``; rows are left-padded, so that is the last
  token unless the rendered text itself ends with the pad token.

Both render ``[user: prompt, assistant: response]`` with the tokenizer's chat template (when it
has one), score each distinct response once per round (the cache of
:class:`~repo_jax.annotators.base.ScoreAnnotator`), and give
``p_ij = sigmoid((s_i - s_j) / temperature)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from repo_jax.annotators.base import ScoreAnnotator
from repo_jax.models.forward import BucketedForward
from repo_jax.data.tokenize import Formatter


class ScoreHead(nnx.Module):
    """``score_B = h_BxD . w_D + b`` in float32."""

    def __init__(self, dim: int, *, rngs: nnx.Rngs | None = None):
        """Zero weights (every response ties) unless ``rngs`` is given: then ``N(0, 1/dim)``."""
        w = jnp.zeros((dim,), jnp.float32) if rngs is None else \
            jax.random.normal(rngs.params(), (dim,), jnp.float32) / dim**0.5
        self.w = nnx.Param(w)
        self.b = nnx.Param(jnp.zeros((), jnp.float32))

    def __call__(self, h_BxD):
        return jnp.einsum("BD,D->B", h_BxD.astype(jnp.float32), self.w[...]) + self.b[...]


def _render(formatter: Formatter, prompt: str, response: str) -> list[int]:
    msgs = [{"role": "user", "content": prompt}]
    p_ids, (r_ids,) = formatter.encode(msgs, [response])
    return p_ids + r_ids


class JaxRewardModel(ScoreAnnotator):
    """Scores with ``head(model.hidden_states(...)[:, -1])``; a model without ``hidden_states``
    must return hidden states ``[B, T, D]`` from its call."""

    name = "reward_model"

    def __init__(self, model: nnx.Module, head: ScoreHead, tokenizer, *, temperature: float = 1.0,
                 chat_template: bool = True, max_len: int = 2048, batch_size: int = 16, name: str | None = None):
        super().__init__(temperature=temperature, name=name)
        self.formatter = Formatter(tokenizer, chat_template=chat_template)
        self.max_len = int(max_len)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.forward = BucketedForward(_Scorer(model, head), _score_last, batch_size=batch_size, max_len=max_len,
                                       pad_id=pad)

    def score_batch(self, prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray:
        return self.forward([_render(self.formatter, p, r)[-self.max_len:] for p, r in zip(prompts, responses)])


class _Scorer(nnx.Module):
    def __init__(self, model, head):
        self.model, self.head = model, head


def _score_last(m: _Scorer, ids_BxT, pos_BxT, mask_BxT):
    body = m.model
    h_BxTxD = body.hidden_states(ids_BxT, pos_BxT, mask_BxT) if hasattr(body, "hidden_states") else \
        body(ids_BxT, pos_BxT, mask_BxT)
    return m.head(h_BxTxD[:, -1])  # left-padded: the last column is every row's last token


class HFRewardModel(ScoreAnnotator):
    """A ``transformers`` sequence-classification reward model from a local folder (safetensors
    only, no remote code), scored on CPU in float32 unless ``device``/``dtype`` say otherwise."""

    name = "hf_reward_model"

    def __init__(self, path: str, *, temperature: float = 1.0, chat_template: bool = True, max_len: int = 2048,
                 batch_size: int = 8, device: str = "cpu", name: str | None = None):
        super().__init__(temperature=temperature, name=name)
        try:
            import torch
            from transformers import AutoModelForSequenceClassification, AutoTokenizer
        except ImportError as e:
            raise ImportError(f"HFRewardModel needs torch and transformers ({e}); pip install torch") from e
        self._torch = torch
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModelForSequenceClassification.from_pretrained(path, use_safetensors=True).to(device).eval()
        if self.model.config.num_labels != 1:
            raise ValueError(f"{path}: a reward model has num_labels=1, this one has {self.model.config.num_labels}")
        pad = self.tokenizer.pad_token_id
        if pad is None:
            pad = self.tokenizer.eos_token_id
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = pad
        self.pad_id, self.device = pad, device
        self.formatter = Formatter(self.tokenizer, chat_template=chat_template)
        self.max_len, self.batch_size = int(max_len), int(batch_size)

    def score_batch(self, prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray:
        torch = self._torch
        seqs = [_render(self.formatter, p, r)[-self.max_len:] for p, r in zip(prompts, responses)]
        out = np.zeros(len(seqs), np.float64)
        for s in range(0, len(seqs), self.batch_size):
            chunk = seqs[s:s + self.batch_size]
            t = max(len(x) for x in chunk)
            ids = torch.full((len(chunk), t), self.pad_id, dtype=torch.long)
            mask = torch.zeros((len(chunk), t), dtype=torch.long)
            for r, x in enumerate(chunk):  # left padding: the last column is every row's last token
                ids[r, t - len(x):], mask[r, t - len(x):] = torch.tensor(x), 1
            pos = (mask.cumsum(-1) - 1).clamp(min=0)  # padding must not shift positions
            with torch.no_grad():
                logits = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                                    position_ids=pos.to(self.device)).logits
            out[s:s + len(chunk)] = logits[:, 0].float().cpu().numpy()
        return out
