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

Your own task, without editing ``TASKS``: ``task: "my_task:MyTask"`` (``module:attribute``,
imported like a rule's scorer, :mod:`repo_jax.annotators.custom`) names a class built with no
arguments (or an object) with the five methods above; ``name`` defaults to the reference.
"""

from __future__ import annotations

from importlib import resources

from repo_jax.tasks.arithmetic import ArithmeticTask, Problem
from repo_jax.tasks.toy import ToyDigitsTask

TASKS = {"arithmetic": ArithmeticTask, "toy_digits": ToyDigitsTask}
TASK_METHODS = ("prompts_file", "prompts", "reward", "scorers", "metrics")


def get_task(name: str = "arithmetic"):
    """A task by name, or your own by ``module:attribute`` (:func:`load_task`)."""
    if ":" in name:
        return load_task(name)
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; available: {', '.join(sorted(TASKS))}")
    return TASKS[name]()


def load_task(ref: str):
    """The task ``module:attribute`` names (a class is built with no arguments); ``ConfigError``
    naming ``task`` when it does not import or lacks one of :data:`TASK_METHODS`."""
    from repo_jax.annotators.custom import ScorerLoadError, built, load_object
    from repo_jax.config import ConfigError

    try:
        task, what = built(*load_object(ref, registered=False), "task")
    except ScorerLoadError as e:
        raise ConfigError(f"task {ref!r}: {e}") from e.__cause__
    missing = [m for m in TASK_METHODS if not callable(getattr(task, m, None))]
    if missing:
        raise ConfigError(f"task {ref!r}: {what} has no method {', '.join(missing)}; a task has "
                          f"{', '.join(TASK_METHODS)} (see repo_jax.tasks)")
    if not getattr(task, "name", None):
        task.name = ref
    return task


def data_path(name: str) -> str:
    """Path of a committed data file, e.g. ``data_path("arithmetic_listwise.jsonl")``."""
    path = resources.files("repo_jax.tasks") / "data" / name
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist (python -m repo_jax.tasks.make_data writes it)")
    return str(path)


__all__ = ["TASKS", "TASK_METHODS", "ArithmeticTask", "Problem", "ToyDigitsTask", "data_path", "get_task", "load_task"]
