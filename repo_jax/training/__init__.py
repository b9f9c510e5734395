"""Sharded training core: train state, jitted train step, optimiser, Orbax checkpoints.

* :mod:`~repo_jax.training.config`      ``RunConfig`` and its sections (model, mesh, train, optim, checkpoint)
* :mod:`~repo_jax.training.batch`       the batch layout (field names shared with ``repo_jax.data``)
* :mod:`~repo_jax.training.objectives`  loss registry: batch + log-ratios -> ``repo_jax.losses`` call, metrics
* :mod:`~repo_jax.training.optim`       AdamW, warm-up + cosine, global-norm clipping
* :mod:`~repo_jax.training.state`       ``TrainState``; sharded init (``eval_shape`` -> shardings -> jit)
* :mod:`~repo_jax.training.step`        ``make_train_step`` / ``make_reference_logprobs`` (pure, jitted)
* :mod:`~repo_jax.training.checkpoint`  ``Checkpointer``: state + reference + data iterator + loop JSON

Typical use::

    cfg = config.load(RunConfig, "configs/tiny.yaml")
    mesh = sharding.make_mesh(cfg.mesh)
    tx = optim.make_optimizer(cfg.optim)
    graphdef, state, shardings = state.init_state(state.model_factory(cfg.model), tx, cfg.train, mesh,
                                                 tolerance=cfg.mesh.sharding_tolerance)
    train_step = step.make_train_step(graphdef, cfg, mesh, shardings)
    state, metrics = train_step(state, sharding.global_batch(batch.cast(host_batch), mesh))
"""
