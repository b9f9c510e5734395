"""Sharding is data: logical axis names -> mesh axes (``data``, ``fsdp``, ``tensor``).

Parameters carry logical axis names in their ``out_sharding`` metadata (``nnx.with_partitioning``
or ``nnx.Param(..., out_sharding=names)``); key activations are annotated with
:func:`constrain`. One rules table per layout maps every logical name to mesh axes; the
training layout shards weights over ``fsdp`` and ``tensor``, the sampling layout replicates
over ``fsdp`` (no all-gather per decoded token) and keeps ``tensor``.

Logical names used by the models:
  parameters  ``vocab embed q_heads kv_heads head_dim mlp layers norm``
  activations ``batch length act_embed act_heads act_kv_heads act_mlp act_vocab cache_length``
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import jax
from jax.sharding import PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# Each logical name maps to a mesh axis, a tuple of mesh axes, or None (replicated).
Rules = tuple[tuple[str, str | tuple[str, ...] | None], ...]

TRAIN_RULES: Rules = (
    ("batch", BATCH_AXES),
    ("length", None),
    ("cache_length", None),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("q_heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("layers", None),
    ("norm", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
)

SAMPLE_RULES: Rules = tuple((k, None if k == "embed" else v) for k, v in TRAIN_RULES)

_current_rules: list[Rules] = [TRAIN_RULES]


@contextlib.contextmanager
def use_rules(rules: Rules) -> Iterator[None]:
    """Selects the rules table that :func:`constrain` and :func:`logical_to_pspec` use."""
    _current_rules.append(rules)
    try:
        yield
    finally:
        _current_rules.pop()


def current_rules() -> Rules:
    return _current_rules[-1]


def logical_to_pspec(names: Sequence[str | None] | None, rules: Rules | None = None) -> P:
    """``("batch", "length", "act_embed")`` -> ``P(("data", "fsdp"), None, None)``.

    A mesh axis is used at most once per spec; a later dimension that maps to an axis already
    taken is replicated instead (e.g. ``kv_heads`` and ``q_heads`` in one tensor).
    """
    if names is None:
        return P()
    table = dict(rules if rules is not None else current_rules())
    used: set[str] = set()
    out = []
    for name in names:
        if name is None:
            out.append(None)
            continue
        if name not in table:
            raise KeyError(f"logical axis {name!r} has no sharding rule; known: {sorted(table)}")
        axes = table[name]
        axes_t = (axes,) if isinstance(axes, str) else tuple(axes or ())
        axes_t = tuple(a for a in axes_t if a not in used)
        used.update(axes_t)
        out.append(None if not axes_t else axes_t[0] if len(axes_t) == 1 else axes_t)
    return P(*out)


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """Sharding constraint on an activation by logical names; a no-op outside a mesh."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty:
        return x
    spec = logical_to_pspec(names)
    spec = P(*(_only_axes_in(mesh, s) for s in spec))
    return jax.lax.with_sharding_constraint(x, spec)


def _only_axes_in(mesh, entry):
    if entry is None:
        return None
    axes = (entry,) if isinstance(entry, str) else tuple(entry)
    axes = tuple(a for a in axes if a in mesh.axis_names and mesh.shape[a] > 1)
    return None if not axes else axes[0] if len(axes) == 1 else axes
