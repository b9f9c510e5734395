"""What a user of a training run sees and keeps: metrics files, TensorBoard, a plot, a table, bars.

A run writes one flat JSON object per iteration (``{"iteration": 0, "eval/reward": 0.41, ...,
"train/loss": null, "time/round": 67.0}``; iteration 0 is the starting policy and has no
``train/*`` values) to ``run_dir/metrics.jsonl``. This module holds the pieces that turn those
records into something to look at:

* ``append_jsonl`` / ``read_jsonl`` / ``write_jsonl_atomic``: the metrics file itself. Appending a
  line per round keeps what finished; the atomic write (temp file + ``os.replace``) rewrites a
  whole file so that a kill never leaves half of one; ``read_jsonl`` names the file and line of a
  bad record.
* ``TensorBoard``: every numeric value of a record as a scalar event (step = ``iteration``), via
  ``tensorboardX`` (no TensorFlow or torch needed).
* ``plot_report``: ``report.png``, one panel per metric over the iterations.
* ``summary_table`` / ``table_header`` / ``format_row``: a fixed-width terminal table, whole or a
  row at a time as rounds finish.
* ``progress``: the one tqdm bar style (with ETA, on stderr) that every phase of the loop uses;
  silent when disabled.

Numbers may be Python, NumPy or 0-d JAX scalars; ``None``, strings and booleans count as missing
wherever a number is expected. Nothing here imports jax; matplotlib and tensorboardX are imported
only by the functions that need them.
"""

from __future__ import annotations

import contextlib
import json
import math
import numbers
import os
import sys
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from tqdm import tqdm

__all__ = [
    "DEFAULT_COLUMNS",
    "DEFAULT_PLOT_KEYS",
    "TensorBoard",
    "append_jsonl",
    "format_row",
    "plot_report",
    "progress",
    "read_jsonl",
    "summary_table",
    "table_header",
    "write_jsonl_atomic",
]

PathLike = str | os.PathLike

# ------------------------------------------------------------------------------------------------
# numbers


def _scalar(value: Any) -> int | float | None:
    """``value`` as a Python int/float, or ``None`` when it is missing or not a number.

    Booleans and strings are not numbers here; NumPy scalars and 0-d arrays (NumPy or JAX) are.
    """
    if value is None or isinstance(value, (bool, str, bytes)):
        return None
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    if getattr(value, "ndim", None) == 0 and hasattr(value, "item"):
        return _scalar(value.item())
    return None


def _json_default(obj: Any) -> Any:
    """``json.dumps`` fallback: NumPy/JAX scalars and arrays become Python numbers and lists."""
    if getattr(obj, "ndim", None) == 0 and hasattr(obj, "item"):
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    raise TypeError(f"{type(obj).__name__} is not JSON serializable")


# ------------------------------------------------------------------------------------------------
# metrics.jsonl


def _dumps(record: Mapping[str, Any]) -> str:
    """One record as one JSON line (no newline). NaN/inf are written as ``NaN``/``Infinity``."""
    return json.dumps(dict(record), default=_json_default)


def append_jsonl(path: PathLike, record: Mapping[str, Any]) -> None:
    """Appends ``record`` as one line to ``path`` (created, with its folder, if absent)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = _dumps(record) + "\n"  # serialise first: a bad value must not leave a partial line
    with open(path, "a", encoding="utf-8") as f:
        f.write(line)
        f.flush()


def read_jsonl(path: PathLike) -> list[dict[str, Any]]:
    """The records of ``path``, one JSON object per non-blank line.

    Raises ``ValueError("<path>:<line>: ...")`` (1-based line) for a line that is not a JSON object.
    """
    records = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: invalid JSON ({e.msg}): {line.strip()[:80]!r}") from None
            if not isinstance(record, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
            records.append(record)
    return records


def write_jsonl_atomic(path: PathLike, records: Iterable[Mapping[str, Any]]) -> None:
    """Replaces ``path`` with ``records``, one per line, all or nothing.

    Writes a temporary file in the same folder, syncs it and ``os.replace``s it over ``path``, so
    a reader (or a kill) sees either the old file or the new one, never half of one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(_dumps(r) + "\n" for r in records)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, _file_mode(path))  # mkstemp makes 0600; keep the old file's (or 0644)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _file_mode(path: Path) -> int:
    try:
        return path.stat().st_mode & 0o777
    except FileNotFoundError:
        return 0o644


