"""``python -m repo_jax.plan --config configs/mistral7b_irepo.yaml --devices 8 [key=value ...]``

Scale planning without hardware or weights: lowers and compiles the real-size train step for
``--devices`` fake CPU devices (abstract inputs: ``nnx.eval_shape`` of the model, no arrays),
then prints per-device memory from ``compiled.memory_analysis()``, FLOPs from
``compiled.cost_analysis()`` next to the analytic count, and whether the step fits the HBM of a
TPU v5e (16 GiB), TPU v5p (95 GiB) and an H100 (80 GiB) per device.

The device count is fixed when XLA starts, so the program re-executes itself with
``XLA_FLAGS=--xla_force_host_platform_device_count=N`` when needed. Memory is XLA:CPU's
estimate of the same partitioned program: the arguments (train state shard + batch shard) are
exact, temporaries follow CPU fusion decisions and are a guide, not a promise. XLA counts a
``scan``/``while`` body once, so its FLOPs cover one layer and one micro-batch; the analytic
column (``repo_jax.models.flops_per_token``) is the whole step.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

GiB = 1024**3
TARGETS = (("TPU v5e", 16), ("TPU v5p", 95), ("H100", 80))
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def _ensure_devices(n: int, argv: list[str]) -> None:
    """Re-executes this program with ``n`` fake CPU devices unless XLA already has them."""
    flag = f"--xla_force_host_platform_device_count={n}"
    if "jax" in sys.modules:
        import jax

        if jax.device_count() == n:
            return
    elif flag in os.environ.get("XLA_FLAGS", "").split() and os.environ.get("JAX_PLATFORMS") == "cpu":
        return
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
    env = dict(os.environ, XLA_FLAGS=" ".join([*flags, flag]), JAX_PLATFORMS="cpu")
    os.execve(sys.executable, [sys.executable, "-m", "repo_jax.plan", *argv], env)


def batch_fields(cfg) -> tuple[str, ...]:
    """The batch fields the configured loss and reference mode read (what the data pipeline sends)."""
    from repo_jax.training import objectives

    from repo_jax.training import batch as bt

    if cfg.train.layout == "shared":
        fields = [*bt.SHARED_REQUIRED, "example_mask_B"]
    else:
        fields = ["input_ids_BxKxT", "loss_mask_BxKxT", "attention_mask_BxKxT", "positions_BxKxT", "example_mask_B"]
        if not objectives.get(cfg.train.loss.name).pairwise:
            fields.append("list_mask_BxK")
    fields += objectives.get(cfg.train.loss.name).needs
    if cfg.train.reference == "batch":
        fields.append("ref_logps_BxK")
    return tuple(fields)


def plan(cfg, *, fast_compile: bool = False, name: str = "") -> dict:
    """Compiles ``cfg``'s train step on the current devices; returns the figures as a dict."""
    from repo_jax import models
    from repo_jax import sharding as shd
    from repo_jax.training import batch as bt
    from repo_jax.training import optim
    from repo_jax.training import state as st
    from repo_jax.training import step as sp
    from repo_jax.training.checkpoint import abstract_target

    mesh = shd.make_mesh(cfg.mesh)
    mcfg = st.model_config(cfg.model)
    tx = optim.make_optimizer(cfg.optim)
    graphdef, abstract = st.abstract_state(lambda: models.build(mcfg), tx, cfg.train)
    shardings = shd.state_shardings(abstract, mesh, tolerance=cfg.mesh.sharding_tolerance)
    t = cfg.train
    mult = shd.batch_size_multiple(mesh) * t.micro_batches
    if t.batch_size % mult:
        raise ValueError(f"train.batch_size={t.batch_size} must be a multiple of micro_batches x data x fsdp = {mult}")
    batch = bt.abstract(batch_fields(cfg), t.batch_size, t.num_responses, t.seq_len, shd.batch_sharding(mesh))
    step = sp.make_train_step(graphdef, cfg, mesh, shardings, compiler_options=FAST_COMPILE if fast_compile else None)
    compiled = step.lower(abstract_target(abstract, shardings), batch).compile()
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    tokens = t.batch_size * t.seq_len * (1 if t.layout == "shared" else t.num_responses)
    analytic = models.flops_per_token(mcfg, t.seq_len) * tokens
    if t.reference == "params":
        analytic += models.flops_per_token(mcfg, t.seq_len, training=False) * tokens
    args, out, alias, temp = (getattr(mem, f"{k}_size_in_bytes", 0) for k in ("argument", "output", "alias", "temp"))
    peak = args + out - alias + temp
    return {
        "config": name,
        "model": f"{mcfg.arch} {mcfg.num_layers}x{mcfg.hidden_size}",
        "params": models.param_count(mcfg),
        "devices": mesh.size,
        "mesh": tuple(mesh.shape[a] for a in shd.MESH_AXES),
        "batch": f"{t.batch_size}x{t.num_responses}x{t.seq_len}" + (" shared" if t.layout == "shared" else ""),
        "micro_batches": t.micro_batches,
        "compute": f"{cfg.model.dtype} / {cfg.model.param_dtype} master, remat {cfg.model.remat}"
                   + (f", LoRA r{cfg.model.lora.rank}" if cfg.model.lora.rank else ""),
        "argument_gib": args / GiB,
        "temp_gib": temp / GiB,
        "peak_gib": peak / GiB,
        "xla_flops_per_device": float(cost.get("flops", 0.0)) if cost else 0.0,
        "analytic_flops_per_step": analytic,
        "fits": {name: peak <= hbm * GiB for name, hbm in TARGETS},
    }


