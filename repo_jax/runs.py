"""What every program's run shares (``python -m repo_jax.irepo``, ``repo_jax.lpo``, ``repo_jax.sft``).

* the run folder: ``prepare_run_dir`` writes ``config.yaml`` or checks a resumed run's config
  against it (``ConfigMismatch`` names the differing keys); a ``gs://`` run_dir is a local copy
  mirrored to the bucket (``repo_jax.buckets``);
* ``RunBase``: progress bars, host -> device batches and back, and the checkpoint of a run's
  train state with its JSON progress item (``save`` / ``restore``, the prompt or batch
  iterator's position included);
* ``run_until_preempted``: SIGTERM sets a flag the run polls; the run checkpoints and raises
  ``Preempted``, which the command line turns into exit status 143;
* ``program_main``: the command line (``--config PATH`` and ``key.sub=value`` overrides;
  ``--help [KEY]`` lists the config keys or documents one: ``repo_jax.config_help``), the
  persistent XLA compilation cache, and the exit statuses (0 done, 1 an annotator failed, 2 bad
  config or input, 143 preempted).
"""

from __future__ import annotations

import dataclasses
import signal
import sys
from pathlib import Path
from typing import Callable

import jax
import numpy as np
import yaml

from repo_jax import buckets
from repo_jax import config as config_lib
from repo_jax import reporting
from repo_jax import sharding as shd
from repo_jax.training import batch as bt


class Preempted(Exception):
    """SIGTERM arrived; a checkpoint was written (or the last one is current)."""


class ConfigMismatch(config_lib.ConfigError):
    pass


# ------------------------------------------------------------------------ run folder, config


def _plain(x):
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    return x


@dataclasses.dataclass
class RunFolder:
    """A prepared run folder: ``path`` where this machine writes it; ``mirror`` its bucket copy
    when ``run_dir`` is ``gs://...`` (``repo_jax.buckets``); ``fresh`` when no run was there."""

    path: Path
    mirror: buckets.Mirror | None
    fresh: bool


def prepare_run_dir(cfg, resumable: tuple[str, ...] = ()) -> RunFolder:
    """Creates ``cfg.run_dir``, writes ``config.yaml``, or checks it against the saved one (the
    ``resumable`` keys may differ: a resumed run may, e.g., run more rounds). A ``gs://`` run_dir
    is first downloaded to its local copy, gets its ``config.yaml`` uploaded at once, and is then
    uploaded every ``checkpoint.upload_every_s`` seconds and after every checkpoint."""
    mirror = None
    if cfg.checkpoint.upload_every_s <= 0:
        raise config_lib.ConfigError(f"checkpoint.upload_every_s={cfg.checkpoint.upload_every_s} must be above 0")
    if buckets.is_remote(cfg.run_dir):
        mirror = buckets.Mirror(cfg.run_dir, writer=jax.process_index() == 0)
        mirror.pull()
    run_dir = buckets.local_path(cfg.run_dir)
    resolved = _plain(config_lib.to_dict(cfg))
    saved_path = run_dir / "config.yaml"
    fresh = not saved_path.is_file()
    if not fresh:
        saved = yaml.safe_load(saved_path.read_text()) or {}
        a, b = config_lib.flatten(saved), config_lib.flatten(resolved)
        diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k) and k not in resumable)
        if diff:
            shown = ", ".join(f"{k} ({a.get(k)!r} -> {b.get(k)!r})" for k in diff[:5])
            raise ConfigMismatch(f"{cfg.run_dir} holds a run with another config: {shown}"
                                 f"{' ...' if len(diff) > 5 else ''}; use a new run_dir or the saved config")
    if jax.process_index() == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        tmp = saved_path.with_suffix(".yaml.tmp")
        tmp.write_text(yaml.safe_dump(resolved, sort_keys=False))
        tmp.replace(saved_path)
    if mirror is not None:
        mirror.push()
        mirror.start(cfg.checkpoint.upload_every_s)
    return RunFolder(run_dir, mirror, fresh)


def forget_run_dir(folder: RunFolder) -> None:
    """Undoes a fresh :func:`prepare_run_dir` whose run was refused before it started: no
    ``config.yaml`` is left behind, here or in the bucket."""
    if folder.fresh and jax.process_index() == 0:
        (folder.path / "config.yaml").unlink(missing_ok=True)
        if folder.mirror is not None:
            folder.mirror.close(upload=False)
            folder.mirror.remove("config.yaml")


