"""Our models behind the LM Evaluation Harness: an ``lm_eval.api.model.TemplateLM`` subclass.

lm-eval 0.4.x does not discover third-party models from its own ``lm_eval`` command line, so
the harness runs in-process::

    import lm_eval
    from lm_eval.tasks import TaskManager
    from repo_jax.evals.harness import JaxLM

    lm = JaxLM.load("smollm2")                      # HF folder, .gguf file or the alias
    out = lm_eval.simple_evaluate(model=lm, tasks=["my_task"],
                                  task_manager=TaskManager(include_path="my_tasks/"))

(``python -m repo_jax.evaluate lm-eval`` does exactly this and prints / saves the table.)

* ``loglikelihood``: ``(context, continuation)`` -> ``(sum of the continuation's token
  log-probs, whether every continuation token is the argmax)``. Rows are sorted by length and
  run through :class:`~repo_jax.models.forward.BucketedForward` (one compiled program per
  ``(batch, length)`` bucket), float32 log-probs from the chunked unembedding.
* ``loglikelihood_rolling``: the whole text's log-prob, in lm-eval's disjoint rolling windows of
  ``max_length`` tokens (each token predicted once, with as much context as fits), the first
  window conditioned on ``prefix_token_id``. lm-eval renders no chat template here (the request
  is the document alone), so ``apply_chat_template`` leaves perplexities unchanged.
* ``generate_until``: greedy (or ``do_sample`` with ``temperature`` / ``top_p`` / ``top_k``)
  continuations of up to ``max_gen_toks`` tokens from :func:`repo_jax.sampling.sample`, stopped
  at the tokenizer's EOS and cut before the first ``until`` string.

Tokenization follows lm-eval's own ``hf`` model (``lm_eval.models.huggingface.HFLM``), so the
two score the same token ids for the same checkpoint:

* ``prefix_token_id`` (the one token before a document or an empty context): the given id, else
  the tokenizer's BOS, else its EOS (``TemplateLM``'s default is always EOS);
* ``add_bos_token=None`` keeps the tokenizer's own habit (``encode``'s default
  ``add_special_tokens``: a Llama-style tokenizer adds BOS, SmolLM2's adds nothing);
  ``True`` / ``False`` force special tokens on / off; text that already starts with the prefix
  token's text (a chat-templated prompt) gets none added;
* ``apply_chat_template`` passes ``continue_final_message`` (an assistant prefill stays open)
  and retries without the system message when the template rejects one.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np

from repo_jax import logprobs, sampling
from repo_jax import sharding as shd
from repo_jax.models.forward import BucketedForward

try:
    from lm_eval.api.model import TemplateLM
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
except ImportError as e:  # pragma: no cover - exercised by the program's error message
    raise ImportError("the LM Evaluation Harness is an optional extra: pip install -e .[eval]") from e


def token_scores(model, ids_BxT, pos_BxT, mask_BxT, *, chunk: int = 128):
    """``[B, T - 1, 2]`` float32: per target ``ids[:, t + 1]``, its log-prob and 1.0 where it is
    the argmax of the logits at ``t``."""
    h_BxTxD = model.hidden_states(ids_BxT, pos_BxT, mask_BxT)
    w_DxV, b_V = model.unembedding()
    logp_BxT, greedy_BxT = logprobs.token_logprobs_greedy(h_BxTxD[:, :-1], w_DxV, ids_BxT[:, 1:], b_V, chunk_size=chunk)
    return jnp.stack([logp_BxT, greedy_BxT.astype(jnp.float32)], axis=-1)


def cut_at_stops(text: str, until: Sequence[str]) -> str:
    """``text`` up to (without) the earliest occurrence of any non-empty ``until`` string."""
    ends = [i for i in (text.find(s) for s in until if s) if i >= 0]
    return text[:min(ends)] if ends else text


class JaxLM(TemplateLM):
    """``model``: one of our NNX causal LMs; ``tokenizer``: its HF tokenizer.

    ``batch_size`` rows per forward / sampler call; ``max_length`` the longest row scored
    (default: the model's context, at most 2048; lm-eval's ``hf`` model takes the whole context,
    so give both the same ``max_length`` to compare documents longer than 2048 tokens);
    ``mesh``: optional, passed to the sampler (the model's parameters already laid out on it by
    ``from_pretrained(mesh=...)``). ``add_bos_token``, ``prefix_token_id`` and
    ``chat_template_args`` mean what they mean to ``HFLM`` (see the module's docstring).
    """

    def __init__(self, model, tokenizer, *, batch_size: int = 16, max_length: int | None = None,
                 max_gen_toks: int = 256, mesh=None, model_id: str = "repo_jax",
                 add_bos_token: bool | None = None, prefix_token_id: int | None = None,
                 chat_template_args: dict | None = None):
        super().__init__()
        self.model = sampling.sampling_copy(model, mesh)
        self.tokenizer = tokenizer
        self.batch_size, self.mesh, self.model_id = int(batch_size), mesh, model_id
        self.add_bos_token = add_bos_token
        self.custom_prefix_token_id = prefix_token_id
        self.chat_template_args = dict(chat_template_args or {})
        self.max_length = int(max_length or min(model.config.max_position_embeddings, 2048))
        self.max_gen_toks = int(max_gen_toks)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eot_token_id
        self._forward = BucketedForward(self.model, token_scores, batch_size=self.batch_size,
                                        max_len=self.max_length + 1, pad_id=self.pad_id)

    @classmethod
    def load(cls, path: str, *, dtype=jnp.float32, mesh=None, **kwargs) -> "JaxLM":
        from repo_jax import models
        from repo_jax.assets import load_tokenizer, resolve_model_path

        resolved = resolve_model_path(path)
        model = models.from_pretrained(str(resolved), dtype=dtype)
        return cls(model, load_tokenizer(resolved), mesh=mesh, model_id=kwargs.pop("model_id", str(path)), **kwargs)

    # ---- TemplateLM's contract ---------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return int(self.tokenizer.eos_token_id)

    @property
    def prefix_token_id(self) -> int:
        """The token before a document (rolling) or an empty context: as HFLM, the given id, else
        BOS, else EOS."""
        if self.custom_prefix_token_id is not None:
            return int(self.custom_prefix_token_id)
        if self.tokenizer.bos_token_id is not None:
            return int(self.tokenizer.bos_token_id)
        return self.eot_token_id

    @property
    def tokenizer_name(self) -> str:
        return getattr(self.tokenizer, "name_or_path", self.model_id).replace("/", "__")

    def _special_kwargs(self, add_special_tokens: bool | None) -> dict:
        """``encode``'s ``add_special_tokens``: the caller's choice, else ``add_bos_token``, else
        none given (the tokenizer's default)."""
        if add_special_tokens is not None:
            return {"add_special_tokens": bool(add_special_tokens)}
        if self.add_bos_token is not None:
            return {"add_special_tokens": bool(self.add_bos_token)}
        return {}

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len: int | None = None,
                   **kwargs) -> list[int]:
        """HFLM's ``tok_encode``: no special tokens are added to text that already starts with the
        prefix token's text (e.g. a chat-templated ``<|im_start|>...``)."""
        kw = self._special_kwargs(add_special_tokens)
        if add_special_tokens is None and string.startswith(self.tokenizer.decode([self.prefix_token_id])):
            kw["add_special_tokens"] = False
        ids = self.tokenizer.encode(string, **kw)
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def _encode_prompt(self, string: str) -> list[int]:
        """A generation prompt, encoded as HFLM's ``tok_batch_encode`` does (which checks the
        tokenizer's ``bos_token`` text rather than the prefix token's)."""
        bos = self.tokenizer.bos_token
        if bos is not None and string.startswith(bos):
            return self.tokenizer.encode(string, add_special_tokens=False)
        return self.tokenizer.encode(string, **self._special_kwargs(None))

    def tok_decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """As HFLM: ``continue_final_message`` when no generation prompt is added (lm-eval's
        assistant prefill, ``gen_prefix``), and a second try without the system message when the
        template raises on one."""
        import jinja2

        def render(history):
            return self.tokenizer.apply_chat_template(
                history, tokenize=False, add_generation_prompt=add_generation_prompt,
                continue_final_message=not add_generation_prompt, **self.chat_template_args)

        try:
            return render(chat_history)
        except jinja2.exceptions.TemplateError:
            return render([m for m in chat_history if m["role"] != "system"])

    # ---- scoring -------------------------------------------------------------------------------
    def score_tokens(self, pairs: Sequence[tuple[Sequence[int], Sequence[int]]]) -> list[tuple[float, bool]]:
        """``(context ids, continuation ids)`` -> ``(log p(continuation | context), is_greedy)``.

        A row longer than ``max_length + 1`` tokens keeps its end (the context is cut from the
        left, as lm-eval's own models do); the continuation must fit.
        """
        rows, lens = [], []
        for ctx, cont in pairs:
            if not cont:
                raise ValueError("loglikelihood: an empty continuation has no tokens to score")
            if len(cont) > self.max_length:
                raise ValueError(f"loglikelihood: a continuation of {len(cont)} tokens exceeds max_length={self.max_length}")
            seq = (list(ctx) + list(cont))[-(self.max_length + 1):]
            rows.append(seq)
            lens.append(len(cont))
        with shd.mesh_rules(self.mesh, shd.SAMPLE_RULES):
            scored = self._forward.rows(rows)
        out = []
        for res_Tx2, n in zip(scored, lens):
            tail = res_Tx2[-n:]
            out.append((float(tail[:, 0].sum()), bool(tail[:, 1].all())))
        return out

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        results = self.score_tokens([(ctx, cont) for _, ctx, cont in requests])
        for (key, _, _), res in zip(requests, results):
            self.cache_hook.add_partial("loglikelihood", key, res)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows, owner = [], []
        for i, req in enumerate(requests):
            (text,) = req.args
            for ctx, cont in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((ctx, cont))
                owner.append(i)
        totals = np.zeros(len(requests), np.float64)
        for i, (logp, _) in zip(owner, self.score_tokens(windows)):
            totals[i] += logp
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, float(total))
        return totals.tolist()

    # ---- generation ------------------------------------------------------------------------------
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(i)
        out: list[str] = [""] * len(requests)
        for idx in groups.values():
            kw = dict(requests[idx[0]].args[1])
            until = kw.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kw.pop("max_gen_toks", self.max_gen_toks))
            sample = bool(kw.pop("do_sample", False))
            temperature = float(kw.pop("temperature", 0.0)) if sample else 0.0
            top_p, top_k = kw.pop("top_p", None), kw.pop("top_k", None)
            keep = max(1, self.max_length - max_new)
            prompts = [self._encode_prompt(requests[i].args[0])[-keep:] or [self.prefix_token_id] for i in idx]
            for start in range(0, len(idx), self.batch_size):
                res = sampling.sample(self.model, prompts[start:start + self.batch_size], max_new_tokens=max_new,
                                      temperature=temperature, top_p=top_p, top_k=top_k, eos_id=self.eot_token_id,
                                      pad_id=self.pad_id, seed=start, mesh=self.mesh)
                for j, (row, n) in enumerate(zip(res.tokens_BxS, res.lengths_B)):
                    i = idx[start + j]
                    text = cut_at_stops(self.tok_decode(row[:n]), until)
                    out[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
        return out
