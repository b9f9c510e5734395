"""The jitted train step and the reference log-prob pass: pure functions of the train state.

``train_step(state, batch) -> (state, metrics)``:
  1. split the batch into ``train.micro_batches`` (strided, so no data moves) and ``lax.scan``
     over them, accumulating float32 gradients and metric sums;
  2. per micro-batch: merge the graphdef with the (optionally bf16-cast) parameters, run the
     model on the batch's rows (``B`` shared-prefix rows, or ``B * K`` flattened rows; see
     ``batch.py``) to final hidden states, then a ``shard_map`` over the
     batch axes computes each device's rows' sequence log-probs with the chunked kernel
     (``repo_jax.logprobs``), the log-ratios, the registered loss and the metric sums, and
     ``psum``s them: the masked mean is (global loss sum) / (global example count);
  3. clip + AdamW; a non-finite loss or gradient norm keeps the old parameters and optimiser
     state and bumps the non-finite counters instead (the host aborts via
     :func:`check_finite`).

Dimension letters: B prompts, K responses, R = B * K rows, T tokens, D model, V vocab.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax import P

from repo_jax import logprobs
from repo_jax import sharding as shd
from repo_jax.training import batch as bt
from repo_jax.training import objectives
from repo_jax.training import state as st
from repo_jax.training.config import RunConfig, TrainConfig
from repo_jax.training.optim import make_optimizer, schedule


class NonFiniteError(FloatingPointError):
    """Too many consecutive steps with a non-finite loss or gradient."""


def check_finite(metrics: Mapping[str, Any], max_in_a_row: int) -> None:
    """Host-side guard: raises once ``max_in_a_row`` consecutive steps were skipped."""
    n = int(metrics["nonfinite_in_a_row"])
    if max_in_a_row > 0 and n >= max_in_a_row:
        raise NonFiniteError(
            f"{n} train steps in a row had a non-finite loss or gradient (last loss={float(metrics['loss'])}, "
            f"grad_norm={float(metrics['grad_norm'])}); stopping as train.max_nonfinite_in_a_row={max_in_a_row}"
        )


class StepSums:
    """Example-weighted sums of a phase's train-step metrics (``keys``), plus examples, steps and
    skipped steps. ``push(metrics)`` keeps a step's metrics and reads the previous step's, so a
    loop that dispatches step ``n + 1`` before pushing it never waits on the host for step ``n``;
    ``flush()`` reads what is held (before a checkpoint or the end) and returns the sums, a plain
    dict that a checkpoint stores and ``StepSums(..., sums=...)`` resumes from."""

    def __init__(self, keys: Sequence[str], max_nonfinite: int, sums: Mapping[str, float] | None = None):
        self.keys, self.max_nonfinite = tuple(keys), max_nonfinite
        self.sums = dict(sums) if sums else {k: 0.0 for k in (*self.keys, "examples", "steps", "nonfinite")}
        self._pending = None

    def push(self, metrics: Mapping[str, Any]) -> None:
        self.flush()
        self._pending = metrics

    def flush(self) -> dict[str, float]:
        if self._pending is not None:
            m = jax.device_get(self._pending)
            self._pending = None
            check_finite(m, self.max_nonfinite)
            n = float(m["examples"])
            for k in self.keys:
                self.sums[k] += float(m.get(k, 0.0)) * n
            self.sums["examples"] += n
            self.sums["nonfinite"] += float(m["skipped"])
            self.sums["steps"] += 1
            if not float(m["skipped"]):  # the loss of the first and the last step summed
                self.sums.setdefault("loss_first", float(m["loss"]))
                self.sums["loss_last"] = float(m["loss"])
            if "lr" in m:  # the schedule's highest and last rates over the summed steps
                self.sums["lr_max"] = max(self.sums.get("lr_max", 0.0), float(m["lr"]))
                self.sums["lr_last"] = float(m["lr"])
        return dict(self.sums)

    def mean(self, key: str) -> float:
        return self.sums[key] / max(self.sums["examples"], 1.0)

    def add(self, key: str, value: float) -> None:
        """A host-side count kept with the sums (e.g. the tokens a step ran), checkpointed with them."""
        self.sums[key] = self.sums.get(key, 0.0) + float(value)


def mean_record(sums: Mapping[str, float], keys: Sequence[str]) -> dict[str, float]:
    """``train/<key>`` example-weighted means over the summed steps (``StepSums.flush()``),
    ``train/steps`` and ``train/nonfinite_steps``; empty for empty ``sums``."""
    if not sums:
        return {}
    ex = max(sums["examples"], 1.0)
    out: dict[str, Any] = {f"train/{k}": sums[k] / ex for k in keys}
    out.update({"train/steps": int(sums["steps"]), "train/nonfinite_steps": int(sums["nonfinite"])})
    if "loss_first" in sums:  # did the loss move over these steps
        out.update({"train/loss_first": sums["loss_first"], "train/loss_last": sums["loss_last"]})
    if "lr_max" in sums:  # the learning rate: the highest a step ran at, and the last step's
        out.update({"train/lr_max": sums["lr_max"], "train/lr_last": sums["lr_last"]})
    return out


def _cast_floats(tree, dtype):
    return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def _hidden_and_unembedding(graphdef, params, buffers, batch, frozen=None, dropout_key=None):
    """Model forward on the batch's rows: ``(h, w_DxV, b_V or None)``. The float parameters
    (and the LoRA base ``frozen``) are cast to the model's compute dtype (``model.dtype``) for
    the forward; the master copy (``model.param_dtype``), its gradients and Adam's moments are
    untouched. ``dropout_key``: the LoRA adapters' dropout (training only)."""
    model = st.merge(graphdef, params, buffers, frozen)
    if model.config.jnp_dtype != model.config.jnp_param_dtype:
        cast = lambda x: None if x is None else _cast_floats(x, model.config.jnp_dtype)
        model = st.merge(graphdef, cast(params), buffers, cast(frozen))
    h_RxTxD = model.hidden_states(**bt.model_inputs(batch), dropout_key=dropout_key)
    w_DxV, b_V = model.unembedding()
    return h_RxTxD, w_DxV, b_V