def planned_steps(cfg) -> tuple[int, str]:
    """Optimiser steps of the whole run (0 when the data decides: offline epochs) and where the
    number comes from."""
    from repo_jax.loop.config import IrepoConfig, steps_per_round

    if isinstance(cfg, IrepoConfig):
        per = steps_per_round(cfg)
        return per * cfg.loop.rounds, f"{cfg.loop.rounds} rounds x {per}"
    return cfg.train.steps, (f"train.steps={cfg.train.steps}" if cfg.train.steps else
                             f"data.num_epochs={cfg.data.num_epochs} passes (data-dependent)")


def run_mesh(cfg):
    """The run's mesh over every device; a mesh section the device count cannot fill is a
    ``ConfigError`` naming the keys and the count."""
    try:
        return shd.make_mesh(cfg.mesh)
    except ValueError as e:
        raise config_lib.ConfigError(f"{e} (this process sees {jax.device_count()} devices)") from None


def batch_problem(train, mesh) -> str | None:
    """Why ``train.batch_size`` cannot be split over ``mesh`` (the batch axes, data x fsdp) and
    ``train.micro_batches``, with the nearest values that can; ``None`` when it can."""
    rows = shd.batch_size_multiple(mesh)
    b, m = train.batch_size, train.micro_batches
    if m >= 1 and b >= 1 and b % (rows * m) == 0:
        return None
    mult = rows * max(m, 1)
    sizes = sorted({mult * max(b // mult, 1), mult * (b // mult + 1)})
    micro = [d for d in range(1, b // rows + 1) if b % rows == 0 and (b // rows) % d == 0]
    near = min(micro, key=lambda d: (abs(d - m), -d)) if micro else None
    shape = "x".join(str(mesh.shape[a]) for a in shd.batch_axes(mesh))
    fixes = " or ".join(f"train.batch_size={x}" for x in sizes)
    if near is not None:
        fixes += f", or train.micro_batches={near} ({b} = {near} x {b // near} rows, a multiple of {rows})"
    return (f"train.batch_size={b} must be a multiple of the mesh's batch devices (data x fsdp = {shape} = {rows}) "
            f"x train.micro_batches={m} = {mult} on {mesh.size} devices: use {fixes}")


def check_start(cfg, mesh, *, run_steps: int, what: str, unread=(), extra=(), log=print):
    """The start-up checks every program runs before any sampling or loading: the batch splits
    over the mesh (else ``ConfigError``, always); the schedule reaches ``optim.lr`` within the
    run's ``run_steps`` optimiser steps (``what``: where that number comes from), an explicit
    ``optim.total_steps`` and ``checkpoint.every_steps`` fit it, and no key is set that the
    program does not read (``unread``, ``extra``: more sentences). Those are refused together
    in one message, or logged with ``strict: false``. Returns ``cfg`` with ``optim`` resolved."""
    from repo_jax.training import optim

    bad = batch_problem(cfg.train, mesh)
    if bad:
        raise config_lib.ConfigError(bad)
    try:
        resolved = optim.resolve(cfg.optim, run_steps)
    except ValueError as e:
        raise config_lib.ConfigError(str(e)) from None
    problems = [*optim.schedule_problems(cfg.optim, run_steps, what), *unread, *extra]
    if cfg.checkpoint.every_steps > run_steps:
        problems.append(f"checkpoint.every_steps={cfg.checkpoint.every_steps} is never reached in the run's "
                        f"{run_steps} optimiser steps ({what}); lower it, or 0 (checkpoints at the natural boundaries)")
    if problems:
        text = "; ".join(problems)
        if cfg.strict:
            raise config_lib.ConfigError(f"{text} (strict=false runs it anyway)")
        log(f"warning (strict=false): {text}")
    _check_slice(cfg, mesh, log)
    if jax.process_index() == 0:
        log(f"schedule: {run_steps} optimiser step{'' if run_steps == 1 else 's'} ({what}); lr {resolved.lr:g}, warm-up {resolved.warmup_steps} "
            f"steps, {resolved.schedule}" + (f" to {resolved.lr * resolved.end_lr_ratio:g} at step {resolved.total_steps}"
                                              if resolved.schedule == "cosine" else ""))
    return dataclasses.replace(cfg, optim=resolved)


def _check_slice(cfg, mesh, log) -> None:
    from repo_jax.slices import SLICES

    s = SLICES.get(cfg.slice)
    if s is not None and jax.default_backend() != "cpu" and s.chips != mesh.size:
        log(f"warning: this config is sized for {cfg.slice} ({s.chips} chips) and runs on {mesh.size} devices: "
            f"plan it first (python -m repo_jax.plan --config ... --devices {mesh.size})")


def load_tokenizer_for(section):
    """The tokenizer of a ``model`` section (``model.tokenizer``, else from ``model.weights``)."""
    from repo_jax.assets import load_tokenizer
    from repo_jax.training.state import resolve_path

    source = section.tokenizer or section.weights
    if source == "bytes":
        from repo_jax.data.byte_tokenizer import ByteTokenizer

        return ByteTokenizer()
    if not source:
        raise config_lib.ConfigError("model.tokenizer and model.weights are both empty: a random-init model needs "
                                     "model.tokenizer (bytes, an HF folder or a .gguf)")
    return load_tokenizer(resolve_path(source))


# ------------------------------------------------------------------------------ a built run


class RunBase:
    """Helpers of a built run. A subclass sets ``cfg``, ``mesh``, ``main``, ``show_progress``,
    ``state`` (a ``TrainState``), ``abstract`` and ``shardings`` (its shape and placement),
    ``checkpointer``, ``iterator`` (a grain iterator) and ``progress`` (an instance of
    ``progress_cls``, a dataclass with ``saves`` and ``data_state`` fields). With LoRA,
    ``base_record`` (:meth:`record_base`) names the frozen base a checkpoint was trained on."""

    progress_cls: type
    base_record: dict | None = None
    mirror: buckets.Mirror | None = None  # a gs:// run_dir's bucket copy (prepare_run_dir)

    def record_base(self, weights: str) -> None:
        """With LoRA: remembers the base's source and exact checksum (``lora.checksum``); every
        save stores them, and :meth:`restore` refuses a checkpoint made on another base."""
        self.base_record = base_record(weights, self.state.frozen)

    def bar(self, iterable=None, *, desc: str, total=None, unit="it"):
        return reporting.progress(iterable, total=total, desc=desc, unit=unit,
                                  enabled=self.show_progress and self.main)

    def to_device(self, host: dict) -> dict:
        """A global batch every process holds whole: each feeds its own rows of it."""
        b = bt.cast(host)
        rows = shd.process_batch_slice(bt.dims(b)[0])
        return shd.global_batch({k: v[rows] for k, v in b.items()}, self.mesh)

    @staticmethod
    def to_host(x) -> np.ndarray:
        if jax.process_count() > 1 and not x.is_fully_addressable:
            from jax.experimental import multihost_utils

            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(jax.device_get(x))

    def save(self, **changes) -> None:
        """Checkpoints the train state with ``progress`` updated by ``changes``."""
        p = dataclasses.replace(self.progress, **changes, saves=self.progress.saves + 1)
        loop = dataclasses.asdict(p) | ({"lora_base": self.base_record} if self.base_record else {})
        self.checkpointer.save(p.saves, self.state, loop=loop, force=True)
        self.progress = p
        if self.mirror is not None:  # the files this checkpoint's records point to, to the bucket
            self.mirror.push_soon()

    def restore(self) -> bool:
        """Restores the newest checkpoint, if any (state, progress, the iterator's position)."""
        if self.checkpointer.latest_step() is None:
            return False
        state, loop = self.checkpointer.restore(self.abstract, self.shardings)
        if state.frozen is None:
            check_lora_base(self.checkpointer.directory, loop, self.base_record)
        self.state = state if state.frozen is not None else state.replace(frozen=self.state.frozen)
        known = {f.name for f in dataclasses.fields(self.progress_cls)}
        self.progress = self.progress_cls(**{k: v for k, v in loop.items() if k in known})
        if self.progress.data_state:
            self.iterator.set_state(self.progress.data_state)
        return True


def base_record(weights: str, frozen) -> dict | None:
    """With LoRA (``frozen``: the base's parameters): the base's source and exact checksum
    (``lora.checksum``), which every checkpoint records; else None."""
    if frozen is None:
        return None
    from repo_jax.models import lora

    return {"weights": weights or "random init", "checksum": lora.checksum(frozen)}


def check_lora_base(where, loop: dict, current: dict | None, action: str = "resume") -> None:
    """Refuses (``ConfigError`` naming ``where``) LoRA adapters of a checkpoint whose ``loop`` item
    records a base (``RunBase.record_base``) other than ``current``, the base loaded now."""
    saved = loop.get("lora_base")
    if saved and current and saved["checksum"] != current["checksum"]:
        raise config_lib.ConfigError(
            f"{where}: the LoRA adapters were trained on the base {saved['weights']} with checksum "
            f"{saved['checksum']}, but {current['weights']} now has checksum {current['checksum']}: "
            f"{action} with the same base weights")


def run_until_preempted(r: RunBase, body: Callable[[RunBase, Callable[[], bool]], list[dict]], log=print):
    """``body(r, stop)`` with ``stop()`` true once SIGTERM arrived; on ``Preempted`` waits for the
    checkpoint to be written, says so and re-raises. Closes the checkpointer."""
    flag = {"stop": False}
    previous = signal.signal(signal.SIGTERM, lambda *_: flag.update(stop=True))
    try:
        return body(r, lambda: flag["stop"])
    except Preempted as e:
        r.checkpointer.wait()
        log(f"SIGTERM: checkpoint written ({e}); rerun the same command to resume")
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
        r.checkpointer.close()
        if r.mirror is not None:  # what is left of the run folder, after the last checkpoint
            failing = sys.exc_info()[0] is not None
            try:
                r.mirror.close()
                if r.main:
                    log(f"{r.mirror.url}: in sync with {r.mirror.local} ({r.mirror.uploaded} uploads this run)")
            except Exception as e:  # noqa: BLE001 - said, and raised unless the run is already failing
                log(f"error: uploading {r.mirror.local} to {r.mirror.url} failed: {e!r}")
                if not failing:
                    raise


# ------------------------------------------------------------------------------ command line


EXIT_STATUS = ("Exit status: 0 when the run finished (or had finished), 1 when an annotator failed (a served\n"
               "judge after its retries: every host exits with the same message), 2 for a bad config or input,\n"
               "143 after SIGTERM (a checkpoint was written; rerun the same command to resume).")


def program_main(cls: type, run: Callable, argv: list[str] | None, *, prog: str, doc: str,
                 default_config: str, example: str) -> int:
    """The command line of a program: loads ``--config`` (or ``default_config``, a repo path
    such as ``configs/default.yaml``) as ``cls`` with the overrides, runs ``run(cfg)``, and
    returns the exit status (0 done, 2 bad config or input, 143 after SIGTERM)."""
    import argparse

    from repo_jax.annotators.panel import AnnotatorError
    from repo_jax.annotators.served import ServedError
    from repo_jax.assets import cache_dir
    from repo_jax.data import DataError
    from repo_jax.training.state import resolve_path

    ap = argparse.ArgumentParser(prog=prog, description=doc, epilog=EXIT_STATUS, add_help=False,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-h", "--help", nargs="?", const="", default=None, metavar="KEY",
                    help=f"show this help and every config key with its default; with a KEY ({example.split('=')[0]}) "
                    f"or a section ({example.split('.')[0]}): its type, default and documentation")
    ap.add_argument("--config", default=None, help=f"a YAML config (default: {default_config})")
    ap.add_argument("overrides", nargs="*", help=f"key.sub=value overrides, e.g. {example}")
    ap.add_argument("--twin", action="store_true", help="run the config's scaled twin: the same recipe on a tiny "
                    "model and data (repo_jax.twin), e.g. on a CPU with fake devices before renting a slice")
    ap.add_argument("--twin-judge", default="", metavar="URL", help="with --twin: the endpoint served annotators use")
    args = ap.parse_args(argv)
    if args.help is not None:
        from repo_jax.config_help import print_help

        return print_help(ap, cls, args.help)

    if not jax.config.jax_compilation_cache_dir:  # a rerun or resume skips most compiles
        jax.config.update("jax_compilation_cache_dir", str(cache_dir() / "xla"))
    try:
        cfg = config_lib.load(cls, args.config or resolve_path(default_config), args.overrides)
        if args.twin:
            from repo_jax.twin import twin

            cfg = twin(cfg, judge_url=args.twin_judge)
        run(cfg)
    except (config_lib.ConfigError, DataError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (AnnotatorError, ServedError) as e:  # the answers received so far are cached: a rerun resumes
        print(f"error: {e}", file=sys.stderr)
        return 1
    except Preempted:
        return 143
    return 0
