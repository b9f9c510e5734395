"""reporting: metrics.jsonl, TensorBoard events, report.png, the terminal table, progress bars."""

import math
import subprocess
import sys

from pathlib import Path

import numpy as np
import pytest

from repo_jax import reporting
from repo_jax.reporting import (
    DEFAULT_COLUMNS,
    TensorBoard,
    append_jsonl,
    format_row,
    plot_report,
    progress,
    read_jsonl,
    summary_table,
    table_header,
    write_jsonl_atomic,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _records(n=3):
    """Iteration 0 (no train/*), then rounds with every metric."""
    out = [
        {
            "iteration": 0,
            "eval/reward": 0.41,
            "eval/accuracy": 0.2,
            "eval/win_rate": 0.5,
            "eval/kl": 0.0,
            "eval/length": 37.5,
            "train/loss": None,
            "time/round": 21.04,
        }
    ]
    for i in range(1, n):
        out.append(
            {
                "iteration": i,
                "eval/reward": 0.41 + 0.1 * i,
                "eval/accuracy": 0.2 + 0.05 * i,
                "eval/win_rate": 0.5 + 0.1 * i,
                "eval/kl": 0.25 * i,
                "eval/length": 37.5 - i,
                "train/loss": 0.6931 - 0.1 * i,
                "train/note": "text is not a scalar",
                "time/round": 67.0 + i,
            }
        )
    return out


# ---------------------------------------------------------------------------------------- jsonl


def test_jsonl_round_trip(tmp_path):
    path = tmp_path / "run" / "metrics.jsonl"  # the folder does not exist yet
    records = _records()
    for r in records:
        append_jsonl(path, r)
    assert read_jsonl(path) == records
    assert len(path.read_text().splitlines()) == len(records)


def test_jsonl_numpy_scalars_become_numbers(tmp_path):
    path = tmp_path / "m.jsonl"
    append_jsonl(path, {"iteration": np.int32(2), "eval/kl": np.float32(0.5), "v": np.arange(2)})
    assert read_jsonl(path) == [{"iteration": 2, "eval/kl": 0.5, "v": [0, 1]}]


def test_jsonl_skips_blank_lines(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"iteration": 0}\n\n{"iteration": 1}\n')
    assert read_jsonl(path) == [{"iteration": 0}, {"iteration": 1}]


def test_write_jsonl_atomic_replaces_content(tmp_path):
    path = tmp_path / "metrics.jsonl"
    for r in _records(3):
        append_jsonl(path, r)
    write_jsonl_atomic(path, _records(2))
    assert read_jsonl(path) == _records(2)
    write_jsonl_atomic(path, [])
    assert read_jsonl(path) == []
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.jsonl"]  # no temp file left
    assert path.stat().st_mode & 0o777 == 0o644  # not mkstemp's 0600
    path.chmod(0o640)
    write_jsonl_atomic(path, _records(1))
    assert path.stat().st_mode & 0o777 == 0o640


def test_write_jsonl_atomic_keeps_old_file_on_failure(tmp_path):
    path = tmp_path / "metrics.jsonl"
    write_jsonl_atomic(path, _records(2))
    before = path.read_bytes()
    with pytest.raises(TypeError):
        write_jsonl_atomic(path, [{"iteration": 5, "bad": object()}])
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.jsonl"]


@pytest.mark.parametrize(
    "bad_line, why",
    [('{"iteration": 1, "eval/kl": ', "invalid JSON"), ("[1, 2]", "expected a JSON object")],
)
def test_read_jsonl_names_file_and_line(tmp_path, bad_line, why):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"iteration": 0}\n\n' + bad_line + "\n")  # line 3 (blank lines count)
    with pytest.raises(ValueError) as e:
        read_jsonl(path)
    assert f"{path}:3:" in str(e.value)
    assert why in str(e.value)


# ---------------------------------------------------------------------------------- TensorBoard


def _read_scalars(log_dir):
    """{tag: [(step, value), ...]} from the event files under ``log_dir``, parsed as TFRecords
    (u64 length, u32 crc, payload, u32 crc) of ``Event`` protos with tensorboardX's own proto
    classes, so the check needs no tensorboard install."""
    import struct

    from tensorboardX.proto.event_pb2 import Event

    out: dict[str, list] = {}
    for path in sorted(Path(log_dir).glob("events.out.tfevents.*")):
        data, pos = path.read_bytes(), 0
        while pos < len(data):
            (n,) = struct.unpack("<Q", data[pos:pos + 8])
            event = Event.FromString(data[pos + 12:pos + 12 + n])
            pos += 12 + n + 4
            for v in event.summary.value:
                out.setdefault(v.tag, []).append((event.step, v.simple_value))
    return out


def test_tensorboard_writes_scalars_at_iterations(tmp_path):
    log_dir = tmp_path / "tb"
    records = _records(3)
    with TensorBoard(log_dir) as tb:
        for r in records:
            tb.write(r)
        tb.flush()
    assert list(log_dir.glob("events.out.tfevents.*"))
    scalars = _read_scalars(log_dir)
    assert "iteration" not in scalars
    assert "train/note" not in scalars  # strings skipped
    for key in ("eval/reward", "eval/win_rate", "eval/kl", "time/round"):
        assert [s for s, _ in scalars[key]] == [0, 1, 2]
        np.testing.assert_allclose([v for _, v in scalars[key]], [r[key] for r in records], rtol=1e-6)
    # None at iteration 0 is skipped, not written as 0
    assert [s for s, _ in scalars["train/loss"]] == [1, 2]
    np.testing.assert_allclose([v for _, v in scalars["train/loss"]], [0.5931, 0.4931], rtol=1e-6)


