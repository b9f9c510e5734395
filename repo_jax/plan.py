"""``python -m repo_jax.plan --config configs/mistral7b_irepo.yaml [--slice NAME] [key=value ...]``

Scale planning without hardware or weights: lowers and compiles the real-size programs of a
run for the device count of the slice the config names (``slice:``, else ``--devices``, default
8) on fake CPU devices (abstract inputs: ``nnx.eval_shape`` of the model, no arrays), and
reports, per device, the memory of each phase of a round with what is resident beside it (the
train state and, for the loop's KL estimate, the ``pi_0`` copy): the train step, the reference
pass, the sampler program at the loop's slots and lengths (a decoding copy of the weights in the
sampling layout plus its KV cache), in-process judges (weights loaded whole on one device), and
whether each fits the config's slice, a TPU v5e-8, a v5p-8 and 8 x H100 80 GB (a slice with
another device count shows "—": plan it with ``--slice``). A batch that the mesh and
micro-batches cannot split is an error proposing the nearest valid values.

The device count is fixed when XLA starts, so the program re-executes itself with
``XLA_FLAGS=--xla_force_host_platform_device_count=N`` when needed. Memory is XLA:CPU's
estimate of the same partitioned programs: arguments (state shards, batch shards) are exact,
temporaries follow CPU fusion decisions and are a guide, not a promise. The analytic FLOPs
(``repo_jax.models.flops_per_token``) are the whole train step.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
from pathlib import Path

GiB = 1024**3
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


from repo_jax.slices import COMPARE, SLICES, Slice  # noqa: F401 (Slice: re-exported)


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


def _device_bytes(tree) -> int:
    """Bytes one device holds of ``tree``'s abstract arrays (by their shardings' shard shapes)."""
    import jax
    import numpy as np

    total = 0
    for x in jax.tree.leaves(tree):
        sharding = getattr(x, "sharding", None)
        shape = sharding.shard_shape(x.shape) if sharding is not None else x.shape
        total += math.prod(shape) * np.dtype(x.dtype).itemsize
    return total


def _memory(compiled) -> dict[str, int]:
    """XLA's per-device memory of a compiled program: arguments, outputs, aliased, temporaries."""
    mem = compiled.memory_analysis()
    out = {k: int(getattr(mem, f"{k}_size_in_bytes", 0) or 0) for k in ("argument", "output", "alias", "temp")}
    out["peak"] = out["argument"] + out["output"] - out["alias"] + out["temp"]
    return out


def _judge_phase(cfg) -> tuple[int, str]:
    """Device bytes of the panel's in-process members: an LLM judge's weights, loaded whole on one
    device beside the resident state (its activations are not counted); served members and rules
    hold nothing on the accelerator, a reward model runs in torch on the host."""
    import numpy as np

    from repo_jax import models
    from repo_jax.training.state import resolve_path

    total, notes = 0, []
    for spec in getattr(getattr(cfg, "annotate", None), "panel", ()):
        if spec.kind != "judge":
            continue
        try:
            jcfg = models.load_config(resolve_path(spec.model), dtype=spec.dtype, param_dtype=spec.dtype)
        except (OSError, ValueError) as e:
            notes.append(f"judge {spec.model}: not found here, not counted ({type(e).__name__})")
            continue
        total += models.param_count(jcfg) * np.dtype(spec.dtype).itemsize
    return total, "; ".join(notes)