# ------------------------------------------------------------------------------------------------
# TensorBoard


class TensorBoard:
    """Scalar event files under ``log_dir``: every numeric value of a record at ``record["iteration"]``.

    >>> with TensorBoard(run_dir / "tb") as tb:
    ...     tb.write({"iteration": 1, "eval/reward": 0.5, "train/loss": None})  # loss skipped
    """

    def __init__(self, log_dir: PathLike, *, purge_step: int | None = None):
        """``purge_step``: a resumed run passes its next iteration, so TensorBoard hides the
        events an interrupted attempt wrote at that step and later."""
        from tensorboardX import SummaryWriter

        self.log_dir = Path(log_dir)
        self._writer = SummaryWriter(logdir=str(self.log_dir), purge_step=purge_step)

    def write(self, record: Mapping[str, Any]) -> None:
        """Adds one scalar per numeric key (``iteration`` itself excepted); ``None`` and others skipped."""
        step = _scalar(record.get("iteration"))
        if not isinstance(step, int):
            raise ValueError(f"record needs an integer 'iteration', got {record.get('iteration')!r}")
        for key, value in record.items():
            number = _scalar(value)
            if key != "iteration" and number is not None:
                self._writer.add_scalar(key, float(number), global_step=step)

    def flush(self) -> None:
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()

    def __enter__(self) -> TensorBoard:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close()


# ------------------------------------------------------------------------------------------------
# report.png

DEFAULT_PLOT_KEYS: tuple[str, ...] = ("eval/reward", "eval/accuracy", "eval/win_rate", "eval/kl")

_PLOT_TITLES = {
    "eval/reward": "reward",
    "eval/accuracy": "accuracy",
    "eval/win_rate": "win rate",
    "eval/kl": "KL",
}
_REFERENCE_LINES = {"eval/win_rate": 0.5}  # a win rate of 0.5 = no better than the reference


