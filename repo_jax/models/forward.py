"""A jitted, shape-bucketed forward pass of an NNX model over many token sequences.

Users of our JAX models that score whole sequences (the LLM judge and the reward model in
:mod:`repo_jax.annotators`, the lm-eval harness in :mod:`repo_jax.evals.harness`) run one forward
per sequence and read something off the *last* position (or every position). Sequences are sorted by length, cut into
micro-batches of ``batch_size``, left-padded (so the last column is every row's last token) to a
length bucket and a power-of-two batch bucket, and fed to one ``jax.jit`` function of the model
state: XLA compiles once per ``(batch, length)`` bucket, not once per call.

Padding follows the models' contract: ``attention_mask`` is 0 on padding and
``positions = max(cumsum(mask) - 1, 0)``, so padding never changes a row's result.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from repo_jax.padding import fit, ladder, positions_from_mask, round_up


class BucketedForward:
    """``fn(model, input_ids_BxT, positions_BxT, attention_mask_BxT) -> [B, ...]`` over lists of
    token ids, returning a numpy ``[N, ...]`` in input order.

    The model is split once (``nnx.split``); call :meth:`update` after changing its weights.
    """

    def __init__(self, model: nnx.Module, fn: Callable, *, batch_size: int = 16, max_len: int = 2048,
                 pad_id: int = 0, length_buckets: Sequence[int] = ()):
        self.batch_size, self.max_len, self.pad_id = int(batch_size), int(max_len), int(pad_id)
        self.buckets = tuple(sorted(length_buckets)) or ladder(self.max_len)
        self.shapes: set[tuple[int, int]] = set()  # (batch, length) buckets run so far
        self.update(model)
        graphdef = self._graphdef

        def forward(state, ids_BxT, pos_BxT, mask_BxT):
            return fn(nnx.merge(graphdef, state), ids_BxT, pos_BxT, mask_BxT)

        self._forward = jax.jit(forward)

    def update(self, model: nnx.Module) -> None:
        graphdef, self._state = nnx.split(model)
        if hasattr(self, "_graphdef") and graphdef != self._graphdef:
            raise ValueError("update() needs a model with the same structure as the one this was built with")
        self._graphdef = graphdef

    def __call__(self, seqs: Sequence[Sequence[int]]) -> np.ndarray:
        return np.stack(self.rows(seqs))

    def rows(self, seqs: Sequence[Sequence[int]]) -> list[np.ndarray]:
        """One result per sequence, in input order, unstacked (for results whose shape follows
        the length bucket, e.g. per-position values of a left-padded row)."""
        if not seqs:
            raise ValueError("no sequences to run")
        too_long = [len(s) for s in seqs if len(s) > self.max_len]
        if too_long:
            raise ValueError(f"a sequence of {too_long[0]} tokens exceeds max_len={self.max_len}")
        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
        outs: list[np.ndarray] = [None] * len(seqs)  # type: ignore[list-item]
        for start in range(0, len(order), self.batch_size):
            idx = order[start:start + self.batch_size]
            t = fit(max(len(seqs[i]) for i in idx), self.buckets)
            b = min(round_up(len(idx)), self.batch_size)
            ids = np.full((b, t), self.pad_id, np.int32)
            mask = np.zeros((b, t), np.int32)
            for r, i in enumerate(idx):
                ids[r, t - len(seqs[i]):], mask[r, t - len(seqs[i]):] = seqs[i], 1
            mask[len(idx):, -1] = 1  # padding rows: one dummy token each, results discarded
            self.shapes.add((b, t))
            res = np.asarray(self._forward(self._state, ids, positions_from_mask(mask), mask))
            for r, i in enumerate(idx):
                outs[i] = res[r]
        return outs


def last_logits(model, ids_BxT, pos_BxT, mask_BxT):
    """Float32 logits ``[B, V]`` at the last position; only that position is unembedded when the
    model exposes ``hidden_states`` and ``logits`` (our ports), else ``model(...)[:, -1]``."""
    if hasattr(model, "hidden_states") and hasattr(model, "logits"):
        h_BxTxD = model.hidden_states(ids_BxT, pos_BxT, mask_BxT)
        return model.logits(h_BxTxD[:, -1:])[:, 0].astype(jnp.float32)
    return model(ids_BxT, pos_BxT, mask_BxT)[:, -1].astype(jnp.float32)