def plan(cfg, *, fast_compile: bool = False, name: str = "", sampler: bool = True) -> dict:
    """Compiles ``cfg``'s programs on the current devices with abstract inputs and returns, per
    device, the memory of each phase of the run (see the module docstring) as a dict."""
    import jax
    import numpy as np
    from flax import nnx

    from repo_jax import config as config_lib
    from repo_jax import models, sampling
    from repo_jax import sharding as shd
    from repo_jax.loop.config import IrepoConfig, schedule_steps
    from repo_jax.models.config import LoraConfig
    from repo_jax.runs import batch_problem, planned_steps, run_mesh
    from repo_jax.sampling.program import generate_program
    from repo_jax.training import batch as bt
    from repo_jax.training import optim
    from repo_jax.training import state as st
    from repo_jax.training import step as sp
    from repo_jax.training.checkpoint import abstract_target

    options = FAST_COMPILE if fast_compile else None
    mesh = run_mesh(cfg)
    bad = batch_problem(cfg.train, mesh)
    if bad:
        raise config_lib.ConfigError(bad)
    mcfg = st.model_config(cfg.model)
    loop = isinstance(cfg, IrepoConfig)
    steps, steps_what = planned_steps(cfg)
    horizon = schedule_steps(cfg)[0] if loop else steps
    cfg = dataclasses.replace(cfg, optim=optim.resolve(cfg.optim, max(horizon, 1)))
    tx = optim.make_optimizer(cfg.optim)
    graphdef, abstract = st.abstract_state(lambda: models.build(mcfg), tx, cfg.train)
    shardings = shd.state_shardings(abstract, mesh, tolerance=cfg.mesh.sharding_tolerance)
    target = abstract_target(abstract, shardings)
    t = cfg.train
    state_b = _device_bytes(target)
    params_b = _device_bytes(target.params) + _device_bytes(target.frozen)
    phases = []

    # pi_0 (the loop's KL estimate keeps the starting parameters; a LoRA base is shared unless folded)
    pi0 = 0
    if loop and cfg.eval.kl_samples:
        pi0 = _device_bytes(target.params) + (_device_bytes(target.frozen) if cfg.loop.lora_merge == "every_round" else 0)
    resident = state_b + pi0

    # the train step
    batch = bt.abstract(batch_fields(cfg), t.batch_size, t.num_responses, t.seq_len, shd.batch_sharding(mesh))
    step = sp.make_train_step(graphdef, cfg, mesh, shardings, compiler_options=options)
    compiled = step.lower(target, batch).compile()
    train = _memory(compiled)
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    phases.append({"phase": "train step", "bytes": train["peak"] + pi0,
                   "note": f"state+batch {train['argument'] / GiB:.2f}, temporaries {train['temp'] / GiB:.2f}"})

    # the reference pass (once a round, or once before offline training), beside the train state
    ref_fields = tuple(f for f in batch_fields(cfg) if f != "ref_logps_BxK")
    ref_fn = sp.make_reference_logprobs(graphdef, t, mesh, shardings.params, frozen_shardings=shardings.frozen,
                                        compiler_options=options)
    ref = _memory(ref_fn.lower(target.params, target.frozen, bt.abstract(ref_fields, t.batch_size, t.num_responses,
                                                                       t.seq_len, shd.batch_sharding(mesh))).compile())
    phases.append({"phase": "reference pass", "bytes": resident + ref["peak"] - params_b,
                   "note": f"temporaries {ref['temp'] / GiB:.2f}"})

    if loop and sampler:  # the round's sampler program: a decoding copy of the policy, KV cache of the slots
        smcfg = sampling.decoding_config(dataclasses.replace(mcfg, lora=LoraConfig()))  # adapters merged in
        sgraph, sstate = nnx.split(nnx.eval_shape(lambda: models.build(smcfg)))
        n_new = max(cfg.sample.max_new_tokens, cfg.eval_max_new_tokens)
        prompts = [[1] * cfg.data.max_prompt_len] * cfg.loop.prompts_per_round
        smesh = mesh if mesh.size > 1 else None
        inputs, static = sampling.program_inputs(
            prompts, max_new_tokens=n_new, temperature=cfg.sample.temperature, top_k=cfg.sample.top_k,
            top_p=cfg.sample.top_p, eos_id=0, num_samples=cfg.loop.num_responses, mesh=smesh,
            slots=cfg.loop.sample_batch, share_prefix=False)
        if smesh is not None:
            sstate = abstract_target(sstate, sampling.param_shardings(sstate, mesh))
            repl = shd.replicated(mesh)
            inputs = tuple(jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype, sharding=repl) for x in inputs)
        with shd.mesh_rules(smesh, shd.SAMPLE_RULES):
            lowered = generate_program.lower(sstate, *inputs, graphdef=sgraph, static=static)
        samp = _memory(lowered.compile(compiler_options=options) if options else lowered.compile())
        phases.append({"phase": "sampler", "bytes": resident + samp["peak"],
                       "note": f"{static.stages[0]} slots x {inputs[2].shape[1] + static.buffer_len} tokens, "
                               f"weights copy {_device_bytes(sstate) / GiB:.2f}, temporaries {samp['temp'] / GiB:.2f}"})
    if loop:
        judge_b, note = _judge_phase(cfg)
        phases.append({"phase": "in-process judges", "bytes": resident + judge_b,
                       "note": note or ("none: served / rule members only" if not judge_b else
                                        f"judge weights {judge_b / GiB:.2f} on one device (activations not counted)")})
    phases.append({"phase": "pi_0 copy", "bytes": pi0, "note": "eval.kl_samples > 0" if pi0 else "none"})

    tokens = t.batch_size * t.seq_len * (1 if t.layout == "shared" else t.num_responses)
    analytic = models.flops_per_token(mcfg, t.seq_len) * tokens
    peak = max(p["bytes"] for p in phases)
    own = SLICES.get(cfg.slice)
    targets = ([cfg.slice] if own else []) + [s for s in COMPARE if s != cfg.slice]

    def fits(name: str, b: int) -> bool | None:  # None: the slice has another device count
        s = SLICES[name]
        return b <= s.hbm_gib * GiB if s.chips == mesh.size else None

    for p in phases:
        p["fits"] = {s: fits(s, p["bytes"]) for s in targets}
    sampled = cfg.loop.rounds * cfg.loop.prompts_per_round * cfg.loop.num_responses * cfg.sample.max_new_tokens if loop else 0
    return {
        "config": name,
        "slice": cfg.slice,
        "model": f"{mcfg.hf_model_type} {mcfg.num_layers}x{mcfg.hidden_size}",
        "params": models.param_count(mcfg),
        "devices": mesh.size,
        "mesh": tuple(mesh.shape[a] for a in shd.MESH_AXES),
        "batch": f"{t.batch_size}x{t.num_responses}x{t.seq_len}" + (" shared" if t.layout == "shared" else ""),
        "micro_batches": t.micro_batches,
        "compute": f"{cfg.model.dtype} / {cfg.model.param_dtype} master, remat {cfg.model.remat}"
                   + (f", LoRA r{cfg.model.lora.rank}" if cfg.model.lora.rank else ""),
        "phases": phases,
        "state_gib": state_b / GiB,
        "argument_gib": train["argument"] / GiB,
        "temp_gib": train["temp"] / GiB,
        "peak_gib": peak / GiB,
        "steps": steps,
        "steps_what": steps_what,
        "train_tokens": steps * tokens,
        "sampled_tokens": sampled,
        "xla_flops_per_device": float(cost.get("flops", 0.0)) if cost else 0.0,
        "analytic_flops_per_step": analytic,
        "fits": {s: (None if any(p["fits"][s] is None for p in phases) else all(p["fits"][s] for p in phases))
                 for s in targets},
    }


