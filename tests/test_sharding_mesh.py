"""Meshes from config, state shardings from logical names, multi-host start-up, per-host data."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx

from repo_jax import sharding as shd


def test_mesh_config_resolves_the_rest_and_names_the_bad_key():
    assert shd.MeshConfig().shape(8) == (1, 8, 1)
    assert shd.MeshConfig(data=2, fsdp=-1, tensor=2).shape(8) == (2, 2, 2)
    assert shd.MeshConfig(data=-1, fsdp=2, tensor=1).shape(8) == (4, 2, 1)
    with pytest.raises(ValueError, match="mesh.data.*mesh.fsdp"):
        shd.MeshConfig(data=-1, fsdp=-1).shape(8)
    with pytest.raises(ValueError, match="mesh.fsdp=-1: 8 devices"):
        shd.MeshConfig(tensor=3).shape(8)
    with pytest.raises(ValueError, match="must equal the 8 devices"):
        shd.MeshConfig(data=2, fsdp=2, tensor=1).shape(8)
    with pytest.raises(ValueError, match="mesh.tensor must be a positive size"):
        shd.MeshConfig(tensor=0).shape(8)


def test_make_mesh_is_auto_and_ordered():
    mesh = shd.make_mesh(shd.MeshConfig(2, 2, 2))
    assert mesh.axis_names == ("data", "fsdp", "tensor") and tuple(mesh.shape.values()) == (2, 2, 2)
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
    assert shd.batch_size_multiple(mesh) == 4
    one = shd.make_mesh(shd.MeshConfig(1, 1, 1), jax.devices()[:1])
    assert one.size == 1 and shd.batch_size_multiple(one) == 1


class _M(nnx.Module):
    def __init__(self):
        p = lambda shape, names: nnx.Param(np.zeros(shape, np.float32), eager_sharding=False, out_sharding=names)
        self.embed = p((64, 16), ("vocab", "embed"))
        self.wq = p((2, 16, 4, 8), ("layers", "embed", "q_heads", "head_dim"))
        self.odd = p((2, 15, 3), ("layers", "embed", "mlp"))  # 15 % fsdp, 3 % tensor: replicated
        self.norm = p((16,), ("norm",))
        self.count = nnx.Variable(np.zeros((), np.int32))


def test_state_shardings_follow_logical_names():
    import optax

    mesh = shd.make_mesh(shd.MeshConfig(2, 2, 2))
    _, params, rest = nnx.split(nnx.eval_shape(_M), nnx.Param, ...)
    with pytest.warns(UserWarning, match=r"odd \(2, 15, 3\): dim 1 \(15\) over fsdp \(2\), dim 2 \(3\) over tensor"):
        sh = shd.state_shardings(params, mesh, tolerance=0.05)  # odd: 4.2% of the elements
    assert sh["embed"].spec == jax.P("tensor", "fsdp")
    assert sh["wq"].spec == jax.P(None, "fsdp", "tensor", None)
    assert sh["odd"].spec == jax.P(None, None, None)
    assert sh["norm"].spec == jax.P(None)
    assert shd.state_shardings(rest, mesh)["count"].spec == jax.P()
    sample = shd.state_shardings(params, mesh, shd.SAMPLE_RULES, tolerance=1.0)
    assert sample["embed"].spec == jax.P("tensor", None)  # sampling: no fsdp
    # optax moments keep the Params' metadata: laid out like their parameters, counts replicated
    opt = jax.eval_shape(optax.adam(1e-3).init, params)
    opt_sh = shd.state_shardings(opt, mesh, tolerance=1.0)
    assert opt_sh[0].mu["wq"].spec == sh["wq"].spec and opt_sh[0].count.spec == jax.P()


def test_initialize_distributed_reads_the_environment(monkeypatch):
    calls = []
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
    assert shd.initialize_distributed({}) is False
    assert shd.initialize_distributed({"TPU_WORKER_HOSTNAMES": "localhost"}) is False
    env = {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1"}
    assert shd.initialize_distributed(env) is True
    assert calls[-1] == {"coordinator_address": "10.0.0.1:1234", "num_processes": 2, "process_id": 1}
    assert shd.initialize_distributed({"TPU_WORKER_HOSTNAMES": "h0,h1,h2,h3"}) and calls[-1] == {}
    with pytest.raises(ValueError, match="JAX_PROCESS_ID must be an integer"):
        shd.initialize_distributed({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_PROCESS_ID": "one"})


def test_host_local_batch_becomes_a_global_sharded_array():
    mesh = shd.make_mesh(shd.MeshConfig(2, 2, 2))
    assert shd.process_batch_slice(8) == slice(0, 8)  # one process holds every row
    local = {"input_ids_BxKxT": np.arange(8 * 2 * 3, dtype=np.int32).reshape(8, 2, 3), "pref_B": np.arange(8.0)}
    g = shd.global_batch(local, mesh)
    assert g["input_ids_BxKxT"].sharding.spec == jax.P(("data", "fsdp"))
    assert g["input_ids_BxKxT"].addressable_shards[0].data.shape == (2, 2, 3)
    np.testing.assert_array_equal(np.asarray(g["pref_B"]), local["pref_B"])


def test_undivided_dimensions_warn_with_their_names_and_fail_past_the_tolerance():
    from repo_jax import models

    cfg = models.ModelConfig(arch="mistral", hf_model_type="llama", vocab_size=250, hidden_size=64,
                             intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16)
    state = nnx.state(nnx.eval_shape(lambda: models.build(cfg)))
    # kv heads (2) and vocab (250) do not divide over tensor=4: wk, wv, embed, lm_head keep fsdp only
    mesh = shd.make_mesh(shd.MeshConfig(data=1, fsdp=2, tensor=4))
    with pytest.warns(UserWarning, match=r"layers\.wk \(2, 64, 2, 16\): dim 2 \(2\) over tensor \(4\).*top\.lm_head \(64, 250\): dim 1"):
        out = shd.state_shardings(state, mesh)
    assert out["top"]["embed"].spec == jax.P(None, "fsdp") and out["layers"]["wq"].spec == jax.P(None, "fsdp", "tensor", None)
    # on tensor=8 alone, heads, embedding and head are not split at all: 53% of the elements
    tensor8 = shd.make_mesh(shd.MeshConfig(data=1, fsdp=1, tensor=8))
    with pytest.raises(ValueError, match=r"top\.embed \(250, 64\): dim 0 \(250\) over tensor \(8\).*tolerance of 2%.*"
                                         r"raise mesh\.sharding_tolerance"):
        shd.state_shardings(state, tensor8)
    with pytest.warns(UserWarning, match="53.3%"):  # a config that accepts it
        shd.state_shardings(state, tensor8, tolerance=shd.MeshConfig(sharding_tolerance=0.6).sharding_tolerance)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a mesh that divides everything says nothing
        shd.state_shardings(state, shd.make_mesh(shd.MeshConfig(data=2, fsdp=2, tensor=2)))
