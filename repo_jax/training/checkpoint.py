"""Orbax checkpoints of a whole run: one save = train state + reference + data iterator + loop.

Items of one step's save (``ocp.args.Composite``):
  ``state``      the ``TrainState`` without its reference and LoRA base (params, optimiser
                 state, step, RNG, non-finite counters);
  ``reference``  the frozen reference parameters, when the state holds them;
  ``base``       the LoRA base (``state.frozen``), only with ``save_base``: a base that stays
                 the loaded weights is not saved (the run records its path and checksum);
  ``data``       the grain iterator's position (``grain.checkpoint.CheckpointSave``), when given;
  ``loop``       a JSON dict of the host loop's position (round, epoch, where the reference comes
                 from, ...), always present.

Saves are asynchronous (the step returns once the arrays are copied off the devices) and the
newest ``keep`` are kept. Restoring takes the *target* shardings (computed from the current
mesh by ``sharding.state_shardings``), so a run saved on one layout resumes on another: Orbax
reads each shard's slice straight into place. ``directory`` may be ``gs://bucket/path``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from flax import nnx

from repo_jax import buckets
from repo_jax.training.config import CheckpointConfig
from repo_jax.training.state import TrainState


def abstract_target(abstract, shardings):
    """``jax.ShapeDtypeStruct``s carrying the target shardings (Variables keep their metadata)."""

    def one(a, s):
        if isinstance(a, nnx.Variable):
            v = a.get_value()
            return a.replace(jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s))
        return jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s)

    return jax.tree.map(one, abstract, shardings, is_leaf=lambda x: isinstance(x, nnx.Variable))


class Checkpointer:
    """A thin policy layer over ``ocp.CheckpointManager`` (which steps, which items)."""

    def __init__(self, directory: str | Path, cfg: CheckpointConfig = CheckpointConfig(), *, save_base: bool = False):
        if cfg.keep < 1 or cfg.every_steps < 0 or cfg.upload_every_s <= 0:
            raise ValueError("checkpoint.keep must be at least 1, checkpoint.every_steps at least 0 and "
                             "checkpoint.upload_every_s above 0")
        self.cfg, self.save_base = cfg, save_base
        if buckets.is_remote(directory):  # Orbax writes to the bucket itself (tensorstore, etils.epath)
            from etils import epath

            buckets.use_emulator_everywhere()
            self.directory = epath.Path(str(directory))
        else:
            self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=cfg.keep,
            save_interval_steps=1,  # the schedule is ours: see save()
            enable_async_checkpointing=cfg.async_save,
            create=True,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def saved_items(self, step: int) -> set[str]:
        """Names of the items a step's save holds (its sub-folders)."""
        folder = self.directory / str(step)
        return {p.name for p in folder.iterdir() if p.is_dir()} if folder.is_dir() else set()

    def loop_item(self, step: int) -> dict[str, Any]:
        """The JSON ``loop`` item of ``step``'s save alone (no array is read)."""
        out = self.manager.restore(step, args=ocp.args.Composite(loop=ocp.args.JsonRestore()))
        return dict(out["loop"] or {})

    def save(self, step: int, state: TrainState, *, loop: dict[str, Any] | None = None, data_iterator=None,
             force: bool = False) -> bool:
        """Saves if ``step`` is a multiple of ``every_steps`` (0: never on its own) or ``force``;
        returns whether it did."""
        if not force and (not self.cfg.every_steps or int(step) % self.cfg.every_steps):
            return False
        items = {"state": ocp.args.StandardSave(state.replace(ref_params=None, frozen=None)),
                 "loop": ocp.args.JsonSave(loop or {})}
        if state.ref_params is not None:
            items["reference"] = ocp.args.StandardSave(state.ref_params)
        if self.save_base and state.frozen is not None:
            items["base"] = ocp.args.StandardSave(state.frozen)
        if data_iterator is not None:
            import grain

            items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
        return self.manager.save(int(step), args=ocp.args.Composite(**items), force=force)

    def restore(self, abstract_state: TrainState, shardings: TrainState, *, step: int | None = None,
                data_iterator=None) -> tuple[TrainState, dict[str, Any]]:
        """``(state, loop)`` at ``step`` (default: the latest) laid out by ``shardings``.

        ``abstract_state``/``shardings``: from ``state.abstract_state`` and
        ``sharding.state_shardings`` on the *current* mesh. ``data_iterator``, when given, is
        moved to the saved position in place. The LoRA base comes back only when the save holds
        it (``save_base``); else the returned state's ``frozen`` is None: the caller's base.
        """
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        target = abstract_target(abstract_state, shardings)
        items = {
            "state": ocp.args.StandardRestore(target.replace(ref_params=None, frozen=None)),
            "loop": ocp.args.JsonRestore(),
        }
        saved = self.saved_items(step)
        if target.ref_params is not None:
            if "reference" not in saved:
                raise ValueError(f"checkpoint step {step} in {self.directory} holds no reference parameters, "
                                 "but train.reference is 'params'")
            items["reference"] = ocp.args.StandardRestore(target.ref_params)
        if target.frozen is not None and "base" in saved:
            items["base"] = ocp.args.StandardRestore(target.frozen)
        if data_iterator is not None:
            if "data" not in saved:
                raise ValueError(f"checkpoint step {step} in {self.directory} holds no data iterator state")
            import grain

            items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        out = self.manager.restore(step, args=ocp.args.Composite(**items))
        state = out["state"]
        if target.ref_params is not None:
            state = state.replace(ref_params=out["reference"])
        if "base" in items:
            state = state.replace(frozen=out["base"])
        return state, dict(out["loop"] or {})

    def wait(self) -> None:
        """Blocks until background saves are on disk."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
