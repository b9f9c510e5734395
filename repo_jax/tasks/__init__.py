"""Embedded tasks: prompt generators with verifiable rewards, and their annotator panels.

``get_task("arithmetic")`` returns an :class:`~repo_jax.tasks.arithmetic.ArithmeticTask`:
``task.prompts("train")``, ``task.reward(prompt, response)``, ``task.panel(...)``. The committed
prompt and listwise files live in ``repo_jax/tasks/data`` (``python -m repo_jax.tasks.make_data``
regenerates them); :func:`data_path` gives their location for ``data.path``.
"""

from __future__ import annotations

from importlib import resources

from repo_jax.tasks.arithmetic import ArithmeticTask, Problem

TASKS = {"arithmetic": ArithmeticTask}


def get_task(name: str = "arithmetic"):
    """A task by name."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; available: {', '.join(sorted(TASKS))}")
    return TASKS[name]()


def data_path(name: str) -> str:
    """Path of a committed data file, e.g. ``data_path("arithmetic_listwise.jsonl")``."""
    path = resources.files("repo_jax.tasks") / "data" / name
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist (python -m repo_jax.tasks.make_data writes it)")
    return str(path)


__all__ = ["TASKS", "ArithmeticTask", "Problem", "data_path", "get_task"]