def _count(n: float) -> str:
    return f"{n / 1e6:,.1f}M" if n >= 1e6 else f"{n / 1e3:,.0f}k" if n >= 1e3 else f"{n:.0f}"


def _yes(v: bool | None) -> str:
    return "—" if v is None else "yes" if v else "**no**"


def phase_table(r: dict) -> str:
    """One plan's phases as a markdown table (GiB per device and where each fits)."""
    targets = list(r["fits"])
    lines = ["| phase | GiB per device | " + " | ".join(targets) + " | what |", "|---|---:|" + "---|" * (len(targets) + 1)]
    for p in r["phases"]:
        lines.append(f"| {p['phase']} | {p['bytes'] / GiB:.2f} | " + " | ".join(_yes(p["fits"][s]) for s in targets)
                     + f" | {p['note']} |")
    return "\n".join(lines)


def table(rows: list[dict]) -> str:
    """The plans as one markdown table (the README's scale table): config, slice, per-phase GiB per
    chip, whether the whole round fits the config's slice, optimiser steps and tokens per run."""
    head = ("| config | slice | model | mesh (data, fsdp, tensor) | train / ref / sample / judges / pi_0 GiB per chip "
            "| fits its slice | optimiser steps per run | tokens per run (trained ≤ / sampled ≤) |")
    lines = [head, "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        by = {p["phase"]: p["bytes"] / GiB for p in r["phases"]}
        cells = " / ".join(f"{by[k]:.1f}" if k in by else "–"
                           for k in ("train step", "reference pass", "sampler", "in-process judges", "pi_0 copy"))
        own = _yes(r["fits"].get(r["slice"])) if r["slice"] else "(no slice)"
        steps = f"{r['steps']:,}" if r["steps"] else r["steps_what"]
        tok = f"{_count(r['train_tokens'])} / {_count(r['sampled_tokens'])}" if r["steps"] else "–"
        lines.append(f"| {r['config']} | {r['slice'] or '–'} ({r['devices']}) | {r['model']} | {tuple(r['mesh'])} | {cells} "
                     f"| {own} | {steps} | {tok} |")
    return "\n".join(lines)


def load_config(path: str, overrides=()):
    """A shipped YAML as its program's config, with ``train`` shaped like the largest batch the
    run will see (offline programs: from the data section)."""
    import yaml

    from repo_jax import config as config_lib
    from repo_jax.offline.config import OfflineConfig, config_class, planned_train

    with open(path) as f:
        cls = config_class(yaml.safe_load(f) or {})
    cfg = config_lib.load(cls, path, list(overrides))
    if isinstance(cfg, OfflineConfig):
        cfg = dataclasses.replace(cfg, train=planned_train(cfg))
    return cfg


def _slice_of(path: str, overrides) -> str:
    import yaml

    for o in overrides:
        if o.startswith("slice="):
            return o.split("=", 1)[1]
    with open(path) as f:
        return (yaml.safe_load(f) or {}).get("slice", "") or ""


def plan_all(folder: str, fast_compile: bool) -> int:
    """``--all FOLDER``: every YAML in ``FOLDER`` planned at its slice's device count (one process
    each), then the one table the README's scale section shows."""
    import json
    import subprocess

    rows = []
    for path in sorted(Path(folder).glob("*.yaml")):
        cmd = [sys.executable, "-m", "repo_jax.plan", "--config", str(path), "--json",
               *(["--fast-compile"] if fast_compile else [])]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode:
            print(f"error: {path}: {out.stderr.strip().splitlines()[-1] if out.stderr.strip() else out.returncode}",
                  file=sys.stderr)
            return out.returncode
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(f"planned {path}", file=sys.stderr)
    print(table(rows))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m repo_jax.plan", description=__doc__.split("\n\n")[1])
    parser.add_argument("--config", help="a training YAML (configs/*.yaml)")
    parser.add_argument("--all", metavar="FOLDER", help="plan every YAML in FOLDER at its slice; print one table")
    parser.add_argument("--json", action="store_true", help="print the plan as one JSON line")
    parser.add_argument("--devices", type=int, default=0,
                        help="fake CPU devices to plan for (default: the chips of the config's slice, else 8)")
    parser.add_argument("--slice", default="", help=f"plan for this slice instead of the config's ({', '.join(SLICES)})")
    parser.add_argument("--fast-compile", action="store_true", help="skip XLA backend optimisation (tests)")
    parser.add_argument("--twin", action="store_true", help="plan the config's scaled twin (repo_jax.twin)")
    parser.add_argument("overrides", nargs="*", help="key.sub=value config overrides")
    args = parser.parse_args(argv)
    if args.all:
        return plan_all(args.all, args.fast_compile)
    if not args.config:
        parser.error("--config or --all is required")
    overrides = list(args.overrides) + ([f"slice={args.slice}"] if args.slice else [])
    name = _slice_of(args.config, overrides)
    if name and name not in SLICES:
        print(f"error: slice={name!r} is not one of {', '.join(SLICES)}", file=sys.stderr)
        return 2
    devices = args.devices or (SLICES[name].chips if name else 8)
    _ensure_devices(devices, argv)

    from repo_jax import config as config_lib
    from repo_jax.loop.config import IrepoConfig
    from repo_jax.offline.config import planned_train

    try:
        cfg = load_config(args.config, overrides)
        if args.twin:
            from repo_jax.twin import twin

            cfg = twin(cfg, judge_url="http://127.0.0.1:1/v1")  # planning asks no annotator
            if not isinstance(cfg, IrepoConfig):
                cfg = dataclasses.replace(cfg, train=planned_train(cfg))
        r = plan(cfg, fast_compile=args.fast_compile, name=os.path.basename(args.config))
    except config_lib.ConfigError as e:
        print(f"error: {args.config}: {e}", file=sys.stderr)
        return 2
    if args.json:
        import json

        print(json.dumps(r))
        return 0
    print(f"plan: {args.config} on {r['devices']} devices, mesh (data, fsdp, tensor) = {r['mesh']}"
          + (f", sized for {r['slice']} ({SLICES[r['slice']].what})" if r["slice"] else ""))
    print(f"  {r['model']}, {r['params'] / 1e9:.2f} B parameters; batch {r['batch']} in {r['micro_batches']} "
          f"micro-batches; {r['compute']}")
    print(f"  optimiser steps per run: {r['steps'] or '?'} ({r['steps_what']}); FLOPs per step "
          f"{r['analytic_flops_per_step']:.3e} analytic (all devices)")
    print()
    print(phase_table(r))
    print()
    verdict = {s: _yes(v) for s, v in r["fits"].items()}
    print("whole round fits: " + ", ".join(f"{s}: {v}" for s, v in verdict.items())
          + "   (—: another device count; plan it with --slice NAME)")
    print()
    print(table([r]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