def table(rows: list[dict]) -> str:
    """The plans as a markdown table (the README's scale-planning table)."""
    head = ("| config | model | params | mesh (data, fsdp, tensor) | prompts x K x T (micro) | compute | state+batch / temp / "
            "peak GiB per device | TFLOPs/step (analytic) | " + " | ".join(f"{n} {h} GiB" for n, h in TARGETS) + " |")
    lines = [head, "|" + "---|" * (8 + len(TARGETS))]
    for r in rows:
        fits = " | ".join("yes" if r["fits"][n] else "no" for n, _ in TARGETS)
        lines.append(
            f"| {r['config']} | {r['model']} | {r['params'] / 1e9:.2f} B | {r['mesh']} | {r['batch']} ({r['micro_batches']}) | {r['compute']} "
            f"| {r['argument_gib']:.2f} / {r['temp_gib']:.2f} / {r['peak_gib']:.2f} "
            f"| {r['analytic_flops_per_step'] / 1e12:,.1f} | {fits} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m repo_jax.plan", description=__doc__.split("\n\n")[1])
    parser.add_argument("--config", required=True, help="a training YAML (configs/*.yaml)")
    parser.add_argument("--devices", type=int, default=8, help="fake CPU devices to plan for")
    parser.add_argument("--fast-compile", action="store_true", help="skip XLA backend optimisation (tests)")
    parser.add_argument("overrides", nargs="*", help="key.sub=value config overrides")
    args = parser.parse_args(argv)
    _ensure_devices(args.devices, argv)

    import yaml

    from repo_jax import config as config_lib
    from repo_jax.offline.config import OfflineConfig, config_class, planned_train

    with open(args.config) as f:
        cls = config_class(yaml.safe_load(f) or {})
    cfg = config_lib.load(cls, args.config, args.overrides)
    if isinstance(cfg, OfflineConfig):  # the offline programs' batch shape comes from the data section
        cfg = dataclasses.replace(cfg, train=planned_train(cfg))
    r = plan(cfg, fast_compile=args.fast_compile, name=os.path.basename(args.config))
    print(f"plan: {args.config} on {r['devices']} devices, mesh (data, fsdp, tensor) = {r['mesh']}")
    print(f"  per device: state+batch {r['argument_gib']:.2f} GiB, temporaries {r['temp_gib']:.2f} GiB, "
          f"peak {r['peak_gib']:.2f} GiB")
    print(f"  FLOPs per step: {r['analytic_flops_per_step']:.3e} analytic (all devices); XLA cost analysis "
          f"{r['xla_flops_per_device']:.3e} per device (loop bodies counted once)")
    print("  fits: " + ", ".join(f"{n} ({h} GiB): {'yes' if r['fits'][n] else 'no'}" for n, h in TARGETS))
    print()
    print(table([r]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
