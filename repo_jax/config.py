"""Frozen-dataclass configs loaded from YAML with ``key.sub=value`` overrides.

Every program builds its config with :func:`load`: the dataclass defaults, then the YAML file,
then command-line overrides. An unknown key is an error that names it and lists the valid keys.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

C = TypeVar("C")


class ConfigError(ValueError):
    """A config file or override names a key that does not exist or has a bad value."""


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _strip_optional(tp: Any) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Turns a YAML value (or an override string parsed by YAML) into the field's type."""
    tp = _strip_optional(tp)
    if value is None:
        return None
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return _build(tp, value, where)
    origin = typing.get_origin(tp)
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        args = typing.get_args(tp)
        item_tp = args[0] if args else Any
        return tuple(_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value))
    if origin is typing.Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{where}: {value!r} is not one of {typing.get_args(tp)}")
        return value
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is float:  # YAML 1.1 reads "2e-5" (no dot) as a string
        try:
            return float(value) if isinstance(value, str) else _not_a_number(value, where)
        except ValueError:
            _not_a_number(value, where)
    if tp is int and isinstance(value, bool):
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp in (int, str, bool) and not isinstance(value, tp):
        if tp is str and isinstance(value, (int, float)):
            return str(value)
        raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}")
    return value


def _not_a_number(value: Any, where: str):
    raise ConfigError(f"{where}: expected a number, got {value!r}")


def _build(cls: type[C], raw: dict[str, Any], where: str = "") -> C:
    types_ = _field_types(cls)
    unknown = sorted(set(raw) - set(types_))
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(
            f"unknown config key {prefix}{unknown[0]!s}; valid keys of {cls.__name__}: "
            + ", ".join(f"{prefix}{k}" for k in types_)
        )
    kwargs = {}
    for name, value in raw.items():
        sub = f"{where}.{name}" if where else name
        kwargs[name] = _coerce(value, types_[name], sub)
    try:
        return cls(**kwargs)
    except ValueError as e:  # a section's own check (__post_init__)
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"{where or cls.__name__}: {e}") from None


def _merge(base: dict[str, Any], update: dict[str, Any], where: str = "") -> dict[str, Any]:
    """``update`` over ``base``; a list item is addressed by its index (``panel.0.base_url``)."""
    out = dict(base)
    for k, v in update.items():
        sub = f"{where}.{k}" if where else str(k)
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v, sub)
        elif isinstance(v, dict) and isinstance(out.get(k), (list, tuple)) and v and all(
                str(i).isdigit() for i in v):
            items = list(out[k])
            for i, item in v.items():
                if int(i) >= len(items):
                    raise ConfigError(f"{sub}.{i}: {sub} has {len(items)} item(s), numbered from 0")
                both = isinstance(item, dict) and isinstance(items[int(i)], dict)
                items[int(i)] = _merge(items[int(i)], item, f"{sub}.{i}") if both else item
            out[k] = items
        else:
            out[k] = v
    return out


def to_dict(cfg: Any) -> dict[str, Any]:
    """The config as plain nested dicts (for YAML/JSON dumps and merging)."""
    return dataclasses.asdict(cfg)


def flatten(value: Any, *, lists: bool = False, prefix: str = "") -> dict[str, Any]:
    """Dotted keys to leaves: ``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; with ``lists``, list items
    too (``"panel.0.count"``), else a list is one leaf."""
    if isinstance(value, dict):
        items = value.items()
    elif lists and isinstance(value, (list, tuple)):
        items = enumerate(value)
    else:
        return {prefix.rstrip("."): value}
    return {k: v for key, item in items for k, v in flatten(item, lists=lists, prefix=f"{prefix}{key}.").items()}


def parse_overrides(overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """``["a.b=1", "c=x"]`` -> ``{"a": {"b": 1}, "c": "x"}`` (values parsed as YAML scalars)."""
    out: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key.sub=value")
        key, text = item.split("=", 1)
        value = yaml.safe_load(text) if text else ""
        node = out
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return out


def load(cls: type[C], path: str | Path | None = None, overrides=()) -> C:
    """Defaults of ``cls``, then the YAML file at ``path``, then ``key.sub=value`` overrides."""
    raw = to_dict(cls())
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        with path.open() as f:
            loaded = yaml.safe_load(f) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping")
        try:
            _build(cls, loaded)  # validate keys against the file's own contents first
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None
        raw = _merge(raw, loaded)
    raw = _merge(raw, parse_overrides(list(overrides)))
    return _build(cls, raw)
