"""The config reference, generated from the code: ``docs/config.md``, one table per section.

``python -m repo_jax.config_reference`` prints it, ``--write`` writes it, ``--check`` exits 1
when the file is out of date. Every key's type, default and documentation come from the config
classes (:mod:`repo_jax.config_keys`). Sections that several programs read with the same keys
and defaults (``model``, ``data``, ``mesh``, ...) are listed once, with the programs that read
them; each program's own sections follow under its heading.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from repo_jax.config_keys import PROGRAMS, Section, program_class, sections

DOC_PATH = Path(__file__).resolve().parent.parent / "docs" / "config.md"
REGENERATE = "python -m repo_jax.config_reference --write"

_CODE = re.compile(r"``.+?``|`[^`]+`")
_ROLE = re.compile(r":\w+:`([^`]+)`")  # :mod:`x`, :func:`x`


def _escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("<", "&lt;").replace("~", "\\~")


def md(text: str) -> str:
    """Docstring text as Markdown for a table cell: code spans kept, roles made code spans,
    pipes escaped (GitHub's tables need it inside code spans too), ``<`` and ``~`` escaped."""
    text = _ROLE.sub(r"`\1`", text)
    out, pos = [], 0
    for m in _CODE.finditer(text):
        out += [_escape(text[pos:m.start()]), m.group().replace("|", "\\|")]
        pos = m.end()
    return "".join([*out, _escape(text[pos:])])


def _code(text: str) -> str:
    """A type or default as a code span (pipes escaped for the table)."""
    return "`" + text.replace("|", "\\|") + "`"


def table(section: Section) -> list[str]:
    """The section's heading, prose and key table."""
    title = f"`{section.path}`" if section.path else "Top-level keys"
    lines = [f"### {title}", ""]
    if section.prose:
        lines += [md(section.prose), ""]
    lines += ["| key | type | default | meaning |", "|---|---|---|---|"]
    for k in section.keys:
        lines.append(f"| `{k.path}` | {_code(k.type)} | {_code(k.default)} | {md(k.doc)} |")
    return [*lines, ""]


def _program_line(program: str) -> str:
    import importlib

    doc = importlib.import_module(PROGRAMS[program][2]).__doc__ or ""
    return md(" ".join(doc.strip().split("\n\n")[0].split()))


def markdown() -> str:
    """The whole of ``docs/config.md``."""
    per_program = {p: sections(program_class(p)) for p in PROGRAMS}
    readers: dict[Section, list[str]] = {}
    for program, secs in per_program.items():
        for s in secs:
            readers.setdefault(s, []).append(program)
    shared = [s for s, ps in readers.items() if len(ps) > 1]
    lines = [
        "# Config reference",
        "",
        f"Generated from the config classes' docstrings by `{REGENERATE}`;",
        "edit the docstrings, not this file (`tests/test_config_reference.py` fails when it is out of date).",
        "",
        "Every program reads a YAML file (`--config PATH`) whose nested mappings are the sections",
        "below, then `key.sub=value` overrides from the command line (`loop.rounds=2`). A key not",
        "listed here is an error. `python -m repo_jax.<program> --help` lists the keys with their",
        "defaults; `--help KEY` or `--help SECTION` prints one key's or section's documentation.",
        "A list of sections (`annotate.panel`) is written in YAML as a list of mappings whose keys",
        "are those of `annotate.panel[]`; a member leaves out the keys it keeps at their defaults.",
        "",
        "## Sections the programs share",
        "",
    ]
    for s in shared:
        head = table(s)
        lines += [*head[:2], "Read by: " + ", ".join(f"`{p}`" for p in readers[s]) + ".", "", *head[2:]]
    for program, secs in per_program.items():
        own = [s for s in secs if s not in shared]
        also = [s.title for s in secs if s in shared]
        lines += [f"## `{program}`: `python -m {PROGRAMS[program][2]}`", "", _program_line(program), "",
                  f"Config class `{program_class(program).__name__}`. Also reads the shared sections "
                  + ", ".join(f"`{t}`" for t in also) + ".", ""]
        for s in own:
            lines += table(s)
    return "\n".join(lines).rstrip("\n") + "\n"


def main(argv: list[str] | None = None) -> int:
    """``python -m repo_jax.config_reference [--write | --check]``."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m repo_jax.config_reference", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--write", action="store_true", help=f"write {DOC_PATH.name} into docs/")
    mode.add_argument("--check", action="store_true", help="exit 1 when docs/config.md is out of date")
    args = ap.parse_args(argv)
    text = markdown()
    if args.write:
        DOC_PATH.write_text(text)
        print(f"wrote {DOC_PATH}")
    elif args.check:
        if not DOC_PATH.is_file() or DOC_PATH.read_text() != text:
            print(f"{DOC_PATH} is out of date: run {REGENERATE}", file=sys.stderr)
            return 1
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
