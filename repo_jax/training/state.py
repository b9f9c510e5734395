"""The train state: parameters, optimiser state, step, RNG and the non-finite counters.

A pure pytree (``flax.struct.dataclass``). Parameters are an ``nnx.State`` of ``nnx.Param``s
split off the model once (the graph definition stays outside, static); optax moments built from
it keep the Params' logical-axis metadata, so :func:`repo_jax.sharding.state_shardings` lays
out the whole state (moments like their parameters, scalars replicated) from one rules table.

Initialisation never materialises an unsharded model: ``nnx.eval_shape`` gives the abstract
state, its shardings come from the logical names, and a ``jax.jit`` with those
``out_shardings`` builds each shard in place.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from repo_jax import sharding as shd
from repo_jax.training.config import TrainConfig


@flax.struct.dataclass
class TrainState:
    """Attributes:
    step: int32 []: optimiser updates applied (skipped non-finite steps do not count).
    params: ``nnx.State`` of the model's ``nnx.Param``s (master dtype).
    opt_state: optax state for ``params``.
    rng: uint32 [2]: raw PRNG key data (a plain array: checkpoints and shardings need no special
      case); per-step keys are ``fold_in(rng, step)``.
    nonfinite_in_a_row / nonfinite_total: int32 []: steps skipped for a non-finite loss or
      gradient, consecutive and in total.
    buffers: the model's non-Param variables (usually empty).
    ref_params: frozen reference ``nnx.State`` when ``train.reference = params``, else None.
    """

    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array
    nonfinite_in_a_row: jax.Array
    nonfinite_total: jax.Array
    buffers: Any = None
    ref_params: Any = None


def split_model(model: nnx.Module):
    """``model -> (graphdef, params, buffers)``: Params are trained, everything else rides along."""
    return nnx.split(model, nnx.Param, ...)


def create(params, buffers, tx: optax.GradientTransformation, *, seed: int, with_reference: bool) -> TrainState:
    """A fresh train state around ``params`` (a pure function: call it inside ``jit``)."""
    zero = jnp.zeros((), jnp.int32)
    return TrainState(
        step=zero,
        params=params,
        opt_state=tx.init(params),
        rng=jax.random.key_data(jax.random.key(seed)).astype(jnp.uint32),
        nonfinite_in_a_row=zero,
        nonfinite_total=zero,
        buffers=buffers,
        ref_params=jax.tree.map(jnp.copy, params) if with_reference else None,
    )


def abstract_state(model_factory: Callable[[], nnx.Module], tx, train: TrainConfig):
    """``(graphdef, abstract TrainState)`` without allocating any weights."""
    graphdef, params, buffers = split_model(nnx.eval_shape(model_factory))
    abstract = jax.eval_shape(
        lambda p, b: create(p, b, tx, seed=train.seed, with_reference=train.reference == "params"), params, buffers
    )
    return graphdef, abstract


def init_state(model_factory: Callable[[], nnx.Module], tx, train: TrainConfig, mesh, rules=shd.TRAIN_RULES, *,
               compiler_options: dict | None = None, tolerance: float = shd.SHARDING_TOLERANCE):
    """Random-init train state built directly in its shardings; returns ``(graphdef, state, shardings)``
    (``tolerance``: ``mesh.sharding_tolerance``, see ``sharding.state_shardings``)."""
    graphdef, abstract = abstract_state(model_factory, tx, train)
    shardings = shd.state_shardings(abstract, mesh, rules, tolerance=tolerance)

    def build():
        _, params, buffers = split_model(model_factory())
        return create(params, buffers, tx, seed=train.seed, with_reference=train.reference == "params")

    with shd.mesh_rules(mesh, rules):
        state = jax.jit(build, out_shardings=shardings, compiler_options=compiler_options)()
    return graphdef, state, shardings


def state_from_model(model: nnx.Module, tx, train: TrainConfig, mesh, rules=shd.TRAIN_RULES, *, reference=None,
                     tolerance: float = shd.SHARDING_TOLERANCE):
    """Train state around an existing (e.g. pretrained) model; returns ``(graphdef, state, shardings)``.

    Parameters are moved to their training shardings first (a no-op when ``from_pretrained``
    already placed them); ``reference`` (a model) overrides the reference copy of ``params``.
    """
    graphdef, params, buffers = split_model(model)
    with_ref = train.reference == "params"
    abstract = jax.eval_shape(lambda p, b: create(p, b, tx, seed=train.seed, with_reference=with_ref), params, buffers)
    shardings = shd.state_shardings(abstract, mesh, rules, tolerance=tolerance)
    params = jax.device_put(params, shardings.params)
    buffers = jax.device_put(buffers, shardings.buffers)
    with jax.set_mesh(mesh):
        state = jax.jit(
            lambda p, b: create(p, b, tx, seed=train.seed, with_reference=with_ref), out_shardings=shardings
        )(params, buffers)
    if reference is not None:
        if not with_ref:
            raise ValueError("a reference model was given but train.reference is 'batch' (set it to 'params')")
        _, ref_params, _ = split_model(reference)
        state = state.replace(ref_params=jax.device_put(ref_params, shardings.ref_params))
    return graphdef, state, shardings


def resolve_path(path: str) -> str:
    """A relative path that does not exist from the working directory: ``repo_jax/...`` is the
    package's own file wherever it is installed (``importlib.resources``); anything else (e.g.
    ``configs/...``) is tried from the checkout the package runs from, so shipped configs work
    from any directory."""
    from importlib import resources

    p = Path(path)
    if p.is_absolute() or p.exists():
        return path
    package = resources.files("repo_jax")
    if p.parts[:1] == ("repo_jax",):
        alt = package.joinpath(*p.parts[1:])
    else:
        alt = Path(str(package)).parent / p
    return str(alt) if alt.is_file() or alt.is_dir() else path


def model_config(section):
    """The ``repo_jax.models.ModelConfig`` a run's ``model`` section describes."""
    from repo_jax import models

    if not section.config:
        raise ValueError("model.config is empty: set it to an HF config.json, an HF folder or a .gguf file")
    return models.load_config(
        resolve_path(section.config), dtype=section.dtype, param_dtype=section.param_dtype, remat=section.remat, **section.overrides
    )


