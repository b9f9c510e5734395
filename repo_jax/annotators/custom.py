"""Your own Python scorers as panel rules, without editing the library.

A ``kind: rule`` member of ``annotate.panel`` names its scorer:

* ``name: correct``: a scorer of the run's task (``TASKS``), or one registered with
  :func:`register_scorer` by code that ran before the panel was built;
* ``name: "my_rewards:concise"``: ``module:attribute``. The module is imported (the working
  directory is importable, as under ``python -m``, then ``PYTHONPATH``), then ``attribute`` is
  taken from it, or else from the names it registered with ``@register_scorer``.

What a name resolves to (:func:`as_scorer`): a function or callable object is the scorer,
``(prompt: str, response: str) -> float``; a class is built once with no arguments and its
instance is the scorer (for a scorer that loads something first). A scorer returns a finite
number (``RuleAnnotator`` says which prompt got anything else).

Everything that can be checked without scoring is checked when the panel is built: the module
imports, the attribute exists, it is callable with ``(prompt, response)``. Errors are
:class:`ScorerLoadError` saying what is wrong; the panel adds which member it was.
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys
from collections.abc import Callable
from typing import Any, TypeVar

Scorer = Callable[[str, str], float]
T = TypeVar("T")

_REGISTRY: dict[str, Any] = {}


class ScorerLoadError(ValueError):
    """A scorer name that does not resolve to a scorer; the message says why."""


def register_scorer(name: str) -> Callable[[T], T]:
    """Decorator registering a scorer (function, callable object, or class built with no
    arguments) under ``name``, for ``kind: rule`` members named ``name`` or ``module:name``::

        @register_scorer("concise")
        def concise(prompt: str, response: str) -> float: ...

    Registering a name again with a different object is an error (re-importing the same
    definition is not). Returns the object unchanged."""
    if not name or ":" in name:
        raise ValueError(f"a registered scorer name is non-empty and has no ':', got {name!r}")

    def register(obj: T) -> T:
        if not callable(obj):
            raise TypeError(f"register_scorer({name!r}): {describe(obj)} is not callable")
        old = _REGISTRY.get(name)
        if old is not None and not _same(old, obj):
            raise ValueError(f"register_scorer({name!r}): the name is already registered by {describe(old)}")
        _REGISTRY[name] = obj
        return obj

    return register


def registered_scorers() -> dict[str, Any]:
    """The registered objects by name (a copy)."""
    return dict(_REGISTRY)


def import_module(module: str):
    """``importlib.import_module`` with the working directory importable (as ``python -m``)."""
    cwd = os.getcwd()
    if cwd not in {os.path.abspath(p or os.curdir) for p in sys.path}:
        sys.path.insert(0, cwd)
    importlib.invalidate_caches()  # a module written since the last import is found
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name and (module == e.name or module.startswith(e.name + ".")):
            raise ScorerLoadError(f"no module named {module!r} in the working directory ({cwd}) or on "
                                  "PYTHONPATH") from None
        raise ScorerLoadError(f"importing module {module!r} failed: {type(e).__name__}: {e}") from e
    except Exception as e:  # SyntaxError and whatever the module raises at import
        raise ScorerLoadError(f"importing module {module!r} failed: {type(e).__name__}: {e}") from e


def load_object(ref: str, *, registered: bool = True) -> tuple[Any, str]:
    """``(object, "module.attribute")`` for ``ref = "module:attribute"``: the attribute may be
    dotted, or (``registered``) a name the module registered with :func:`register_scorer`."""
    module_name, sep, attr = ref.partition(":")
    if not sep or not module_name.strip() or not attr.strip():
        raise ScorerLoadError(f"{ref!r} is not of the form 'module:attribute'")
    module = import_module(module_name)
    obj: Any = module
    try:
        for part in attr.split("."):
            obj = getattr(obj, part)
    except AttributeError:
        if not (registered and attr in _REGISTRY):
            defined = sorted(k for k, v in vars(module).items() if not k.startswith("_") and callable(v)
                             and getattr(v, "__module__", None) == module.__name__)
            also = (f" and registers no scorer by that name (registered: {sorted(_REGISTRY) or 'none'})"
                    if registered else "")
            raise ScorerLoadError(f"module {module_name!r} ({getattr(module, '__file__', '?')}) has no attribute "
                                  f"{attr!r}{also}; it defines {defined or 'no functions or classes'}") from None
        obj = _REGISTRY[attr]
    return obj, f"{module_name}.{attr}"


def built(obj: Any, what: str, kind: str) -> tuple[Any, str]:
    """``obj`` itself, or a class built with no arguments (its instance is the ``kind``)."""
    if not inspect.isclass(obj):
        return obj, what
    try:
        return obj(), what + "()"
    except Exception as e:
        raise ScorerLoadError(f"{what}() failed: {type(e).__name__}: {e} (a {kind} class is built with no "
                              f"arguments, its instance is the {kind})") from e


def as_scorer(obj: Any, what: str) -> Scorer:
    """The scorer ``obj`` stands for (a class is built with no arguments), checked to be callable
    as ``scorer(prompt, response)``; ``what`` names it in errors."""
    obj, what = built(obj, what, "scorer")
    if not callable(obj):
        raise ScorerLoadError(f"{what} is {describe(obj)}, not a scorer: a function (prompt, response) -> float, "
                              "a callable object, or a class built with no arguments")
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):  # some builtins have none: nothing to check
        return obj
    try:
        sig.bind("prompt", "response")
    except TypeError:
        raise ScorerLoadError(f"{what}{sig} cannot be called as scorer(prompt, response); a scorer takes the "
                              "prompt and the response (a factory of scorers is written as a class)") from None
    return obj


def describe(obj: Any) -> str:
    """``module.qualname`` of a function or class, else ``a <type> (<repr>)``."""
    if inspect.isfunction(obj) or inspect.isclass(obj) or inspect.ismethod(obj):
        return f"{obj.__module__}.{obj.__qualname__}"
    kind = type(obj).__qualname__
    return f"{'an' if kind[:1].lower() in 'aeiou' else 'a'} {kind} ({repr(obj)[:60]})"


def _same(a: Any, b: Any) -> bool:
    """The same definition (a module imported twice defines new but equal objects)."""
    key = lambda o: (getattr(o, "__module__", None), getattr(o, "__qualname__", None))  # noqa: E731
    if a is b or (key(a) == key(b) and key(a)[1] is not None):
        return True
    try:
        return type(a) is type(b) and bool(a == b)
    except Exception:
        return False
