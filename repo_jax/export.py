"""``python -m repo_jax.export RUN_DIR [--step N] [--out DIR] [--dtype D] [--list]``: the policy of
any checkpoint of a run, finished or not, as an HF folder.

A run of ``python -m repo_jax.irepo``, ``repo_jax.lpo`` or ``repo_jax.sft`` writes ``run_dir/policy``
only when it reaches its end. This command exports any checkpoint the run has left: a run stopped
at round 2 of 3, an earlier round's policy, a run still going. It reads the run's saved
``config.yaml``, builds the model as the program does (``model.weights``, or the random init of
``model.config`` seeded by ``train.seed``; with LoRA that base, whose checksum must be the one
the checkpoint recorded), restores the checkpoint onto the run's mesh and writes what the
program's own export writes:

* ``DIR``: an HF folder (``config.json``, safetensors, the tokenizer) with any LoRA adapters
  merged in, for ``transformers`` and every ``--model`` of this project;
* ``DIR/adapter``, with LoRA: the adapters as a PEFT folder, for ``peft.PeftModel`` on
  ``model.weights`` (not with ``loop.lora_merge=every_round``, whose base absorbs them).

``--step N``: the checkpoint's number (a folder name under ``checkpoints``; default the newest);
``--list`` prints every one with what it holds (the round or optimiser step reached).
``--out`` (default ``RUN_DIR/export/step_N``) must be new or empty. ``--dtype`` casts the
weights (default ``model.param_dtype``). A ``gs://`` run's files are downloaded to its local copy
(``repo_jax.buckets``) and its checkpoints read from the bucket; give it a local ``--out``.
The run's mesh must fit the devices this process sees (``fsdp: -1`` fits any count: a
checkpoint saved on 8 devices is resharded onto 1). Exit status: 0 written (or listed), 2 for a
folder that holds no run, no such checkpoint, or a bad argument.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from repo_jax import buckets
from repo_jax.config import ConfigError

DTYPES = ("bfloat16", "float32", "float16")


def load_run_config(run_dir: str):
    """``(cfg, local)``: the saved config of the run in ``run_dir`` (as its program's config class,
    with ``run_dir`` where the folder is now) and the folder's local path (a ``gs://`` run's files
    are pulled into its local copy first)."""
    import yaml

    from repo_jax import config as config_lib
    from repo_jax.offline.config import config_class

    if buckets.is_remote(run_dir):
        buckets.Mirror(run_dir, writer=False).pull()
    local = buckets.local_path(run_dir)
    saved = local / "config.yaml"
    if not saved.is_file():
        raise ConfigError(f"{run_dir}: no config.yaml, so no run of python -m repo_jax.irepo, lpo or sft "
                          "(RUN_DIR is the run_dir a program was given)")
    cls = config_class(yaml.safe_load(saved.read_text()) or {})  # loop -> iREPO, pairs -> LPO, else SFT
    return dataclasses.replace(config_lib.load(cls, saved), run_dir=run_dir), local


def describe(loop: dict) -> str:
    """Where a checkpoint stands, from its ``loop`` item."""
    def steps(n: int) -> str:
        return f"{n} optimiser step{'' if n == 1 else 's'}"

    if "iteration" in loop:  # the iREPO loop
        t, total = loop["iteration"], steps(loop.get("global_steps", 0))
        if loop.get("phase") == "train":
            return f"inside round {t + 1}, {steps(loop.get('train_pos', 0))} into it, {total} in all"
        return "the starting policy" if t <= 0 else f"after round {t}, {total} in all"
    return "the starting policy" if not loop.get("step") else f"after {steps(loop['step'])}"


def open_checkpoints(cfg):
    """The run's ``Checkpointer`` and its steps; ``ConfigError`` when it saved none."""
    from repo_jax.training.checkpoint import Checkpointer

    where = cfg.checkpoint_dir
    if not buckets.is_remote(where) and not Path(where).is_dir():
        raise ConfigError(f"{cfg.run_dir}: no checkpoints ({where} does not exist): the run saved none yet")
    ck = Checkpointer(where)
    steps = sorted(ck.all_steps())
    if not steps:
        ck.close()
        raise ConfigError(f"{cfg.run_dir}: no checkpoints in {where}: the run saved none yet")
    return ck, steps