def model_factory(section, *, seed: int = 0) -> Callable[[], nnx.Module]:
    """A zero-argument random-init builder (``nnx.eval_shape`` of it is the abstract model)."""
    from repo_jax import models

    cfg = model_config(section)
    return lambda: models.build(cfg, seed=seed)


def pretrained_model(section, mesh=None, rules=shd.TRAIN_RULES) -> nnx.Module:
    """The model of ``section.weights`` (HF folder or ``.gguf``), each parameter placed straight
    into its training sharding when ``mesh`` is given. The architecture comes from the weights;
    ``dtype``/``param_dtype``/``remat`` and ``overrides`` from the section."""
    from repo_jax import models

    if not section.weights:
        raise ValueError("model.weights is empty: set it to an HF checkpoint folder or a .gguf file")
    return models.from_pretrained(
        resolve_path(section.weights), dtype=jnp.dtype(section.param_dtype), compute_dtype=jnp.dtype(section.dtype),
        mesh=mesh, rules=rules, remat=section.remat, **section.overrides,
    )


def export_policy(graphdef, state: TrainState, tokenizer, out) -> bool:
    """Writes ``state``'s parameters to the folder ``out`` as an HF checkpoint (``config.json``,
    safetensors, the tokenizer when it has ``save_pretrained``), which ``transformers`` and every
    ``--model`` of this project load. One process only: returns False (writing nothing) when
    there are several."""
    from repo_jax import models

    if jax.process_count() > 1:
        return False
    models.save_pretrained(nnx.merge(graphdef, state.params, state.buffers), out)
    if hasattr(tokenizer, "save_pretrained"):
        tokenizer.save_pretrained(out)
    return True
