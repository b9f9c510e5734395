"""Reading + checking every row of ``data.path`` once, before training, with a rejects file.

A bad row (invalid JSON, missing field, empty response, non-finite score, probability outside
[0, 1], fewer than 2 responses, more than ``data.num_responses``, an over-long prompt with
``data.prompt_overflow=reject``) is counted and written to ``run_dir/rejects.jsonl`` with its
source, 1-based line and reason; the counts are printed. With ``data.strict=true`` the first bad
row is an error naming its file and line. Nothing is dropped without a trace.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
from collections.abc import Callable
from pathlib import Path

from repo_jax.data import schemas, sources
from repo_jax.data.config import DataConfig
from repo_jax.data.sources import DataError

REJECTS_FILE = "rejects.jsonl"


@dataclasses.dataclass(frozen=True)
class Reject:
    source: str
    line: int
    code: str
    reason: str
    row: str

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), ensure_ascii=False)


@dataclasses.dataclass(frozen=True)
class LoadReport:
    """What a load read: rows seen, rows kept, rejects (with the count per ``code``)."""

    sources: tuple[str, ...]
    schemas: tuple[str, ...]
    rows_read: int
    kept: int
    rejects: tuple[Reject, ...]
    rejects_path: str | None

    @property
    def counts(self) -> dict[str, int]:
        return dict(sorted(collections.Counter(r.code for r in self.rejects).items()))

    def summary(self) -> str:
        where = ", ".join(self.sources) if len(self.sources) <= 3 else f"{len(self.sources)} files"
        line = f"data: {where}: {self.rows_read} rows read, {self.kept} kept, {len(self.rejects)} rejected"
        if self.rejects:
            line += " (" + ", ".join(f"{k} {v}" for k, v in self.counts.items()) + ")"
            line += f"; details in {self.rejects_path}" if self.rejects_path else \
                "; first: " + "; ".join(f"{r.source}:{r.line}: {r.reason}" for r in self.rejects[:3])
        return line


def _row_text(raw: sources.RawRow) -> str:
    if raw.text:
        return raw.text[:1000]
    try:
        return json.dumps(raw.row, ensure_ascii=False, default=str)[:1000]
    except (TypeError, ValueError):
        return repr(raw.row)[:1000]


def load_examples(cfg: DataConfig, *, tokenizer=None, run_dir: str | os.PathLike | None = None,
                  log: Callable[[str], None] | None = print) -> tuple[list[dict], LoadReport]:
    """Reads and checks every row of ``cfg.path``; returns ``(examples, report)``.

    Each example is a normalised dict (see :mod:`repo_jax.data.schemas`) plus ``source`` and
    ``line``. ``tokenizer`` is needed only for ``prompt_overflow=reject`` (prompt length is
    counted in tokens of the chat-formatted prompt). Raises :class:`DataError` in strict mode,
    or when no row at all is usable.
    """
    from repo_jax.data.tokenize import Formatter

    fmt = Formatter(tokenizer, chat_template=cfg.chat_template) if tokenizer is not None else None
    if cfg.prompt_overflow == "reject" and fmt is None:
        raise ValueError("data.prompt_overflow=reject needs a tokenizer to count prompt tokens")
    examples: list[dict] = []
    rejects: list[Reject] = []
    srcs = sources.resolve(cfg.path, cfg.format)
    used_schemas, rows_read = [], 0
    for source, form in srcs:
        schema = None if cfg.schema == "auto" else cfg.schema
        for raw in sources.read_rows(source, form, split=cfg.split, subset=cfg.subset):
            rows_read += 1
            try:
                if raw.error is not None:
                    raise schemas.BadRow("invalid_json" if raw.error.startswith("invalid JSON") else "bad_encoding", raw.error)
                if schema is None:
                    schema = schemas.detect_schema(raw.row)
                ex = schemas.adapt(schema, raw.row)
                _check_lengths(ex, cfg, fmt)
            except schemas.BadRow as e:
                if cfg.strict:
                    raise DataError(f"{raw.source}:{raw.line}: {e} (data.strict=true)") from None
                rejects.append(Reject(raw.source, raw.line, e.code, str(e), _row_text(raw)))
                continue
            ex["source"], ex["line"] = raw.source, raw.line
            examples.append(ex)
        used_schemas.append(schema or "unknown")
    rejects_path = write_rejects(run_dir, rejects, [s for s, _ in srcs]) if run_dir is not None else None
    report = LoadReport(tuple(s for s, _ in srcs), tuple(used_schemas), rows_read, len(examples), tuple(rejects),
                        rejects_path)
    if log is not None:
        log(report.summary())
    if not examples:
        raise DataError(f"no usable rows in {cfg.path} ({rows_read} read, {len(rejects)} rejected)")
    return examples, report


def _check_lengths(ex: dict, cfg: DataConfig, fmt) -> None:
    if cfg.num_responses and len(ex["responses"]) > cfg.num_responses:
        raise schemas.BadRow("too_many_responses",
                             f"{len(ex['responses'])} responses, more than data.num_responses={cfg.num_responses}")
    if cfg.prompt_overflow == "reject":
        n = len(fmt.prompt_ids(ex["prompt"]))
        if n > cfg.max_prompt_len:
            raise schemas.BadRow("prompt_too_long", f"prompt is {n} tokens, over data.max_prompt_len={cfg.max_prompt_len}")


def write_rejects(run_dir: str | os.PathLike, rejects: list[Reject], sources_: list[str]) -> str:
    """Writes ``run_dir/rejects.jsonl``: earlier lines from *other* sources are kept (a run may
    load a train and an eval file), lines from these sources are replaced (a resumed run does not
    duplicate them). Returns the path."""
    path = Path(run_dir) / REJECTS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    keep = []
    if path.is_file():
        names = set(sources_)
        for line in path.read_text().splitlines():
            try:
                if json.loads(line).get("source") not in names:
                    keep.append(line)
            except json.JSONDecodeError:
                continue
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text("".join(line + "\n" for line in keep + [r.to_json() for r in rejects]))
    tmp.replace(path)
    return str(path)
