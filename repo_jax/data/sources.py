"""Reading raw rows from local files or the hub, each tagged with its source and 1-based line.

Why not simply ``datasets.load_dataset("json", ...)``? Because one malformed line makes it raise
for the whole file, and its rows carry no line numbers. JSON Lines and JSON files are therefore
read here line by line (a line that is not valid JSON becomes a :class:`RawRow` with an
``error``, reported like any other bad row); Parquet, Arrow and hub datasets go through HF
``datasets`` and are numbered by row (1-based), which is what "line" means for a table.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

SUFFIX_FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".parquet": "parquet", ".arrow": "arrow"}


class DataError(ValueError):
    """A data source cannot be read, or (with ``data.strict=true``) holds a bad row."""


@dataclasses.dataclass(frozen=True)
class RawRow:
    """One row as read: ``row`` is the parsed value (usually a dict) or None when ``error``
    says why it could not be parsed; ``text`` is the raw line for the rejects file."""

    source: str
    line: int
    row: Any
    text: str = ""
    error: str | None = None


def resolve(path: str, fmt: str = "auto") -> list[tuple[str, str]]:
    """``data.path`` -> ``[(source, format), ...]``: a file, a folder of files, a glob, a
    ``save_to_disk`` folder (format ``disk``), or a hub name (format ``hub``)."""
    if not path:
        raise DataError("data.path is empty; set it to a local file, folder or glob, or a hub dataset name")
    if fmt == "hub":
        return [(path, "hub")]
    p = Path(os.path.expanduser(path))
    if p.is_dir():
        if (p / "dataset_info.json").is_file() or (p / "dataset_dict.json").is_file() or (p / "state.json").is_file():
            return [(str(p), "disk")]
        files = sorted(str(f) for f in p.iterdir() if f.suffix in SUFFIX_FORMATS)
        if not files:
            raise DataError(f"data.path {path} is a folder with no .jsonl, .json, .parquet or .arrow files")
        return [(f, _format_of(f, fmt)) for f in files]
    if p.is_file():
        return [(str(p), _format_of(str(p), fmt))]
    if any(c in path for c in "*?["):
        files = sorted(glob.glob(os.path.expanduser(path)))
        if not files:
            raise DataError(f"data.path {path} matches no files")
        return [(f, _format_of(f, fmt)) for f in files]
    looks_local = path.startswith((".", "/", "~")) or Path(path).suffix in SUFFIX_FORMATS or path.count("/") > 1
    if looks_local:
        raise DataError(f"data.path {path} does not exist")
    return [(path, "hub")]


def _format_of(path: str, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    suffix = Path(path).suffix
    if suffix not in SUFFIX_FORMATS:
        raise DataError(f"cannot tell the format of {path} from its suffix; set data.format (jsonl, json, parquet, arrow)")
    return SUFFIX_FORMATS[suffix]


def read_rows(source: str, fmt: str, *, split: str = "train", subset: str | None = None) -> Iterator[RawRow]:
    """Yields every row of one source in order (bad ones included, with ``error`` set)."""
    if fmt == "jsonl":
        yield from _read_jsonl(source)
    elif fmt == "json":
        yield from _read_json(source)
    else:
        yield from _read_table(source, fmt, split=split, subset=subset)


def _read_jsonl(path: str, start_line: int = 1, data: bytes | None = None) -> Iterator[RawRow]:
    if data is None:
        with open(path, "rb") as f:
            data = f.read()
    for n, raw in enumerate(data.split(b"\n"), start=start_line):
        if not raw.strip():
            continue  # a blank line is not a row
        try:
            text = raw.decode("utf-8").rstrip("\r")
        except UnicodeDecodeError as e:
            yield RawRow(path, n, None, raw[:1000].decode("utf-8", "replace"), f"not valid UTF-8 ({e.reason})")
            continue
        try:
            yield RawRow(path, n, json.loads(text), text)
        except json.JSONDecodeError as e:
            yield RawRow(path, n, None, text, f"invalid JSON: {e.msg} at column {e.colno}")


def _read_json(path: str) -> Iterator[RawRow]:
    """A JSON array of rows (each numbered by the line where it starts), or JSON Lines saved
    with a ``.json`` suffix (as ``datasets.to_json`` writes by default)."""
    with open(path, "rb") as f:
        data = f.read()
    text = data.decode("utf-8", "replace")
    start = len(text) - len(text.lstrip())
    if not text[start:start + 1] == "[":
        yield from _read_jsonl(path, data=data)
        return
    dec = json.JSONDecoder()
    i, line, counted = start + 1, 1, 0
    while True:
        while i < len(text) and text[i] in " \t\r\n,":
            i += 1
        line += text.count("\n", counted, i)
        counted = i
        if i >= len(text):
            yield RawRow(path, line, None, "", "invalid JSON: the array is not closed with ']'")
            return
        if text[i] == "]":
            return
        try:
            obj, end = dec.raw_decode(text, i)
        except json.JSONDecodeError as e:
            yield RawRow(path, line, None, text[i:i + 1000],
                         f"invalid JSON: {e.msg}; the rest of the file after this line cannot be read")
            return
        yield RawRow(path, line, obj, text[i:end][:1000])
        i = end


def _read_table(source: str, fmt: str, *, split: str, subset: str | None) -> Iterator[RawRow]:
    import datasets  # heavy: imported only for table formats

    try:
        if fmt == "parquet":
            ds = datasets.Dataset.from_parquet(source)
        elif fmt == "arrow":
            ds = datasets.Dataset.from_file(source)
        elif fmt == "disk":
            ds = datasets.load_from_disk(source)
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise DataError(f"{source} has splits {sorted(ds)}, not data.split={split!r}")
                ds = ds[split]
        elif fmt == "hub":
            ds = datasets.load_dataset(source, subset, split=split)
        else:
            raise DataError(f"unknown data.format {fmt!r} for {source}")
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 - any loader failure becomes one clear sentence
        where = "hub dataset" if fmt == "hub" else f"{fmt} file"
        raise DataError(f"cannot read {where} {source} (split {split!r}): {type(e).__name__}: {e}") from e
    for n, row in enumerate(ds, start=1):
        yield RawRow(source, n, row)