def test_tensorboard_accepts_numpy_and_needs_iteration(tmp_path):
    tb = TensorBoard(tmp_path / "tb")
    tb.write({"iteration": np.int64(4), "eval/kl": np.float32(0.25), "flag": True})
    with pytest.raises(ValueError, match="iteration"):
        tb.write({"eval/kl": 1.0})
    tb.close()
    scalars = _read_scalars(tmp_path / "tb")
    assert scalars == {"eval/kl": [(4, 0.25)]}


# ------------------------------------------------------------------------------------- plotting


def _assert_png(path):
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    assert len(data) > 10_000  # axes, text and lines, not an empty canvas


def test_plot_report_writes_png(tmp_path):
    out = plot_report(_records(4), tmp_path / "report.png", title="iREPO, SmolLM2-135M")
    assert out == tmp_path / "report.png"
    _assert_png(out)


def test_plot_report_with_missing_keys(tmp_path):
    records = [{k: v for k, v in r.items() if k != "eval/kl"} for r in _records(3)]
    records[1]["eval/accuracy"] = None
    records[2]["eval/win_rate"] = float("nan")
    assert reporting._panel_keys(records, reporting.DEFAULT_PLOT_KEYS) == [
        "eval/reward",
        "eval/accuracy",
        "eval/win_rate",
    ]
    assert reporting._series(records, "eval/accuracy")[0] == [0, 2]
    _assert_png(plot_report(records, tmp_path / "sub" / "report.png"))


def test_plot_report_single_record_and_no_metrics(tmp_path):
    _assert_png(plot_report(_records(1), tmp_path / "one.png"))
    out = plot_report([{"iteration": 0}], tmp_path / "none.png", keys=("eval/reward",))
    assert out.read_bytes()[:8] == PNG_SIGNATURE


def test_plot_report_leaves_pyplot_alone(tmp_path):
    code = (
        "import sys; from repo_jax.reporting import plot_report; "
        f"plot_report([{{'iteration': 0, 'eval/reward': 1.0}}], {str(tmp_path / 'r.png')!r}); "
        "assert 'matplotlib.pyplot' not in sys.modules; "
        "assert 'jax' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# ---------------------------------------------------------------------------------------- table


def test_summary_table_lines_missing_and_formats():
    records = _records(3)
    del records[2]["eval/kl"]
    table = summary_table(records)
    lines = table.splitlines()
    assert len(lines) == 1 + len(records)
    assert lines[0].split() == ["round", "reward", "accuracy", "win", "rate", "KL", "loss", "seconds"]
    row0, row1, row2 = (line.split() for line in lines[1:])
    # round, reward (.4f), accuracy (.3f), win rate (.3f), KL (.4f), loss (.4f), seconds (.1f)
    assert row0 == ["0", "0.4100", "0.200", "0.500", "0.0000", "-", "21.0"]
    assert row1 == ["1", "0.5100", "0.250", "0.600", "0.2500", "0.5931", "68.0"]
    assert row2 == ["2", "0.6100", "0.300", "0.700", "-", "0.4931", "69.0"]
    assert len({len(line) for line in lines}) == 1  # right-aligned, fixed width


def test_format_row_lines_up_with_header():
    header = table_header()
    rows = [format_row(r) for r in _records(3)]
    assert header == summary_table([]).splitlines()[0]
    assert rows == summary_table(_records(3)).splitlines()[1:]
    assert {len(r) for r in rows} == {len(header)}
    # every value ends at its header's right edge
    ends = [header.index(h) + len(h) for h, _, _ in DEFAULT_COLUMNS]
    for row in rows:
        assert all(row[e - 1] != " " for e in ends)


def test_table_custom_columns_and_odd_values():
    cols = (("it", "iteration", "d"), ("len", "eval/length", ".1f"), ("x", "x", ".2e"))
    row = format_row({"iteration": 3.0, "eval/length": np.float32(12.25), "x": "oops"}, cols)
    assert row.split() == ["3", "12.2", "-"]  # integral float under "d"; a string is missing
    wide = summary_table([{"iteration": 1, "eval/length": 123456789.0}], cols)
    assert "123456789.0" in wide
    assert len({len(line) for line in wide.splitlines()}) == 1
    assert math.isnan(float(format_row({"x": float("nan")}, cols).split()[-1]))


# -------------------------------------------------------------------------------------- progress


def test_progress_shows_bar_with_eta(capsys):
    assert list(progress(range(5), desc="sample", unit="prompt")) == list(range(5))
    err = capsys.readouterr().err
    assert "sample" in err and "5/5" in err and "prompt" in err and "<" in err  # elapsed<ETA


def test_progress_manual_updates(capsys):
    with progress(total=10, desc="train", unit="step") as bar:
        bar.update(4)
        bar.update(6)
    assert "10/10" in capsys.readouterr().err


def test_progress_disabled_is_silent(capsys):
    assert list(progress(iter("abc"), desc="quiet", enabled=False)) == ["a", "b", "c"]
    with progress(total=3, enabled=False) as bar:
        bar.update(3)
    out = capsys.readouterr()
    assert out.err == "" and out.out == ""