def _local_logps(h_RxTxD, w_DxV, b_V, ids_RxT, mask_RxT, chunk):
    """This device's rows: ``hidden[:, :-1]`` predicts ``ids[:, 1:]``, counted where
    ``mask[:, :-1]`` (the loss mask is aligned with the targets, see ``batch.py``)."""
    return logprobs.sequence_logprobs(h_RxTxD[:, :-1], w_DxV, ids_RxT[:, 1:], mask_RxT[:, :-1], b_V, chunk_size=chunk)


def _local_logps_BxK(h, w_DxV, b_V, tokens, k: int, chunk: int):
    """This device's examples' response log-probs ``[B, K]`` from the model's hidden states and
    the layout's token fields (:func:`batch.token_fields`): ``R = B * K`` rows, or shared-prefix
    rows (``h`` is then ``[B, T, D]``)."""
    if "segment_ids_BxT" in tokens:
        return logprobs.shared_prefix_logprobs(h, w_DxV, tokens["input_ids_BxT"], tokens["segment_ids_BxT"], k, b_V,
                                               chunk_size=chunk)
    ids_BxKxT, mask_BxKxT = tokens["input_ids_BxKxT"], tokens["loss_mask_BxKxT"]
    b, _, t = ids_BxKxT.shape
    return _local_logps(h, w_DxV, b_V, ids_BxKxT.reshape(b * k, t), mask_BxKxT.reshape(b * k, t), chunk).reshape(b, k)


def _per_device(mesh, fn, in_specs, out_specs):
    # check_vma=False: the chunked kernel's custom_vjp accumulates dW in a device-invariant scan
    # carry; with it off, shard_map still psums the cotangent of the replicated unembedding.
    return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)


def batch_logps(h, w_DxV, b_V, batch, *, mesh, chunk: int) -> jax.Array:
    """Per-response log-probs ``[B, K]`` of either layout, each device computing its own
    examples (sharded over the batch axes)."""
    ba = shd.batch_axes(mesh)
    k = bt.dims(batch)[1]
    tokens = {f: batch[f] for f in bt.token_fields(batch)}
    fn = lambda h, w, b, tok: _local_logps_BxK(h, w, b, tok, k, chunk)
    return _per_device(mesh, fn, (P(ba), P(), P(), P(ba)), P(ba))(h, w_DxV, b_V, tokens)


def loss_sums(h, w_DxV, b_V, batch, ref_logps_BxK, *, mesh, train: TrainConfig) -> dict[str, jax.Array]:
    """Globally summed loss and metric sums of one micro-batch (see ``objectives.metric_sums``)."""
    ba = shd.batch_axes(mesh)
    objective = objectives.get(train.loss.name)
    k = bt.dims(batch)[1]
    names = bt.token_fields(batch)
    tokens = {f: batch[f] for f in names}
    fields = {f: v for f, v in batch.items() if f not in names}

    def local(h, w, b, tokens, ref_BxK, fields):
        rho_BxK = _local_logps_BxK(h, w, b, tokens, k, train.logprob_chunk) - ref_BxK
        local_batch = {**tokens, **fields}
        sums = objectives.metric_sums(objective, rho_BxK, local_batch, train.loss, bt.example_mask(local_batch))
        return jax.lax.psum(sums, ba)

    specs = (P(ba), P(), P(), P(ba), P(ba), P(ba))
    return _per_device(mesh, local, specs, P())(h, w_DxV, b_V, tokens, ref_logps_BxK, fields)