def _series(records: Sequence[Mapping[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """(iterations, values) of the records with a finite number under ``key``."""
    xs, ys = [], []
    for i, record in enumerate(records):
        y = _scalar(record.get(key))
        if y is None or not math.isfinite(y):
            continue
        x = _scalar(record.get("iteration"))
        xs.append(i if x is None else x)
        ys.append(float(y))
    return xs, ys


def _panel_keys(records: Sequence[Mapping[str, Any]], keys: Sequence[str]) -> list[str]:
    """The ``keys`` that have at least one finite number in ``records`` (one panel each)."""
    return [k for k in keys if _series(records, k)[0]]


def plot_report(
    records: Sequence[Mapping[str, Any]],
    path: PathLike,
    *,
    title: str = "",
    keys: Sequence[str] = DEFAULT_PLOT_KEYS,
) -> Path:
    """Writes a PNG with one panel per key in ``keys`` (value per iteration); returns ``path``.

    Keys without a number in any record get no panel; the win-rate panel has a dashed line at
    0.5. Uses matplotlib's Agg canvas directly (no pyplot, the global backend is left alone).
    """
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    panels = _panel_keys(records, keys)
    ncols = min(len(panels), 2) or 1
    nrows = max(1, math.ceil(len(panels) / ncols))
    fig = Figure(figsize=(5.0 * ncols, 3.4 * nrows), layout="constrained")
    if title:
        fig.suptitle(title)
    if not panels:
        ax = fig.add_subplot()
        ax.text(0.5, 0.5, "no metrics to plot", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
    for n, key in enumerate(panels, start=1):
        ax = fig.add_subplot(nrows, ncols, n)
        xs, ys = _series(records, key)
        ax.plot(xs, ys, marker="o")
        if key in _REFERENCE_LINES:
            ax.axhline(_REFERENCE_LINES[key], linestyle="--", color="gray", linewidth=1)
        ax.set_title(_PLOT_TITLES.get(key, key))
        ax.set_xlabel("iteration")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(True, alpha=0.3)
    fig.savefig(path, format="png", dpi=100)  # Figure() gets an Agg canvas when saved
    return path


# ------------------------------------------------------------------------------------------------
# terminal table

Column = tuple[str, str, str]  # (header, record key, format spec for format())

DEFAULT_COLUMNS: tuple[Column, ...] = (
    ("round", "iteration", "d"),
    ("reward", "eval/reward", ".4f"),
    ("accuracy", "eval/accuracy", ".3f"),
    ("win rate", "eval/win_rate", ".3f"),
    ("KL", "eval/kl", ".4f"),
    ("loss", "train/loss", ".4f"),
    ("seconds", "time/round", ".1f"),
)

_MIN_WIDTH = 8  # fits e.g. "-12.3456" so that rows printed one at a time line up with the header
_SEP = "  "
MISSING = "-"


def _cell(record: Mapping[str, Any], key: str, spec: str) -> str:
    """One value formatted with ``spec``; ``-`` when missing or not a number."""
    value = _scalar(record.get(key))
    if value is None:
        return MISSING
    try:
        return format(value, spec)
    except ValueError:  # e.g. a float under an integer spec
        return format(value, "g")


def _width(header: str) -> int:
    return max(len(header), _MIN_WIDTH)


def _join(cells: Sequence[str], widths: Sequence[int]) -> str:
    return _SEP.join(c.rjust(w) for c, w in zip(cells, widths)).rstrip()


def table_header(columns: Sequence[Column] = DEFAULT_COLUMNS) -> str:
    """The header line of ``format_row``'s rows."""
    return _join([h for h, _, _ in columns], [_width(h) for h, _, _ in columns])


def format_row(record: Mapping[str, Any], columns: Sequence[Column] = DEFAULT_COLUMNS) -> str:
    """One table row for ``record``, aligned with ``table_header(columns)``."""
    return _join([_cell(record, k, s) for _, k, s in columns], [_width(h) for h, _, _ in columns])


def served_cost(records: Sequence[Mapping[str, Any]]) -> str:
    """One line per served annotator: the run's requests and ``usage`` tokens so far, summed over
    the records' ``annotate/*`` and ``eval/*`` counters ("" when no member is served)."""
    totals: dict[str, dict[str, float]] = {}
    for r in records:
        for key, v in r.items():
            phase, _, rest = key.partition("/")
            counter, _, name = rest.partition("/")
            if phase in ("annotate", "eval") and name and counter in ("requests", "prompt_tokens", "completion_tokens"):
                totals.setdefault(name, {}).setdefault(counter, 0.0)
                totals[name][counter] += float(v)
    return "\n".join(f"{name}: {t.get('requests', 0):,.0f} requests, {t.get('prompt_tokens', 0):,.0f} prompt + "
                     f"{t.get('completion_tokens', 0):,.0f} completion tokens this run (the server's usage counts)"
                     for name, t in sorted(totals.items()))


def summary_table(records: Sequence[Mapping[str, Any]], columns: Sequence[Column] = DEFAULT_COLUMNS) -> str:
    """Header plus one row per record; like ``table_header``/``format_row``, widened to fit values."""
    rows = [[_cell(r, k, s) for _, k, s in columns] for r in records]
    widths = [max([_width(h)] + [len(row[j]) for row in rows]) for j, (h, _, _) in enumerate(columns)]
    lines = [_join([h for h, _, _ in columns], widths)] + [_join(row, widths) for row in rows]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# progress bars


def progress(
    iterable: Iterable[Any] | None = None,
    *,
    total: int | None = None,
    desc: str = "",
    unit: str = "it",
    enabled: bool = True,
) -> tqdm:
    """A tqdm bar on stderr (count, elapsed, ETA, rate) in the style shared by every phase.

    Wraps ``iterable``, or with ``iterable=None`` gives a bar to ``update(n)`` by hand (use it as a
    context manager). ``enabled=False`` gives the same object with no output at all.
    """
    return tqdm(
        iterable,
        total=total,
        desc=desc,
        unit=unit,
        disable=not enabled,
        file=sys.stderr,
        dynamic_ncols=True,
        mininterval=0.5,
        smoothing=0.1,
    )