def restore_policy(cfg, ck, step: int):
    """``(graphdef, state, loop)``: checkpoint ``step`` restored onto the model ``cfg`` describes,
    built as its program builds it, on the run's mesh."""
    import jax

    from repo_jax.runs import base_record, check_lora_base, run_mesh
    from repo_jax.training import optim
    from repo_jax.training import state as st

    try:
        mesh = run_mesh(cfg)
    except ConfigError as e:
        raise ConfigError(f"{cfg.run_dir}: the checkpoint is restored onto the run's mesh, which does not fit "
                          f"here: {e}") from None
    m = cfg.model
    if m.weights:
        model = st.pretrained_model(m, mesh, seed=cfg.train.seed)
    else:
        model = st.model_factory(m, seed=cfg.train.seed)()
    tx = optim.make_optimizer(optim.resolve(cfg.optim, 1))  # the schedule's values do not shape the state
    graphdef, state, shardings = st.state_from_model(model, tx, cfg.train, mesh, tolerance=cfg.mesh.sharding_tolerance)
    abstract, frozen, base = jax.eval_shape(lambda s: s, state), state.frozen, base_record(m.weights, state.frozen)
    del model, state  # the restore allocates its own arrays
    restored, loop = ck.restore(abstract, shardings, step=step)
    if restored.frozen is None:  # the base is the loaded weights (a folding loop saves its own)
        check_lora_base(f"{ck.directory} step {step}", loop, base, action="export")
        restored = restored.replace(frozen=frozen)
    return graphdef, restored, loop


def export(run_dir, *, step: int | None = None, out=None, dtype: str | None = None, log=print) -> Path:
    """Writes checkpoint ``step`` (default the newest) of the run in ``run_dir`` to ``out``
    (default ``run_dir/export/step_<step>``; with LoRA also ``out/adapter``); returns ``out``."""
    from repo_jax.runs import load_tokenizer_for
    from repo_jax.training import state as st

    run_dir = str(run_dir).rstrip("/") or "/"
    if dtype is not None and dtype not in DTYPES:
        raise ConfigError(f"--dtype {dtype}: one of {', '.join(DTYPES)}")
    if out is None and buckets.is_remote(run_dir):
        raise ConfigError(f"{run_dir}: a gs:// run needs --out, a local folder")
    cfg, local = load_run_config(run_dir)
    ck, steps = open_checkpoints(cfg)
    try:
        step = steps[-1] if step is None else step
        if step not in steps:
            raise ConfigError(f"{ck.directory}: no checkpoint step {step}; the run has steps "
                              f"{', '.join(map(str, steps))} (python -m repo_jax.export {run_dir} --list)")
        out = Path(out) if out is not None else local / "export" / f"step_{step}"
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise ConfigError(f"{out} exists and is not an empty folder: remove it or give another --out")
        graphdef, state, loop = restore_policy(cfg, ck, step)
    finally:
        ck.close()
    merged_each_round = getattr(getattr(cfg, "loop", None), "lora_merge", "never") != "never"
    adapter = out / "adapter" if cfg.model.lora.rank and not merged_each_round else None
    if not st.export_policy(graphdef, state, load_tokenizer_for(cfg.model), out, adapter_out=adapter,
                            base_model=cfg.model.weights, dtype=dtype):
        raise ConfigError("the export runs in one process (this one is one of several)")
    log(f"{run_dir} step {step} ({describe(loop)}): {out}" + (f"; PEFT adapter: {adapter}" if adapter else ""))
    return out


def list_steps(run_dir, log=print) -> list[int]:
    """Prints each checkpoint step of the run in ``run_dir`` with where it stands; returns them."""
    cfg, _ = load_run_config(str(run_dir).rstrip("/") or "/")
    ck, steps = open_checkpoints(cfg)
    try:
        for s in steps:
            log(f"step {s}: {describe(ck.loop_item(s))}")
    finally:
        ck.close()
    return steps


def main(argv: list[str] | None = None) -> int:
    import jax

    from repo_jax.assets import cache_dir

    ap = argparse.ArgumentParser(prog="python -m repo_jax.export", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir", metavar="RUN_DIR", help="the run's folder (its run_dir), local or gs://")
    ap.add_argument("--step", type=int, default=None, help="the checkpoint to export (default: the newest)")
    ap.add_argument("--out", default=None, metavar="DIR", help="where to write (default: RUN_DIR/export/step_N)")
    ap.add_argument("--dtype", choices=DTYPES, default=None, help="the weights' dtype (default: model.param_dtype)")
    ap.add_argument("--list", action="store_true", help="list the checkpoints and what each holds, export nothing")
    args = ap.parse_args(argv)
    if not jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", str(cache_dir() / "xla"))
    try:
        if args.list:
            list_steps(args.run_dir)
        else:
            export(args.run_dir, step=args.step, out=args.out, dtype=args.dtype)
    except (ValueError, OSError, ImportError) as e:  # ConfigError is a ValueError
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