def response_logps(graphdef, params, buffers, batch, *, mesh, train: TrainConfig, frozen=None):
    """``logps_BxK``: each response's summed log-prob under ``params`` (with LoRA: adapters on
    the base ``frozen``; its tokens only), float32; the one forward pass behind both reference
    modes."""
    h, w, b = _hidden_and_unembedding(graphdef, params, buffers, batch, frozen)
    return batch_logps(h, w, b, batch, mesh=mesh, chunk=train.logprob_chunk)


def _ref_logps(graphdef, ref_params, buffers, batch, *, mesh, train: TrainConfig, frozen=None):
    if train.reference == "batch":
        if "ref_logps_BxK" not in batch:
            raise KeyError("batch field 'ref_logps_BxK' is missing (train.reference='batch'); "
                           "compute it with make_reference_logprobs or set train.reference='params'")
        return batch["ref_logps_BxK"].astype(jnp.float32)
    if ref_params is None:
        raise ValueError("train.reference='params' but the train state holds no ref_params")
    return jax.lax.stop_gradient(response_logps(graphdef, ref_params, buffers, batch, mesh=mesh, train=train,
                                                frozen=frozen))


def train_step_fn(graphdef, cfg: RunConfig, mesh, param_shardings) -> Callable:
    """The pure (un-jitted) ``(state, batch) -> (state, metrics)``."""
    train = cfg.train
    tx, lr_at = make_optimizer(cfg.optim), schedule(cfg.optim)
    objectives.get(train.loss.name)  # an unknown name fails here, before tracing

    def micro_loss(params, state, mb, total, key):
        ref_BxK = _ref_logps(graphdef, state.ref_params, state.buffers, mb, mesh=mesh, train=train, frozen=state.frozen)
        h, w, b = _hidden_and_unembedding(graphdef, params, state.buffers, mb, state.frozen, key)
        sums = loss_sums(h, w, b, mb, ref_BxK, mesh=mesh, train=train)
        return sums["loss_sum"] / total, sums

    # with LoRA, params are the adapters: no gradient of the frozen base is ever formed
    grad_fn = jax.value_and_grad(micro_loss, has_aux=True)

    def step(state, batch):
        total = jnp.maximum(jnp.sum(bt.example_mask(batch).astype(jnp.float32)), 1.0)
        m = train.micro_batches
        key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)  # LoRA dropout
        if m == 1:
            (_, sums), grads = grad_fn(state.params, state, batch, total, key)
        else:
            micro = bt.split_micro(batch, m)
            micro = jax.lax.with_sharding_constraint(micro, jax.NamedSharding(mesh, P(None, shd.batch_axes(mesh))))
            zero_g = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)
            zero_s = jax.tree.map(
                lambda s: jnp.zeros(s.shape, s.dtype),
                jax.eval_shape(lambda: grad_fn(state.params, state, jax.tree.map(lambda x: x[0], micro), total,
                                               key)[0][1]),
            )

            def body(carry, xs):
                g_acc, s_acc = carry
                mb, i = xs
                (_, sums), g = grad_fn(state.params, state, mb, total, jax.random.fold_in(key, i))
                g_acc = jax.tree.map(lambda a, x: a + x.astype(jnp.float32), g_acc, g)
                g_acc = jax.lax.with_sharding_constraint(g_acc, param_shardings)
                return (g_acc, jax.tree.map(jnp.add, s_acc, sums)), None

            (grads, sums), _ = jax.lax.scan(body, (zero_g, zero_s), (micro, jnp.arange(m)))
            grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, state.params)
        metrics = objectives.finalize(sums)
        grad_norm = optax.tree.norm(grads)
        ok = jnp.isfinite(sums["loss_sum"]) & jnp.isfinite(grad_norm)
        def apply(grads, params, opt_state):
            updates, opt_state = tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state

        # a cond, not a select: the update can then be computed in place of the donated state
        # (a select keeps both versions alive: +4 GiB per device for Mistral-7B on 8 devices)
        params, opt_state = jax.lax.cond(
            ok, apply, lambda g, p, o: (p, o), grads, state.params, state.opt_state
        )
        bad = (~ok).astype(jnp.int32)
        new_state = state.replace(
            step=state.step + ok.astype(jnp.int32),
            params=params,
            opt_state=opt_state,
            nonfinite_in_a_row=jnp.where(ok, 0, state.nonfinite_in_a_row + 1),
            nonfinite_total=state.nonfinite_total + bad,
        )
        metrics.update(
            grad_norm=grad_norm,
            lr=lr_at(state.step),
            skipped=bad,
            nonfinite_in_a_row=new_state.nonfinite_in_a_row,
            nonfinite_total=new_state.nonfinite_total,
            step=new_state.step,
        )
        return new_state, metrics

    return step


