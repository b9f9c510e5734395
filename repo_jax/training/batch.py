"""The training batch: one dict of arrays, every leaf with the prompt batch ``B`` first.

The field names are shared with the data pipeline (``repo_jax.data.tokenize.collate_shared`` and
``collate_responses`` produce exactly these); this module is where the train step's side of the
contract lives. ``K`` responses per prompt (2 for pairwise losses). Two token layouts
(``train.layout``), told apart by their fields:

**shared** (the default): one row per example, its prompt once and then each of its K
responses, right-padded to a length bucket ``T``::

    input_ids_BxT    int32  prompt | response 0 | response 1 | ... | pad
    segment_ids_BxT  int32  0 on the prompt, k + 1 on response k, -1 on padding
    positions_BxT    int32  0 .. P-1 on the prompt; every response continues from P
    list_mask_BxK    bool   present responses (required: it carries K)

The model attends block-causally (a response token sees the prompt and its own earlier tokens,
never another response: ``models.layers.make_context``), so each response's log-prob equals the
one of its own ``prompt | response`` row, while the prompt is run once per example instead of K
times.

**rows**: one row per response, ``T`` tokens per row (prompt + response, right-padded).

Rows layout, always present:
  ``input_ids_BxKxT``      int32   prompt | response | pad tokens of each row.
  ``loss_mask_BxKxT``      int32   1 iff token ``t + 1`` is a response token (aligned with the
                                   *targets*: hidden ``t`` predicts token ``t + 1``; the last
                                   column is 0), as in ``repo_jax.logprobs``.
Rows layout, optional:
  ``attention_mask_BxKxT`` int32   1 on real tokens, 0 on padding (default: all 1).
  ``positions_BxKxT``      int32   RoPE positions (default: the model's own from the mask).
Either layout, optional:
  ``example_mask_B``       bool    False on padding prompts (excluded from every mean).
  ``ref_logps_BxK``        float32 reference log-probs (``train.reference = batch``).
  ``row_B``                int32   the example's row in the data (carried, never used here).
Per loss (see ``objectives.LOSSES``):
  ``pref_B``               float32 P(response 0 beats response 1): iREPO, soft DPO.
  ``scores_BxK``           float32 explicit rewards: LPO, InfoNCA.
  ``list_mask_BxK``        bool    present responses of a ragged list (default: all present).
Pairwise DPO/IPO put the chosen response at ``k = 0``, the rejected at ``k = 1``.
Datasets with separate ``a``/``b`` fields go through :func:`stack_pair`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Batch = dict[str, Any]

HOST_ONLY = ("prompt_text_B",)  # strings: never sent to devices
TOKEN_FIELDS = ("input_ids_BxKxT", "loss_mask_BxKxT", "positions_BxKxT", "attention_mask_BxKxT")
SHARED_TOKEN_FIELDS = ("input_ids_BxT", "segment_ids_BxT", "positions_BxT")
REQUIRED = ("input_ids_BxKxT", "loss_mask_BxKxT")
SHARED_REQUIRED = (*SHARED_TOKEN_FIELDS, "list_mask_BxK")
DTYPES = {
    "input_ids_BxT": np.int32,
    "segment_ids_BxT": np.int32,
    "positions_BxT": np.int32,
    "input_ids_BxKxT": np.int32,
    "loss_mask_BxKxT": np.int32,
    "positions_BxKxT": np.int32,
    "attention_mask_BxKxT": np.int32,
    "example_mask_B": np.bool_,
    "ref_logps_BxK": np.float32,
    "pref_B": np.float32,
    "scores_BxK": np.float32,
    "list_mask_BxK": np.bool_,
    "row_B": np.int32,
}


def shape_of(name: str, b: int, k: int, t: int) -> tuple[int, ...]:
    """The shape a field must have, read off its name's suffix."""
    suffix = name.rsplit("_", 1)[1]
    return tuple({"B": b, "K": k, "T": t}[c] for c in suffix.split("x"))


def is_shared(batch: Mapping[str, Any]) -> bool:
    """Whether ``batch`` is in the shared-prefix layout (it has ``segment_ids_BxT``)."""
    return "segment_ids_BxT" in batch


def dims(batch: Mapping[str, Any]) -> tuple[int, int, int]:
    """``(B, K, T)`` of either layout (static shapes; works on tracers)."""
    if is_shared(batch):
        b, t = batch["input_ids_BxT"].shape
        return b, batch["list_mask_BxK"].shape[1], t
    return tuple(batch["input_ids_BxKxT"].shape)


def validate(batch: Mapping[str, Any], *, needs: tuple[str, ...] = ()) -> tuple[int, int, int]:
    """Checks names, shapes and that ``needs`` are present; returns ``(B, K, T)``.

    Raises one clear error naming the field at fault.
    """
    shared = is_shared(batch)
    for name in (*(SHARED_REQUIRED if shared else REQUIRED), *needs):
        if name not in batch:
            raise KeyError(f"batch field {name!r} is missing (fields present: {sorted(batch)})")
    unknown = sorted(set(batch) - set(DTYPES) - set(HOST_ONLY))
    if unknown:
        raise KeyError(f"unknown batch field {unknown[0]!r}; known fields: {sorted(DTYPES)}")
    other = set(TOKEN_FIELDS if shared else SHARED_TOKEN_FIELDS) & set(batch)
    if other:
        raise KeyError(f"batch field {sorted(other)[0]!r} belongs to the other token layout "
                       f"({'rows' if shared else 'shared'}); a batch holds one layout")
    b, k, t = (np.shape(batch["input_ids_BxT"])[0], np.shape(batch["list_mask_BxK"])[1],
               np.shape(batch["input_ids_BxT"])[1]) if shared else np.shape(batch["input_ids_BxKxT"])
    for name, x in batch.items():
        if name in HOST_ONLY:
            continue
        want = shape_of(name, b, k, t)
        if tuple(np.shape(x)) != want:
            raise ValueError(f"batch field {name!r} has shape {tuple(np.shape(x))}, expected {want}")
    return b, k, t


