"""The train state: parameters, optimiser state, step, RNG and the non-finite counters.

A pure pytree (``flax.struct.dataclass``). Parameters are an ``nnx.State`` of ``nnx.Param``s
split off the model once (the graph definition stays outside, static); optax moments built from
it keep the Params' logical-axis metadata, so :func:`repo_jax.sharding.state_shardings` lays
out the whole state (moments like their parameters, scalars replicated) from one rules table.

With LoRA (``model.lora.rank`` > 0) the trained ``params`` are the adapters alone
(``nnx.LoRAParam``) and the base's ``nnx.Param``s ride in ``frozen``: gradients, the optimiser
state and the reference copy (``train.reference = params``: the starting adapters, whose ``B``
is zero, so the reference is the base itself on the same arrays) cover the adapters only, and
checkpoints leave the base out (``training.checkpoint``).

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
    ref_params: frozen reference ``nnx.State`` when ``train.reference = params``, else None
      (with LoRA: a copy of the starting adapters).
    frozen: the LoRA base (``nnx.State`` of the model's ``nnx.Param``s, not trained), else None.
    """

    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array
    nonfinite_in_a_row: jax.Array
    nonfinite_total: jax.Array
    buffers: Any = None
    ref_params: Any = None
    frozen: Any = None


def has_adapters(model: nnx.Module) -> bool:
    return bool(getattr(model, "config", None) is not None and model.config.lora.rank)


def split_model(model: nnx.Module):
    """``model -> (graphdef, params, buffers, frozen)``: ``params`` are trained, ``buffers`` (the
    non-Param variables) ride along; with LoRA ``params`` are the adapters and ``frozen`` the
    base's Params, else ``frozen`` is None."""
    if has_adapters(model):
        graphdef, params, frozen, buffers = nnx.split(model, nnx.LoRAParam, nnx.Param, ...)
        return graphdef, params, buffers, frozen
    graphdef, params, buffers = nnx.split(model, nnx.Param, ...)
    return graphdef, params, buffers, None


def merge(graphdef, params, buffers=None, frozen=None) -> nnx.Module:
    """The model of :func:`split_model`'s parts (usable inside ``jit``)."""
    return nnx.merge(graphdef, params, *[x for x in (frozen, buffers) if x is not None])


def model_of(graphdef, state: TrainState) -> nnx.Module:
    """The model a train state holds (adapters and base together, with LoRA)."""
    return merge(graphdef, state.params, state.buffers, state.frozen)


def fold_adapters(graphdef, state: TrainState, tx, key) -> TrainState:
    """LoRA: the adapters folded into the base (``W += scale * A B`` in the base's dtype), then
    fresh adapters (``A`` from ``key``, ``B`` zero) with fresh optimiser moments. The policy is
    unchanged up to the base dtype's rounding. Pure: jit it (donating ``state``)."""
    from repo_jax.models import lora

    model = model_of(graphdef, state)
    cfg = model.config
    adapters = lora.layer_adapters(model)
    folded = lora.merged_layers(cfg, {n: model.layers[n][...] for n in adapters}, adapters)
    fresh = lora.make_adapters(cfg, key)
    for n, w in folded.items():
        model.layers[n][...] = w
        model.lora[n]["a"][...] = fresh[n]["a"][...]
        model.lora[n]["b"][...] = fresh[n]["b"][...]
    _, params, _, frozen = split_model(model)
    return state.replace(params=params, frozen=frozen, opt_state=tx.init(params))


def create(params, buffers, tx: optax.GradientTransformation, *, seed: int, with_reference: bool,
           frozen=None) -> TrainState:
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
        frozen=frozen,
    )


def abstract_state(model_factory: Callable[[], nnx.Module], tx, train: TrainConfig):
    """``(graphdef, abstract TrainState)`` without allocating any weights."""
    graphdef, params, buffers, frozen = split_model(nnx.eval_shape(model_factory))
    abstract = jax.eval_shape(
        lambda p, b, f: create(p, b, tx, seed=train.seed, with_reference=train.reference == "params", frozen=f),
        params, buffers, frozen,
    )
    return graphdef, abstract