def batch_checker(train: TrainConfig, mesh) -> Callable[[Mapping[str, Any]], None]:
    """Host-side check of a batch before it reaches ``jit``: field names and shapes, the fields
    the loss and reference mode need, and divisibility by micro-batches x batch-axis devices
    (each failure is one sentence naming the field or key)."""
    objective = objectives.get(train.loss.name)
    needs = objective.needs + (("ref_logps_BxK",) if train.reference == "batch" else ())
    multiple = shd.batch_size_multiple(mesh) * train.micro_batches

    def check(batch):
        b, k, _ = bt.validate(batch, needs=needs)
        if b % multiple:
            raise ValueError(
                f"batch size {b} must be a multiple of train.micro_batches x mesh data x fsdp = {multiple}"
            )
        if objective.pairwise and k != 2:
            raise ValueError(f"train.loss.name={train.loss.name!r} is pairwise: the batch needs K=2 responses, got {k}")

    return check


@dataclasses.dataclass(frozen=True)
class Jitted:
    """A jitted function that runs under the mesh and rules it was built for (the models'
    activation constraints read both at trace time). ``lower`` is for planning; ``check``, when
    set, validates the batch (the last argument) on the host first."""

    fn: Callable
    mesh: jax.sharding.Mesh
    rules: shd.Rules
    check: Callable | None = None

    def __call__(self, *args):
        if self.check is not None:
            self.check(args[-1])
        with shd.mesh_rules(self.mesh, self.rules):
            return self.fn(*args)

    def lower(self, *args):
        with shd.mesh_rules(self.mesh, self.rules):
            return self.fn.lower(*args)


@dataclasses.dataclass(frozen=True)
class TrainStep(Jitted):
    """``train_step(state, batch) -> (state, metrics)``: the jitted step takes the LoRA base
    (``state.frozen``) as an argument of its own, neither donated nor returned, so the base is
    never copied and every other holder of it (the KL's ``pi_0``, a sampling copy) keeps it."""

    def __call__(self, state, batch):
        new, metrics = super().__call__(state.replace(frozen=None), state.frozen, batch)
        return new.replace(frozen=state.frozen), metrics

    def lower(self, state, batch):
        return super().lower(state.replace(frozen=None), state.frozen, batch)


def make_train_step(graphdef, cfg: RunConfig, mesh, state_shardings, rules=shd.TRAIN_RULES, *,
                    compiler_options: dict | None = None) -> TrainStep:
    """``train_step(state, batch) -> (state, metrics)`` jitted with explicit shardings; ``state``
    is donated (its buffers are reused for the new state), except a LoRA base (see
    :class:`TrainStep`). ``compiler_options`` go to XLA (e.g.
    ``{"xla_backend_optimization_level": 0}`` halves CPU compile time in tests)."""
    step = train_step_fn(graphdef, cfg, mesh, state_shardings.params)

    def fn(state, frozen, batch):
        new, metrics = step(state.replace(frozen=frozen), batch)
        return new.replace(frozen=None), metrics

    own = state_shardings.replace(frozen=None)
    jitted = jax.jit(
        fn,
        in_shardings=(own, state_shardings.frozen, shd.batch_sharding(mesh)),
        out_shardings=(own, shd.replicated(mesh)),
        donate_argnames=("state",),
        compiler_options=compiler_options,
    )
    return TrainStep(jitted, mesh, rules, batch_checker(cfg.train, mesh))


def make_reference_logprobs(graphdef, train: TrainConfig, mesh, param_shardings, rules=shd.TRAIN_RULES, *,
                            frozen_shardings=None, compiler_options: dict | None = None) -> Jitted:
    """``reference_logprobs(params, frozen, batch) -> ref_logps_BxK`` (float32, sharded like the
    batch); ``frozen`` is the LoRA base (``state.frozen``; None without LoRA).

    iREPO calls it once per round with the round's starting policy, and stores the result in
    the batches as ``ref_logps_BxK`` (``train.reference = batch``): the reference model never
    sits in memory during training.
    """
    def fn(params, frozen, batch):
        return response_logps(graphdef, params, None, batch, mesh=mesh, train=train, frozen=frozen)

    jitted = jax.jit(fn, in_shardings=(param_shardings, frozen_shardings, shd.batch_sharding(mesh)),
                     out_shardings=shd.batch_sharding(mesh), compiler_options=compiler_options)
    return Jitted(jitted, mesh, rules)