def cast(batch: Mapping[str, Any]) -> Batch:
    """Numpy arrays with the canonical dtypes, host-only fields dropped (host side, before
    :func:`repo_jax.sharding.global_batch`)."""
    return {name: np.asarray(x, DTYPES[name]) for name, x in batch.items() if name not in HOST_ONLY}


def abstract(fields: tuple[str, ...], b: int, k: int, t: int, sharding=None) -> Batch:
    """``jax.ShapeDtypeStruct``s for the named fields (for ``lower`` / planning)."""
    return {f: jax.ShapeDtypeStruct(shape_of(f, b, k, t), DTYPES[f], sharding=sharding) for f in fields}


def stack_pair(batch_a: Mapping[str, Any], batch_b: Mapping[str, Any], **per_prompt) -> Batch:
    """Two single-response batches (``*_BxT`` token fields, same keys) -> one ``K = 2`` batch.

    ``batch_a``/``batch_b`` hold ``input_ids_BxT``, ``loss_mask_BxT`` and optionally
    ``positions_BxT``, ``attention_mask_BxT``, ``ref_logps_B``; ``per_prompt`` adds fields such as
    ``pref_B=...`` unchanged.
    """
    out: Batch = {}
    for name in batch_a:
        if name.endswith("_BxT"):
            out[name[: -len("_BxT")] + "_BxKxT"] = np.stack([batch_a[name], batch_b[name]], axis=1)
        elif name.endswith("_B"):
            out[name[: -len("_B")] + "_BxK"] = np.stack([batch_a[name], batch_b[name]], axis=1)
        else:
            raise KeyError(f"stack_pair: field {name!r} has no _BxT or _B suffix")
    out.update(per_prompt)
    return out


def rows(batch: Mapping[str, Any]) -> dict[str, Any]:
    """The token fields flattened to model rows ``R = B * K``: ``*_BxKxT`` -> ``*_RxT``."""
    out = {}
    for name in TOKEN_FIELDS:
        if name in batch:
            x = batch[name]
            out[name.replace("_BxKxT", "_RxT")] = jnp.reshape(x, (-1, x.shape[-1]))
    return out


def model_inputs(batch: Mapping[str, Any]) -> dict[str, Any]:
    """The model's keyword arguments for either layout: ``input_ids_BxT``, ``positions_BxT``,
    ``attention_mask_BxT``, ``segment_ids_BxT`` (the rows layout's ``R = B * K`` rows are the
    model's batch; absent fields are None)."""
    if is_shared(batch):
        return {"input_ids_BxT": batch["input_ids_BxT"], "positions_BxT": batch["positions_BxT"],
                "attention_mask_BxT": None, "segment_ids_BxT": batch["segment_ids_BxT"]}
    r = rows(batch)
    return {"input_ids_BxT": r["input_ids_RxT"], "positions_BxT": r.get("positions_RxT"),
            "attention_mask_BxT": r.get("attention_mask_RxT"), "segment_ids_BxT": None}


def token_fields(batch: Mapping[str, Any]) -> tuple[str, ...]:
    """What the per-device log-prob pass reads of a layout: ids and loss mask, or ids and segments."""
    return ("input_ids_BxT", "segment_ids_BxT") if is_shared(batch) else ("input_ids_BxKxT", "loss_mask_BxKxT")


def response_tokens(batch: Mapping[str, Any]) -> jax.Array:
    """``[B, K]`` float32: how many tokens each response has (the tokens its log-prob sums);
    numpy for a host batch, jax inside a jitted function."""
    field = "segment_ids_BxT" if is_shared(batch) else "loss_mask_BxKxT"
    xp = np if isinstance(batch[field], np.ndarray) else jnp
    if is_shared(batch):
        k = batch["list_mask_BxK"].shape[1]
        seg_BxTx1 = batch["segment_ids_BxT"][..., None]
        return xp.sum(seg_BxTx1 == xp.arange(1, k + 1, dtype=seg_BxTx1.dtype), axis=1).astype(xp.float32)
    return xp.sum(batch["loss_mask_BxKxT"], -1).astype(xp.float32)


def example_mask(batch: Mapping[str, Any]) -> jax.Array:
    b = dims(batch)[0]
    return jnp.asarray(batch.get("example_mask_B", jnp.ones((b,), bool)), bool)


def split_micro(batch: Mapping[str, Any], m: int) -> Batch:
    """``[B, ...]`` -> ``[M, B / M, ...]`` with micro-batch ``j`` = rows ``j, j + M, j + 2M, ...``.

    The strided split keeps every micro-batch spread evenly over the devices that hold the
    batch (each device's contiguous rows contribute to every micro-batch), so no data moves.
    """

    def one(x):
        b = x.shape[0]
        if b % m:
            raise ValueError(f"batch size {b} is not divisible by train.micro_batches={m}")
        return jnp.swapaxes(jnp.reshape(x, (b // m, m, *x.shape[1:])), 0, 1)

    return {name: one(x) for name, x in batch.items()}
