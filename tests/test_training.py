"""The sharded train step on the tiny config: mesh-invariance, gradient accumulation, the
reference paths, the non-finite guard, and the small pieces (loss registry, batches, schedule)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from repo_jax import sharding as shd
from repo_jax.training import batch as bt
from repo_jax.training import objectives, optim
from repo_jax.training import state as st
from repo_jax.training import step as sp
from repo_jax.training.config import LossConfig, OptimConfig
from helpers import random_batch, tiny_config

CFG = tiny_config()
V = CFG.model.overrides["vocab_size"]
# Unoptimised XLA:CPU code compiles in half the time; every comparison below is between programs
# compiled the same way.
FAST = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def _with(cfg, **train):
    loss = train.pop("loss", None)
    t = dataclasses.replace(cfg.train, **train)
    if loss is not None:
        t = dataclasses.replace(t, loss=dataclasses.replace(t.loss, **loss))
    return dataclasses.replace(cfg, train=t)


def _mesh(shape):
    return shd.make_mesh(shd.MeshConfig(*shape), jax.devices()[: int(np.prod(shape))])


@pytest.fixture(scope="module")
def base():
    """One random init (on one device, as host arrays), reused by every test on every mesh."""
    tx = optim.make_optimizer(CFG.optim)
    graphdef, state, _ = st.init_state(st.model_factory(CFG.model), tx, CFG.train, _mesh((1, 1, 1)), compiler_options=FAST)
    return graphdef, jax.tree.map(np.asarray, state)


_STEPS: dict = {}


def _run(base, cfg, shape, batches):
    """Train on ``batches`` on a mesh of ``shape`` from the shared init; returns (state, metrics)."""
    graphdef, host_state = base
    mesh = _mesh(shape)
    abstract = jax.eval_shape(lambda: host_state)
    if cfg.train.reference == "params":
        abstract = abstract.replace(ref_params=abstract.params)
        host_state = host_state.replace(ref_params=host_state.params)
    shardings = shd.state_shardings(abstract, mesh)
    key = (cfg.train, cfg.model.dtype, shape)
    if key not in _STEPS:
        _STEPS[key] = sp.make_train_step(graphdef, cfg, mesh, shardings, compiler_options=FAST)
    state = jax.device_put(host_state, shardings)
    metrics = []
    for b in batches:
        state, m = _STEPS[key](state, shd.global_batch(bt.cast(b), mesh))
        metrics.append({k: float(v) for k, v in m.items()})
    return jax.tree.map(np.asarray, state), metrics


def _assert_close_trees(a, b, atol):
    diffs = jax.tree.leaves(jax.tree.map(lambda x, y: float(np.max(np.abs(x - y))), a, b))
    assert max(diffs) <= atol, max(diffs)


@pytest.mark.parametrize("loss,k", [("irepo", 2), ("lpo", 4)])
def test_mesh_222_matches_one_device(base, loss, k):
    cfg = CFG if loss == "irepo" else _with(CFG, num_responses=k, loss={"name": loss, "lpo_variant": "lpo_abs"})
    batches = [random_batch(cfg, vocab=V, seed=s) for s in (1, 2)]
    one, m1 = _run(base, cfg, (1, 1, 1), batches)
    eight, m8 = _run(base, cfg, (2, 2, 2), batches)
    for a, b in zip(m1, m8):
        for name in ("loss", "grad_norm", "reward_margin", "reward_accuracy"):
            np.testing.assert_allclose(a[name], b[name], rtol=1e-5, atol=1e-6, err_msg=name)
    assert m1[0]["loss"] > 0 and m1[1]["step"] == 2 and m1[1]["skipped"] == 0
    if loss == "irepo":
        assert 0 < m1[0]["calibration_error"] < 1
    _assert_close_trees(one.params, eight.params, 1e-5)
    _assert_close_trees(one.opt_state, eight.opt_state, 1e-5)
    # parameters really moved
    assert max(jax.tree.leaves(jax.tree.map(lambda x, y: float(np.abs(x - y).max()), one.params, base[1].params))) > 1e-4


def test_gradient_accumulation_equals_one_large_batch(base):
    batches = [random_batch(CFG, vocab=V, seed=3)]
    whole, m1 = _run(base, CFG, (1, 1, 1), batches)
    # 4 micro-batches of 2 prompts, each split over fsdp=2 (tensor=4 shards the mlp and vocab)
    accum, m4 = _run(base, _with(CFG, micro_batches=4), (1, 2, 4), batches)
    for name in ("loss", "grad_norm", "reward_margin", "calibration_error"):
        np.testing.assert_allclose(m1[0][name], m4[0][name], rtol=1e-5, err_msg=name)
    _assert_close_trees(whole.params, accum.params, 1e-5)


def test_reference_params_equal_precomputed_reference_logprobs(base):
    graphdef, host_state = base
    mesh = _mesh((1, 1, 1))
    cfg = _with(CFG, reference="params")
    b = random_batch(cfg, vocab=V, seed=4, ref_logps=False)
    param_sh = shd.state_shardings(jax.eval_shape(lambda: host_state.params), mesh)
    ref_fn = sp.make_reference_logprobs(graphdef, cfg.train, mesh, param_sh, compiler_options=FAST)
    ref = np.asarray(ref_fn(jax.device_put(host_state.params, param_sh), None, shd.global_batch(bt.cast(b), mesh)))
    assert ref.shape == (8, 2) and np.all(ref < 0)
    by_params, mp = _run(base, cfg, (1, 1, 1), [b])
    by_batch, mb = _run(base, CFG, (1, 1, 1), [dict(b, ref_logps_BxK=ref)])
    # the reference is the policy itself: rho = 0, so the iREPO loss is mean(logit(p_hat)^2)
    logit = np.log(b["pref_B"]) - np.log1p(-b["pref_B"])
    np.testing.assert_allclose(mp[0]["loss"], np.mean(logit**2), rtol=1e-5)
    np.testing.assert_allclose(mb[0]["loss"], mp[0]["loss"], rtol=1e-5)
    _assert_close_trees(by_params.params, by_batch.params, 1e-6)
    _assert_close_trees(by_params.ref_params, host_state.params, 0.0)  # the reference stays frozen


def test_nonfinite_batch_is_skipped_and_counted(base):
    good = random_batch(CFG, vocab=V, seed=5)
    bad = dict(good, ref_logps_BxK=np.where(np.eye(8, 2, dtype=bool), np.nan, good["ref_logps_BxK"]))
    state0 = base[1]
    after, m = _run(base, CFG, (1, 1, 1), [bad, bad, good])
    assert [x["skipped"] for x in m] == [1, 1, 0]
    assert [x["nonfinite_in_a_row"] for x in m] == [1, 2, 0] and m[-1]["nonfinite_total"] == 2
    assert np.isnan(m[0]["loss"]) and m[2]["step"] == 1
    with pytest.raises(sp.NonFiniteError, match="2 train steps in a row"):
        sp.check_finite(m[1], max_in_a_row=2)
    sp.check_finite(m[0], max_in_a_row=2)
    # two poisoned steps leave the state exactly as it was
    skipped, _ = _run(base, CFG, (1, 1, 1), [bad, bad])
    _assert_close_trees(skipped.params, state0.params, 0.0)
    _assert_close_trees(skipped.opt_state, state0.opt_state, 0.0)
    assert int(skipped.step) == 0 and int(skipped.nonfinite_in_a_row) == 2


def test_bf16_compute_keeps_float32_master_weights(base):
    cfg = dataclasses.replace(CFG, model=dataclasses.replace(CFG.model, dtype="bfloat16"))
    graphdef16 = nnx.split(nnx.eval_shape(st.model_factory(cfg.model)))[0]  # same parameters, bf16 compute
    b = random_batch(CFG, vocab=V, seed=6)
    s16, m16 = _run((graphdef16, base[1]), cfg, (1, 1, 1), [b])
    _, m32 = _run(base, CFG, (1, 1, 1), [b])
    assert all(x.dtype == np.float32 for x in jax.tree.leaves(s16.params))
    np.testing.assert_allclose(m16[0]["loss"], m32[0]["loss"], rtol=5e-2)


# ---------------------------------------------------------------------------- small pieces


def test_objective_metrics_on_known_log_ratios():
    b = {"input_ids_BxKxT": jnp.zeros((2, 2, 4), jnp.int32), "pref_B": jnp.array([0.8, 0.3])}
    rho = jnp.array([[2.0, 0.0], [1.0, 0.0]])
    cfg = LossConfig(name="irepo", beta=0.5)
    sums = objectives.metric_sums(objectives.get("irepo"), rho, b, cfg, jnp.array([True, True]))
    m = objectives.finalize(sums)
    z = np.array([1.0, 0.5])
    np.testing.assert_allclose(m["loss"], np.mean((z - np.log(np.array([0.8, 0.3]) / np.array([0.2, 0.7]))) ** 2), rtol=1e-6)
    # margins over the preferred direction: +1.0 for row 0 (a wins), -0.5 for row 1 (b wins)
    np.testing.assert_allclose(m["reward_margin"], 0.25, rtol=1e-6)
    assert float(m["reward_accuracy"]) == 0.5
    np.testing.assert_allclose(m["calibration_error"], np.mean(np.abs(1 / (1 + np.exp(-z)) - [0.8, 0.3])), rtol=1e-6)
    masked = objectives.finalize(objectives.metric_sums(objectives.get("irepo"), rho, b, cfg, jnp.array([True, False])))
    assert float(masked["examples"]) == 1 and float(masked["reward_accuracy"]) == 1.0


def test_registry_and_batch_errors_name_the_culprit():
    with pytest.raises(KeyError, match="train.loss.name='kto'.*irepo"):
        objectives.get("kto")
    good = random_batch(CFG, vocab=V)
    with pytest.raises(KeyError, match="'input_ids_BxKxT' is missing"):
        bt.validate({k: v for k, v in good.items() if k != "input_ids_BxKxT"})
    with pytest.raises(KeyError, match="'pref_B' is missing"):
        bt.validate({k: v for k, v in good.items() if k != "pref_B"}, needs=("pref_B",))
    with pytest.raises(ValueError, match="'scores_BxK' has shape"):
        bt.validate(dict(good, scores_BxK=np.zeros((8, 3))))
    assert bt.validate(good) == (8, 2, 32)
    check = sp.batch_checker(CFG.train, _mesh((2, 2, 2)))
    check(good)
    with pytest.raises(ValueError, match="batch size 6 must be a multiple of .* = 4"):
        check(random_batch(CFG, vocab=V, batch_size=6))
    with pytest.raises(KeyError, match="'ref_logps_BxK' is missing"):
        check(random_batch(CFG, vocab=V, ref_logps=False))
    with pytest.raises(ValueError, match="pairwise: the batch needs K=2 responses, got 3"):
        check(random_batch(CFG, vocab=V, num_responses=3))


def test_split_micro_and_stack_pair():
    x = {"pref_B": np.arange(8.0), "input_ids_BxKxT": np.arange(8 * 2 * 3).reshape(8, 2, 3)}
    m = bt.split_micro(x, 4)
    assert m["pref_B"].shape == (4, 2) and m["pref_B"][1].tolist() == [1.0, 5.0]
    np.testing.assert_array_equal(m["input_ids_BxKxT"][1], x["input_ids_BxKxT"][[1, 5]])
    a = {"input_ids_BxT": np.ones((3, 5)), "ref_logps_B": np.zeros(3)}
    b = {"input_ids_BxT": np.zeros((3, 5)), "ref_logps_B": np.ones(3)}
    out = bt.stack_pair(a, b, pref_B=np.full(3, 0.7))
    assert out["input_ids_BxKxT"].shape == (3, 2, 5) and out["ref_logps_BxK"][:, 1].tolist() == [1, 1, 1]


def test_warmup_cosine_schedule():
    # 10 warm-up steps: step n runs at (n + 1) / 10 (the first step trains), step 9 at the peak; the
    # cosine then reaches lr * end_lr_ratio at the last step (109) and stays there
    s = optim.schedule(OptimConfig(lr=1.0, warmup_steps=10, total_steps=110, end_lr_ratio=0.1))
    mid = 0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * 50 / 100))
    np.testing.assert_allclose([s(0), s(4), s(9), s(59), s(109), s(500)], [0.1, 0.5, 1.0, mid, 0.1, 0.1], atol=1e-6)
    c = optim.schedule(OptimConfig(lr=2.0, warmup_steps=0, schedule="constant"))
    assert float(c(0)) == float(c(1000)) == 2.0


def test_schedule_resolves_to_the_run_and_refuses_what_never_trains():
    r = optim.resolve(OptimConfig(lr=1.0, warmup_ratio=0.1, schedule="cosine"), run_steps=768)
    assert (r.total_steps, r.warmup_steps) == (768, 77)
    assert float(optim.schedule(r)(76)) == 1.0 and float(optim.schedule(r)(0)) > 0.0
    assert optim.schedule_problems(OptimConfig(lr=1.0, warmup_ratio=0.1), 768, "x") == []
    # the configs: warm-up 50 and a cosine of 1000 over a 6-step run
    bad = optim.schedule_problems(OptimConfig(lr=5e-7, warmup_steps=50, total_steps=1000), 6, "3 rounds x 2")
    assert len(bad) == 2 and "never passes 0.12 x optim.lr" in bad[0] and "optim.total_steps=1000" in bad[1]
    with pytest.raises(ValueError, match="unresolved"):
        optim.schedule(OptimConfig(lr=1.0))


def test_pretrained_weights_load_into_training_shardings(tmp_path):
    from repo_jax import models

    mesh = _mesh((2, 2, 2))
    model = st.model_factory(CFG.model, seed=1)()
    models.save_pretrained(model, tmp_path / "hf")
    section = dataclasses.replace(CFG.model, weights=str(tmp_path / "hf"), overrides={})
    loaded = st.pretrained_model(section, mesh)
    got, want = st.split_model(loaded)[1], st.split_model(model)[1]
    _assert_close_trees(jax.tree.map(np.asarray, got), jax.tree.map(np.asarray, want), 0.0)
    sh = shd.state_shardings(want, mesh)
    assert got["layers"]["w_up"].sharding == sh["layers"]["w_up"]
    with pytest.raises(ValueError, match="model.weights is empty"):
        st.pretrained_model(CFG.model)
