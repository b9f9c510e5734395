"""Every key of a program's config, with its type, default and documentation, from the code.

A program's config is a frozen dataclass whose sections are nested dataclasses
(:mod:`repo_jax.config`). :func:`sections` walks one and returns, for every key, its dotted path
(``loop.sample_waves``; the members of a list of sections as ``annotate.panel[].kind``), its type
as a user writes it (``int``, ``float | None``, ``"reset" | "carry"``, ``list of int``), its
default as YAML writes it, and its documentation, read from the ``name: text`` entries of the
class docstrings (:func:`docstring_entries`). ``docs/config.md`` (:mod:`repo_jax.config_reference`)
and the programs' ``--help`` (:mod:`repo_jax.config_help`) are made from it.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import types
import typing
from typing import Any, Literal

import yaml

# program -> (module of its config class, class name, module of its command line)
PROGRAMS = {
    "irepo": ("repo_jax.loop.config", "IrepoConfig", "repo_jax.irepo"),
    "lpo": ("repo_jax.offline.config", "LpoConfig", "repo_jax.lpo"),
    "sft": ("repo_jax.offline.config", "SftConfig", "repo_jax.sft"),
}

_NAME = r"(?:``)?\w+(?:``)?"
_ENTRY = re.compile(rf"^(?P<names>{_NAME}(?:\s*/\s*{_NAME})*)\s*(?P<when>\([^)]*\))?:(?:\s+|$)(?P<text>.*)$")
_SENTENCE_END = re.compile(r"(?<!\.)(?<!\be\.g)(?<!\bi\.e)(?<!\betc)(?<!\bvs)(?<!\bEq)\.(?=\s|$)")


@dataclasses.dataclass(frozen=True)
class Key:
    """One config key: ``path`` (dotted), ``type`` and ``default`` as text, ``doc`` (the full
    documentation, one paragraph; empty when the docstrings have no entry for it)."""

    path: str
    type: str
    default: str
    doc: str

    @property
    def summary(self) -> str:
        """The first sentence of ``doc``."""
        return first_sentence(self.doc)


@dataclasses.dataclass(frozen=True)
class Section:
    """The keys of one dataclass: ``path`` (``""`` for the top level, ``annotate.panel[]`` for a
    list's members), the class ``name``, ``prose`` (its docstring without the key entries)."""

    path: str
    name: str
    prose: str
    keys: tuple[Key, ...]

    @property
    def title(self) -> str:
        return self.path or "top level"


def first_sentence(text: str) -> str:
    """``text`` up to its first full stop (``e.g.``, ``i.e.`` and decimal points are not one)."""
    m = _SENTENCE_END.search(text)
    return text[: m.end()] if m else text


def _own_doc(cls: type) -> str:
    doc = cls.__dict__.get("__doc__") or ""
    if doc.startswith(f"{cls.__name__}("):  # the signature dataclasses writes when there is none
        return ""
    return inspect.cleandoc(doc)


def docstring_entries(cls: type) -> tuple[dict[str, str], str]:
    """The ``name: text`` entries of ``cls``'s own docstring naming its fields, and the rest.

    An entry starts a line: a field name, or several joined by ``/`` (they share the text), with
    or without double backticks, an optional parenthesised condition, then ``:``. It runs on over
    the following lines up to a blank line or the next entry. Returns ``({name: text}, prose)``,
    the text on one line and the prose's paragraphs separated by blank lines."""
    fields = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()
    entries: dict[str, list[str]] = {}
    prose: list[str] = []
    current: list[str] | None = None
    for line in _own_doc(cls).splitlines():
        m = _ENTRY.match(line)
        names = [n.strip().strip("`") for n in m["names"].split("/")] if m else []
        if names and all(n in fields for n in names):
            current = [f"{m['when']} {m['text']}" if m["when"] else m["text"]]
            for n in names:
                entries[n] = current
        elif not line.strip():
            current = None
            prose.append("")
        elif current is not None:
            current.append(line.strip())
        else:
            prose.append(line.strip())
    paragraphs, para = [], []
    for line in [*prose, ""]:
        if line:
            para.append(line)
        elif para:
            paragraphs.append(" ".join(para))
            para = []
    return {n: " ".join(t for t in lines if t).strip() for n, lines in entries.items()}, "\n\n".join(paragraphs)


def field_doc(cls: type, name: str) -> str:
    """The entry for field ``name`` in the docstring of ``cls`` or, failing that, of the
    nearest base class that has one; ``""`` when none has."""
    for klass in cls.__mro__:
        text = docstring_entries(klass)[0].get(name) if dataclasses.is_dataclass(klass) else None
        if text:
            return text
    return ""


def type_text(tp: Any) -> str:
    """A field's type as a user writes the value: ``int``, ``float | None``, ``"a" | "b"``,
    ``list of int``, ``mapping``, or a section's class name."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return " | ".join(f'"{a}"' if isinstance(a, str) else str(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_text(a) for a in args)
    if origin in (tuple, list):
        return f"list of {type_text(args[0]) if args else 'any'}"
    if origin is dict or tp is dict:
        return "mapping"
    if tp is type(None):
        return "None"
    if tp is Any:
        return "any"
    return getattr(tp, "__name__", str(tp))


def _plain(value: Any) -> Any:
    """``value`` as YAML data: tuples as lists, a section as the fields that differ from its
    defaults (always with its first field, e.g. a panel member's ``kind``)."""
    if dataclasses.is_dataclass(value):
        base, fields = type(value)(), dataclasses.fields(value)
        return {f.name: _plain(getattr(value, f.name)) for i, f in enumerate(fields)
                if i == 0 or getattr(value, f.name) != getattr(base, f.name)}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def yaml_text(value: Any) -> str:
    """``value`` on one line, as a YAML file would hold it (``""`` for the empty string)."""
    if value == "" and isinstance(value, str):
        return '""'
    text = yaml.safe_dump(_plain(value), default_flow_style=True, sort_keys=False, width=float("inf"))
    return text.strip().removesuffix("...").strip()


def _item_class(tp: Any) -> type | None:
    """The section class of a ``tuple[Section, ...]`` field, else None."""
    if typing.get_origin(tp) in (tuple, list):
        args = typing.get_args(tp)
        if args and dataclasses.is_dataclass(args[0]):
            return args[0]
    return None


def sections(cls: type, path: str = "", default: Any = None) -> list[Section]:
    """The sections of config class ``cls``, depth first in field order: its own keys (the
    fields that are not sections), then each nested section's."""
    default = cls() if default is None else default
    hints = typing.get_type_hints(cls)
    prefix = f"{path}." if path else ""
    keys, nested = [], []
    for f in dataclasses.fields(cls):
        tp, value = hints[f.name], getattr(default, f.name)
        if dataclasses.is_dataclass(tp):
            nested.append((tp, f"{prefix}{f.name}", value))
            continue
        keys.append(Key(f"{prefix}{f.name}", type_text(tp), yaml_text(value), field_doc(cls, f.name)))
        item = _item_class(tp)
        if item is not None:
            nested.append((item, f"{prefix}{f.name}[]", item()))
    out = [Section(path, cls.__name__, docstring_entries(cls)[1] if path else "", tuple(keys))]
    for tp, sub, value in nested:
        out += sections(tp, sub, value)
    return out


def program_class(program: str) -> type:
    """The config class of ``program`` (``irepo``, ``lpo``, ``sft``)."""
    import importlib

    module, name, _ = PROGRAMS[program]
    return getattr(importlib.import_module(module), name)


def undocumented() -> list[str]:
    """``program: key`` for every key of every program without documentation."""
    return [f"{p}: {k.path}" for p in PROGRAMS for s in sections(program_class(p)) for k in s.keys if not k.doc]
