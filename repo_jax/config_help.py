"""``--help`` of the programs: the config keys after the usage text, or one key's documentation.

``python -m repo_jax.irepo --help`` prints argparse's usage text and then every config key of
the program, one line each (``key = default  # first sentence``), grouped by section;
``--help loop.sample_waves`` prints that key's type, default and full documentation, ``--help
loop`` a whole section's. An unknown name is one error listing the close matches (exit 2).
"""

from __future__ import annotations

import argparse
import difflib
import re
import shutil
import sys
import textwrap

from repo_jax.config_keys import Key, Section, sections

WIDTH = 100          # the lines' width when the terminal's is unknown
COMMENT_MIN = 40     # a compact line's comment keeps at least this many characters
_MARKUP = re.compile(r":\w+:`([^`]+)`|``(.+?)``")


def plain(text: str) -> str:
    """Docstring text for a terminal: ``code`` and :role:`x` markup dropped."""
    return _MARKUP.sub(lambda m: m.group(1) or m.group(2), text)


def _short(text: str, room: int) -> str:
    if len(text) <= room:
        return text
    return text[: max(room - 3, 0)].rsplit(" ", 1)[0].rstrip(" ,;:.") + "..."


def _width() -> int:
    return min(max(shutil.get_terminal_size((WIDTH, 24)).columns, 80), 160)


def compact(cls: type) -> str:
    """Every key of config class ``cls``: ``key = default  # meaning``, grouped by section."""
    out = ["config keys (KEY = DEFAULT  # meaning); set them in the --config YAML or as KEY=VALUE",
           "overrides; --help KEY or --help SECTION prints the full documentation:"]
    for s in sections(cls):
        if not s.keys:
            continue
        out += ["", f"{s.title}:"]
        heads = [f"  {k.path} = {k.default}" for k in s.keys]
        pad, width = min(max(map(len, heads)), 48), _width()
        for head, k in zip(heads, s.keys):
            room = max(width - max(len(head), pad) - 4, COMMENT_MIN)
            out.append(f"{head.ljust(pad)}  # {_short(plain(k.summary), room)}")
    return "\n".join(out)


def _wrap(text: str, indent: str = "    ") -> str:
    return "\n".join(textwrap.fill(p, width=WIDTH, initial_indent=indent, subsequent_indent=indent)
                     for p in plain(text).split("\n\n"))


def key_text(k: Key) -> str:
    """One key: its path, type, default and full documentation."""
    return f"{k.path}\n    type: {k.type}\n    default: {k.default}\n{_wrap(k.doc)}"


def section_text(secs: list[Section]) -> str:
    """A section and the sections nested in it, each key with its full documentation."""
    out = []
    for s in secs:
        out += [f"section {s.title} ({s.name})"] + ([_wrap(s.prose, "  ")] if s.prose else []) + [""]
        out += [f"{key_text(k)}\n" for k in s.keys]
    return "\n".join(out).rstrip()


def _norm(name: str) -> str:
    return name.replace("[]", "")


def describe(cls: type, query: str) -> str | None:
    """The documentation of the key or section ``query`` of ``cls`` (``annotate.panel.kind``
    may leave out the ``[]``); ``None`` when there is no such key or section."""
    secs = sections(cls)
    q = _norm(query.strip().strip("."))
    parts = [key_text(k) for s in secs for k in s.keys if _norm(k.path) == q]
    inside = [s for s in secs if s.path and (_norm(s.path) == q or _norm(s.path).startswith(q + "."))]
    if inside:
        parts.append(section_text(inside))
    return "\n\n".join(parts) if parts else None


def close_matches(cls: type, query: str) -> list[str]:
    """Keys and sections whose name is close to ``query`` or ends with it."""
    secs = sections(cls)
    names = [k.path for s in secs for k in s.keys] + [s.path for s in secs if s.path]
    q = _norm(query.strip())
    ends = [n for n in names if _norm(n).endswith("." + q)]
    near = difflib.get_close_matches(q, names, n=6, cutoff=0.6)
    return list(dict.fromkeys(ends + near))[:6]


def print_help(parser: argparse.ArgumentParser, cls: type, query: str) -> int:
    """``--help [KEY]``: the usage text and every key (no KEY, or KEY is an override), or KEY's
    documentation; an unknown KEY is an error naming the close matches. Returns the exit status."""
    if not query or "=" in query:
        print(parser.format_help().rstrip() + "\n\n" + compact(cls))
        return 0
    text = describe(cls, query)
    if text is None:
        near = close_matches(cls, query)
        hint = f"close matches: {', '.join(near)}" if near else f"{parser.prog} --help lists them"
        print(f"error: {parser.prog} has no config key or section {query!r}; {hint}", file=sys.stderr)
        return 2
    print(text)
    return 0
