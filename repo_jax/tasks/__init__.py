"""Embedded tasks: prompt sets with verifiable rewards, and their annotator panels.

``get_task(name)`` returns a task with what the iREPO loop reads:

* ``prompts_file(split)``: the committed prompt file of ``train`` / ``eval`` (``data.path``);
* ``prompts(split)``: its prompt texts;
* ``reward(prompt, response)``: the task reward (``eval/reward``, the simulated raters);
* ``scorers()``: the rule scorers by name (``annotate.panel`` entries of kind ``rule``);
* ``metrics(prompt, response)``: the task's own metrics (``eval/accuracy``, ...).

``arithmetic`` is the default task for SmolLM2 (:mod:`~repo_jax.tasks.arithmetic`),
``toy_digits`` the one a tiny random model improves on (:mod:`~repo_jax.tasks.toy`). The
committed files live in ``repo_jax/tasks/data``; :func:`data_path` gives their location.
"""

from __future__ import annotations

from importlib import resources

from repo_jax.tasks.arithmetic import ArithmeticTask, Problem
from repo_jax.tasks.toy import ToyDigitsTask

TASKS = {"arithmetic": ArithmeticTask, "toy_digits": ToyDigitsTask}


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


__all__ = ["TASKS", "ArithmeticTask", "Problem", "ToyDigitsTask", "data_path", "get_task"]
