"""Sharding is data: logical axis names -> mesh axes (``data``, ``fsdp``, ``tensor``).

Parameters carry logical axis names in their ``out_sharding`` metadata (``nnx.with_partitioning``
or ``nnx.Param(..., out_sharding=names)``); key activations are annotated with
:func:`constrain`. One rules table per layout maps every logical name to mesh axes; the
training layout shards weights over ``fsdp`` and ``tensor``, the sampling layout replicates
over ``fsdp`` (no all-gather per decoded token) and keeps ``tensor``.

Also here, because every program needs them the same way:
  * :class:`MeshConfig` / :func:`make_mesh`: the ``mesh`` section of a config -> a Mesh;
  * :func:`state_shardings`: any pytree of ``nnx.Variable``s (model state, train state with its
    optimiser moments) -> NamedShardings, the one mapping from logical names to layouts;
  * :func:`initialize_distributed`: multi-host start-up from the environment;
  * :func:`global_batch`: this host's rows -> global arrays sharded over the batch axes.

Logical names used by the models:
  parameters  ``vocab embed q_heads kv_heads head_dim mlp layers norm lora_rank``
  activations ``batch length act_embed act_heads act_mlp``
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import warnings
from collections.abc import Iterator, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# Each logical name maps to a mesh axis, a tuple of mesh axes, or None (replicated).
Rules = tuple[tuple[str, str | tuple[str, ...] | None], ...]

TRAIN_RULES: Rules = (
    ("batch", BATCH_AXES),
    ("length", None),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("q_heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("layers", None),
    ("norm", None),
    ("lora_rank", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_mlp", "tensor"),
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


@contextlib.contextmanager
def mesh_rules(mesh: jax.sharding.Mesh | None, rules: Rules) -> Iterator[None]:
    """``jax.set_mesh(mesh)`` and :func:`use_rules` together; nothing at all when ``mesh`` is None."""
    if mesh is None:
        yield
        return
    with jax.set_mesh(mesh), use_rules(rules):
        yield


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


# --------------------------------------------------------------------------------------------
# Meshes
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Sizes of the ``data``, ``fsdp`` and ``tensor`` mesh axes; one of them may be -1 (the rest).
    Their product is the device count. The default puts every device on ``fsdp``.

    data: devices that replicate the parameters (pure data parallelism, gradients all-reduced).
    fsdp: devices that shard the parameters and optimiser state along ``embed`` and the batch
      along rows.
    tensor: devices that shard heads, mlp and vocab (Megatron style).
    sharding_tolerance: the largest share of the train state a mesh may leave wholly
      unsharded because it does not divide the parameters' dimensions (:func:`state_shardings`).
    """

    data: int = 1
    fsdp: int = -1
    tensor: int = 1
    sharding_tolerance: float = 0.02  # see state_shardings: the largest share left wholly unsharded

    def shape(self, num_devices: int) -> tuple[int, int, int]:
        """The three axis sizes with -1 resolved; an error names the key that cannot fit."""
        sizes = {"data": self.data, "fsdp": self.fsdp, "tensor": self.tensor}
        for k, v in sizes.items():
            if v == 0 or v < -1:
                raise ValueError(f"mesh.{k} must be a positive size or -1 (the rest); got {v}")
        rest = [k for k, v in sizes.items() if v == -1]
        if len(rest) > 1:
            raise ValueError(f"only one mesh axis may be -1; got {', '.join('mesh.' + k for k in rest)}")
        known = math.prod(v for v in sizes.values() if v != -1)
        if rest:
            if num_devices % known:
                raise ValueError(
                    f"mesh.{rest[0]}=-1: {num_devices} devices are not divisible by the other axes' product {known}"
                )
            sizes[rest[0]] = num_devices // known
        if math.prod(sizes.values()) != num_devices:
            raise ValueError(
                f"mesh data*fsdp*tensor = {sizes['data']}*{sizes['fsdp']}*{sizes['tensor']} must equal the "
                f"{num_devices} devices"
            )
        return sizes["data"], sizes["fsdp"], sizes["tensor"]