def init_state(model_factory: Callable[[], nnx.Module], tx, train: TrainConfig, mesh, rules=shd.TRAIN_RULES, *,
               compiler_options: dict | None = None, tolerance: float = shd.SHARDING_TOLERANCE):
    """Random-init train state built directly in its shardings; returns ``(graphdef, state, shardings)``
    (``tolerance``: ``mesh.sharding_tolerance``, see ``sharding.state_shardings``)."""
    graphdef, abstract = abstract_state(model_factory, tx, train)
    shardings = shd.state_shardings(abstract, mesh, rules, tolerance=tolerance)

    def build():
        _, params, buffers, frozen = split_model(model_factory())
        return create(params, buffers, tx, seed=train.seed, with_reference=train.reference == "params", frozen=frozen)

    with shd.mesh_rules(mesh, rules):
        state = jax.jit(build, out_shardings=shardings, compiler_options=compiler_options)()
    return graphdef, state, shardings


def state_from_model(model: nnx.Module, tx, train: TrainConfig, mesh, rules=shd.TRAIN_RULES, *, reference=None,
                     tolerance: float = shd.SHARDING_TOLERANCE):
    """Train state around an existing (e.g. pretrained) model; returns ``(graphdef, state, shardings)``.

    Parameters are moved to their training shardings first (a no-op when ``from_pretrained``
    already placed them); ``reference`` (a model) overrides the reference copy of ``params``.
    """
    graphdef, params, buffers, frozen = split_model(model)
    with_ref = train.reference == "params"
    make = lambda p, b, f: create(p, b, tx, seed=train.seed, with_reference=with_ref, frozen=f)
    abstract = jax.eval_shape(make, params, buffers, frozen)
    shardings = shd.state_shardings(abstract, mesh, rules, tolerance=tolerance)
    params = jax.device_put(params, shardings.params)
    buffers = jax.device_put(buffers, shardings.buffers)
    frozen = jax.device_put(frozen, shardings.frozen)
    with jax.set_mesh(mesh):  # the base passes through: no copy of it is made
        state = jax.jit(lambda p, b: make(p, b, None), out_shardings=shardings.replace(frozen=None))(params, buffers)
    state = state.replace(frozen=frozen)
    if reference is not None:
        if not with_ref:
            raise ValueError("a reference model was given but train.reference is 'batch' (set it to 'params')")
        _, ref_params, _, _ = split_model(reference)
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
        resolve_path(section.config), dtype=section.dtype, param_dtype=section.param_dtype, remat=section.remat,
        lora=section.lora, **section.overrides
    )


def model_factory(section, *, seed: int = 0) -> Callable[[], nnx.Module]:
    """A zero-argument random-init builder (``nnx.eval_shape`` of it is the abstract model)."""
    from repo_jax import models

    cfg = model_config(section)
    return lambda: models.build(cfg, seed=seed)


def pretrained_model(section, mesh=None, rules=shd.TRAIN_RULES, *, seed: int = 0) -> nnx.Module:
    """The model of ``section.weights`` (HF folder or ``.gguf``), each parameter placed straight
    into its training sharding when ``mesh`` is given. The architecture comes from the weights;
    ``dtype``/``param_dtype``/``remat`` and ``overrides`` from the section; with ``section.lora``
    fresh adapters (from ``seed``) on top."""
    from repo_jax import models
    from repo_jax.models import lora

    if not section.weights:
        raise ValueError("model.weights is empty: set it to an HF checkpoint folder or a .gguf file")
    model = models.from_pretrained(
        resolve_path(section.weights), dtype=jnp.dtype(section.param_dtype), compute_dtype=jnp.dtype(section.dtype),
        mesh=mesh, rules=rules, remat=section.remat, **section.overrides,
    )
    return lora.add_adapters(model, section.lora, seed=seed, mesh=mesh, rules=rules)


def export_policy(graphdef, state: TrainState, tokenizer, out, *, adapter_out=None, base_model: str = "",
                  dtype=None) -> bool:
    """Writes ``state``'s parameters to the folder ``out`` as an HF checkpoint (``config.json``,
    safetensors in ``dtype``, default the parameters' own, the tokenizer when it has
    ``save_pretrained``), which ``transformers`` and every ``--model`` of this project load; with
    LoRA the adapters are merged into it, and ``adapter_out`` (when given) also receives them as a
    PEFT folder (``base_model``: its ``base_model_name_or_path``). One process only: returns False
    (writing nothing) when there are several."""
    from repo_jax import models
    from repo_jax.models import lora

    if jax.process_count() > 1:
        return False
    model = model_of(graphdef, state)
    models.save_pretrained(lora.merge(model), out, dtype=dtype)
    if hasattr(tokenizer, "save_pretrained"):
        tokenizer.save_pretrained(out)
    if adapter_out is not None and has_adapters(model):
        lora.save_peft(model, adapter_out, base_model=base_model)
        if hasattr(tokenizer, "save_pretrained"):
            tokenizer.save_pretrained(adapter_out)
    return True
