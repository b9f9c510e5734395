"""Orbax checkpoints: one save holds state, reference, grain iterator and loop position; a run
saved on one device resumes on a (2, 2, 2) mesh to the same result as an uninterrupted run."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from repo_jax import sharding as shd
from repo_jax.training import batch as bt
from repo_jax.training import optim
from repo_jax.training import state as st
from repo_jax.training import step as sp
from repo_jax.training.checkpoint import Checkpointer
from repo_jax.training.config import CheckpointConfig
from helpers import tiny_config

FAST = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
CFG = tiny_config("train.reference=params", "optim.lr=3.0e-3")
V = CFG.model.overrides["vocab_size"]


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, tok):
    from repo_jax.data import DataConfig, make_pipeline

    path = tmp_path_factory.mktemp("data") / "pairs.jsonl"
    rows = [{"prompt": f"Question {i}?", "response_a": "yes " * (1 + i % 4), "response_b": "no", "pref": 0.1 + 0.07 * i}
            for i in range(12)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = DataConfig(path=str(path), batch_size=8, num_epochs=2, seed=3, max_prompt_len=16, max_response_len=12,
                     length_buckets=(32,), chat_template=False, shard_index=0, shard_count=1)
    return make_pipeline(cfg, tok, kind="pair", log=None)


def _device_batch(raw, mesh):
    from repo_jax.data import batch_arrays

    b = bt.cast(batch_arrays(raw))
    b["input_ids_BxKxT"] = b["input_ids_BxKxT"] % V  # the tiny model's vocabulary
    return shd.global_batch(b, mesh)


def _mesh(shape):
    return shd.make_mesh(shd.MeshConfig(*shape), jax.devices()[: int(np.prod(shape))])


def test_resume_on_another_mesh_matches_uninterrupted_run(tmp_path, pipeline):
    tx = optim.make_optimizer(CFG.optim)
    factory = st.model_factory(CFG.model)
    mesh1 = _mesh((1, 1, 1))
    graphdef, state, sh1 = st.init_state(factory, tx, CFG.train, mesh1, compiler_options=FAST)
    init = jax.tree.map(np.asarray, state)
    step1 = sp.make_train_step(graphdef, CFG, mesh1, sh1, compiler_options=FAST)

    # uninterrupted: 3 steps on one device
    it = pipeline.iterator()
    for _ in range(3):
        state, m = step1(state, _device_batch(next(it), mesh1))
    assert int(state.step) == 3 and m["skipped"] == 0
    want = jax.tree.map(np.asarray, state)

    # interrupted: 1 step on one device, save everything, resume on (2, 2, 2) for 2 more steps
    it = pipeline.iterator()
    state = jax.device_put(init, sh1)
    state, _ = step1(state, _device_batch(next(it), mesh1))
    with Checkpointer(tmp_path / "ckpt", CheckpointConfig(every_steps=1, keep=2)) as ckpt:
        assert ckpt.save(1, state, loop={"step": 1, "reference": "state.ref_params"}, data_iterator=it)
        ckpt.wait()
        assert ckpt.saved_items(1) == {"state", "reference", "data", "loop"}
    del state, it

    mesh8 = _mesh((2, 2, 2))
    _, abstract = st.abstract_state(factory, tx, CFG.train)
    sh8 = shd.state_shardings(abstract, mesh8)
    it = pipeline.iterator()  # fresh, at the first batch: the restore moves it
    with Checkpointer(tmp_path / "ckpt", CheckpointConfig(every_steps=1, keep=2)) as ckpt:
        state, loop = ckpt.restore(abstract, sh8, data_iterator=it)
    assert loop == {"step": 1, "reference": "state.ref_params"} and int(state.step) == 1
    assert state.params["layers"]["w_up"].sharding.spec == sh8.params["layers"]["w_up"].spec
    assert state.ref_params["layers"]["w_up"].sharding.mesh.shape == mesh8.shape
    step8 = sp.make_train_step(graphdef, CFG, mesh8, sh8, compiler_options=FAST)
    for _ in range(2):
        state, _ = step8(state, _device_batch(next(it), mesh8))
    got = jax.tree.map(np.asarray, state)
    assert int(got.step) == 3
    for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_keeps_the_newest_and_saves_on_schedule(tmp_path):
    from repo_jax.training.state import TrainState
    import jax.numpy as jnp

    z = jnp.zeros((), jnp.int32)
    state = TrainState(step=z, params={"w": jnp.arange(4.0)}, opt_state=(), rng=jnp.zeros((2,), jnp.uint32),
                       nonfinite_in_a_row=z, nonfinite_total=z)
    with Checkpointer(tmp_path, CheckpointConfig(every_steps=2, keep=2)) as ckpt:
        saved = [ckpt.save(s, state.replace(step=jnp.int32(s)), loop={"s": s}) for s in range(1, 8)]
        ckpt.wait()
        assert saved == [False, True, False, True, False, True, False]
        assert ckpt.all_steps() == [4, 6] and ckpt.latest_step() == 6
        abstract = jax.eval_shape(lambda: state)
        restored, loop = ckpt.restore(abstract, shd.state_shardings(abstract, _mesh((1, 1, 1))), step=4)
    assert loop == {"s": 4} and int(restored.step) == 4
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        Checkpointer(tmp_path / "empty").restore(abstract, None)