def make_mesh(cfg: MeshConfig = MeshConfig(), devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
    """A ``(data, fsdp, tensor)`` mesh over ``devices`` (default: all) with Auto axis types.

    Auto (not Explicit) axis types: the compiler propagates shardings from the parameters and
    the few :func:`constrain` annotations, which is what the rules tables are written for.
    """
    devices = list(jax.devices() if devices is None else devices)
    shape = cfg.shape(len(devices))
    return jax.make_mesh(
        shape, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES), devices=devices
    )


def batch_axes(mesh: jax.sharding.Mesh) -> tuple[str, ...]:
    """The mesh axes that split the batch (``data``, ``fsdp``), in mesh order."""
    return tuple(a for a in BATCH_AXES if a in mesh.axis_names)


def batch_size_multiple(mesh: jax.sharding.Mesh) -> int:
    """Global batch sizes must be multiples of this (the product of the batch axes' sizes)."""
    return math.prod(mesh.shape[a] for a in batch_axes(mesh))


def batch_sharding(mesh: jax.sharding.Mesh) -> jax.NamedSharding:
    """Leading (batch) dimension split over ``data`` x ``fsdp``; every other dimension replicated."""
    return jax.NamedSharding(mesh, P(batch_axes(mesh)))


def replicated(mesh: jax.sharding.Mesh) -> jax.NamedSharding:
    return jax.NamedSharding(mesh, P())


# --------------------------------------------------------------------------------------------
# Parameter / state shardings from logical names
# --------------------------------------------------------------------------------------------


def _logical_names(x) -> tuple[str | None, ...] | None:
    from flax import nnx

    if not isinstance(x, nnx.Variable):
        return None
    meta = x.get_metadata()
    names = meta.get("out_sharding") or meta.get("sharding") or meta.get("sharding_names")
    return tuple(names) if names else None


SHARDING_TOLERANCE = 0.02  # the largest share of a state's elements left replicated by _fit_spec


def _fit_spec(spec: P, shape: tuple[int, ...] | None, mesh: jax.sharding.Mesh) -> tuple[P, list[str]]:
    """Drops mesh axes absent from (or of size 1 in) ``mesh``, and any that do not divide their
    dimension (that dimension is then replicated rather than failing at compile time). Returns
    the spec and what was replicated for not dividing (``"dim 1 (9) over tensor (2)"``)."""
    out, lost = [], []
    for i, entry in enumerate(spec):
        entry = _only_axes_in(mesh, entry)
        if entry is not None and shape is not None and i < len(shape):
            axes = (entry,) if isinstance(entry, str) else entry
            size = math.prod(mesh.shape[a] for a in axes)
            if shape[i] % size:
                lost.append(f"dim {i} ({shape[i]}) over {'x'.join(axes)} ({size})")
                entry = None
        out.append(entry)
    return P(*out), lost


def logical_sharding(names, shape, mesh: jax.sharding.Mesh, rules: Rules | None = None) -> jax.NamedSharding:
    """NamedSharding for an array of ``shape`` whose dimensions carry logical ``names`` (a mesh
    axis that does not divide its dimension is dropped: see :func:`state_shardings`)."""
    spec = logical_to_pspec(names, rules) if names else P()
    return jax.NamedSharding(mesh, _fit_spec(spec, shape, mesh)[0])


def state_shardings(state, mesh: jax.sharding.Mesh, rules: Rules | None = None, *,
                    tolerance: float = SHARDING_TOLERANCE):
    """A pytree of NamedShardings matching ``state`` (an ``nnx.State``, a train state, ...).

    Every ``nnx.Variable`` is laid out by its ``out_sharding`` metadata (logical names) through
    ``rules`` (default: the current table, :data:`TRAIN_RULES` unless :func:`use_rules` says
    otherwise); any other leaf (step counters, RNG keys, optimiser counts) is replicated.
    Optimiser moments built by ``optax`` from an ``nnx.State`` keep the Variables' metadata, so
    they get the same layout as their parameters. Works on abstract (``eval_shape``) trees too.

    A dimension the mesh does not divide is replicated instead, with a warning naming the
    variables and dimensions; when the variables so left wholly unsharded hold more than
    ``tolerance`` of the state's elements (as maxtext's ``sharding_tolerance``) it is an error:
    pick mesh sizes that divide the model's dimensions.
    """
    from flax import nnx

    if not 0.0 <= tolerance <= 1.0:
        raise ValueError(f"mesh.sharding_tolerance must be between 0 and 1, got {tolerance}")
    lost, sizes = [], {"all": 0, "lost": 0}

    def one(path, x):
        names = _logical_names(x)
        value = x.get_value() if isinstance(x, nnx.Variable) else x
        shape = getattr(value, "shape", None)
        spec = logical_to_pspec(names, rules) if names else P()
        spec, dropped = _fit_spec(spec, shape, mesh)
        n = math.prod(shape) if shape else 1
        sizes["all"] += n
        if dropped:
            if all(e is None for e in spec):  # nothing of it is split any more
                sizes["lost"] += n
            lost.append(f"{jax.tree_util.keystr(path, simple=True, separator='.')} {tuple(shape)}: {', '.join(dropped)}")
        return jax.NamedSharding(mesh, spec)

    out = jax.tree_util.tree_map_with_path(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))
    if lost:
        share = sizes["lost"] / max(sizes["all"], 1)
        shown = "; ".join(lost[:6]) + (f"; ... ({len(lost)} in all)" if len(lost) > 6 else "")
        msg = (f"the {dict(mesh.shape)} mesh does not divide some dimensions, replicated instead "
               f"({share:.1%} of the state's elements left unsharded): {shown}")
        if share > tolerance:
            raise ValueError(f"{msg}; that is over the sharding tolerance of {tolerance:.0%}: choose mesh sizes "
                             "(mesh.data / mesh.fsdp / mesh.tensor) that divide these dimensions, or raise "
                             "mesh.sharding_tolerance")
        warnings.warn(msg, stacklevel=2)
    return out


# --------------------------------------------------------------------------------------------
# Multi-host start-up and per-host data
# --------------------------------------------------------------------------------------------


def initialize_distributed(env: Mapping[str, str] | None = None) -> bool:
    """Calls ``jax.distributed.initialize()`` when the environment describes several processes.

    Recognised: ``JAX_COORDINATOR_ADDRESS`` (+ ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``; what
    ``launch/gpu.sh`` sets), a multi-host Cloud TPU slice (``TPU_WORKER_HOSTNAMES`` listing more
    than one host, or ``MEGASCALE_COORDINATOR_ADDRESS``), or ``REPO_JAX_DISTRIBUTED=1`` (let JAX
    auto-detect, e.g. under SLURM). Must run before anything touches the devices. Returns
    whether it initialised; a single host returns False and does nothing.
    """
    env = os.environ if env is None else env
    if jax.distributed.is_initialized():
        return False
    if env.get("JAX_COORDINATOR_ADDRESS"):
        kwargs = {"coordinator_address": env["JAX_COORDINATOR_ADDRESS"]}
        for key, arg in (("JAX_NUM_PROCESSES", "num_processes"), ("JAX_PROCESS_ID", "process_id")):
            if env.get(key):
                try:
                    kwargs[arg] = int(env[key])
                except ValueError:
                    raise ValueError(f"environment variable {key} must be an integer; got {env[key]!r}") from None
        jax.distributed.initialize(**kwargs)
        return True
    tpu_hosts = [h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]
    if len(tpu_hosts) > 1 or env.get("MEGASCALE_COORDINATOR_ADDRESS") or env.get("REPO_JAX_DISTRIBUTED") == "1":
        jax.distributed.initialize()
        return True
    return False


def process_batch_slice(global_batch_size: int) -> slice:
    """Rows of the global batch this process loads (equal contiguous blocks, in process order).

    With the batch sharded over ``data`` x ``fsdp`` and devices ordered by process (as
    ``jax.make_mesh`` does), process ``i`` holds rows ``[i * b, (i + 1) * b)``.
    """
    n, i = jax.process_count(), jax.process_index()
    if global_batch_size % n:
        raise ValueError(f"global batch size {global_batch_size} is not divisible by the {n} processes")
    per = global_batch_size // n
    return slice(i * per, (i + 1) * per)


def global_batch(local_batch, mesh: jax.sharding.Mesh):
    """Host-local numpy batch (this process's rows) -> global ``jax.Array``s sharded on rows.

    Every leaf's leading dimension is the batch; on one host this is a plain sharded
    ``device_put``; on several, each host passes only its own rows
    (``jax.make_array_from_process_local_data``).
    """
    sharding = batch_sharding(mesh)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local_batch)
