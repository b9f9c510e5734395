"""The config reference generated from the config classes (``docs/config.md``) and the programs'
``--help``, which lists every key with its default or documents one."""

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from repo_jax import config_keys as ck
from repo_jax import config_reference as ref
from repo_jax.config_reference import markdown

ROOT = Path(__file__).resolve().parent.parent


def _keys(program: str) -> dict[str, ck.Key]:
    return {k.path: k for s in ck.sections(ck.program_class(program)) for k in s.keys}


def test_docs_config_md_is_up_to_date():
    doc = ROOT / "docs" / "config.md"
    assert doc.is_file(), f"docs/config.md is missing: run {ref.REGENERATE}"
    assert doc.read_text() == markdown(), f"docs/config.md is out of date: run {ref.REGENERATE}"


def test_every_key_is_documented():
    missing = ck.undocumented()
    assert not missing, ("config keys without documentation; add a `name: meaning` entry to the dataclass "
                         "docstring: " + ", ".join(missing))


def test_known_keys_types_and_defaults():
    irepo, lpo, sft = _keys("irepo"), _keys("lpo"), _keys("sft")
    assert (irepo["loop.sample_waves"].type, irepo["loop.sample_waves"].default) == ("int", "4")
    assert (irepo["optim.total_steps"].type, irepo["optim.total_steps"].default) == ("int", "0")
    assert (irepo["sample.top_p"].type, irepo["sample.top_p"].default) == ("float | None", "null")
    assert irepo["loop.optimizer"].type == '"reset" | "carry"'
    assert (irepo["data.length_buckets"].type, irepo["data.length_buckets"].default) == ("list of int", "[]")
    assert irepo["annotate.panel"].type == "list of AnnotatorSpec"
    assert irepo["annotate.panel"].default.startswith("[{kind: rule, name: correct}")
    assert irepo["annotate.panel[].kind"].default == "rule" and irepo["checkpoint.dir"].default == '""'
    assert irepo["optim.lr"].default == "1.0e-06" and irepo["strict"].default == "true"
    assert (lpo["run_dir"].default, lpo["pairs.mode"].default, sft["run_dir"].default) == ("runs/lpo", "list", "runs/sft")
    assert "pairs.mode" not in sft and "loop.rounds" not in lpo
    assert irepo["loop.sample_waves"].summary.startswith("with served members in the panel")
    assert irepo["loop.sample_waves"].summary.endswith("instead of their sum.")


def test_markdown_tables_and_shared_sections():
    text = markdown()
    assert text.startswith("# Config reference\n") and ref.REGENERATE in text.splitlines()[2]
    assert "| `loop.sample_waves` | `int` | `4` |" in text
    assert "| `optim.total_steps` | `int` | `0` |" in text
    assert '| `loop.optimizer` | `"reset" \\| "carry"` | `reset` |' in text
    assert text.count("| `model.lora.rank` |") == 1  # a shared section is listed once ...
    assert "### `model`\n\nRead by: `irepo`, `lpo`, `sft`." in text  # ... with its readers
    assert text.count("| `run_dir` |") == 3  # the top level differs (run_dir's default)
    for program in ck.PROGRAMS:
        assert f"## `{program}`: `python -m repo_jax.{program}`" in text


@dataclasses.dataclass(frozen=True)
class _Documented:
    """Summary prose (e.g. this).

    a / b: shared text, e.g. continued
      on an indented line.
    c (with ``a`` > 0): conditional.
    ``d``: paragraph form
    running on. Eq. 8 is no sentence end.

    More prose.
    """

    a: int = 0
    b: int = 1
    c: str = ""
    d: bool = True
    e: float = 0.0


def test_docstring_entries():
    entries, prose = ck.docstring_entries(_Documented)
    assert entries["a"] == entries["b"] == "shared text, e.g. continued on an indented line."
    assert entries["c"] == "(with ``a`` > 0) conditional."
    assert entries["d"] == "paragraph form running on. Eq. 8 is no sentence end."
    assert "e" not in entries and prose == "Summary prose (e.g. this).\n\nMore prose."
    assert ck.first_sentence(entries["d"]) == "paragraph form running on."
    assert ck.first_sentence(entries["a"]) == entries["a"]


# ------------------------------------------------------------------------------ --help


@pytest.mark.parametrize("program, present, absent", [
    ("irepo", ["loop.sample_waves = 4", "optim.total_steps = 0", "annotate.panel[].kind = rule", "run_dir = runs/default"],
     ["pairs.mode"]),
    ("lpo", ["pairs.mode = list", "run_dir = runs/lpo", "eval.holdout = 0", "model.lora.rank = 0"], ["loop.rounds"]),
    ("sft", ["run_dir = runs/sft", "train.steps = 0", "data.num_epochs = 1"], ["pairs.mode", "loop.rounds"]),
])
def test_help_lists_every_key_with_its_default(program, present, absent, capsys):
    import importlib

    assert importlib.import_module(f"repo_jax.{program}").main(["--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: python -m repo_jax.{program}") and "--config CONFIG" in out and "--twin" in out
    assert out.index("Exit status:") < out.index("config keys (KEY = DEFAULT")  # after the usual text
    for text in present:
        assert text in out, text
    for text in absent:
        assert text not in out, text
    key_lines = [line for line in out.splitlines() if line.startswith("  ") and " = " in line and "  # " in line]
    assert len(key_lines) == sum(len(s.keys) for s in ck.sections(ck.program_class(program)))


def test_help_key_and_section(capsys):
    from repo_jax.irepo import main

    assert main(["--help", "loop.sample_waves"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert out.startswith("loop.sample_waves type: int default: 4 with served members")
    assert "1: sample everything, then annotate." in out  # the full text, not only the first sentence
    assert main(["--help", "loop"]) == 0
    out = capsys.readouterr().out
    assert "section loop (LoopConfig)" in out and "loop.rounds\n    type: int\n    default: 3" in out
    assert "loop.sample_waves" in out and "sample.temperature" not in out
    assert main(["--help", "annotate.panel.kind"]) == 0  # the [] of a list's members may be left out
    assert "annotate.panel[].kind\n    type: \"rule\" | \"simulated\"" in capsys.readouterr().out


def test_help_unknown_key_names_close_matches(capsys):
    from repo_jax.irepo import main
    from repo_jax.lpo import main as lpo_main

    assert main(["--help", "loop.sample_wave"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "error:" in err and "'loop.sample_wave'" in err
    assert "close matches: loop.sample_waves" in err
    assert main(["--help", "total_steps"]) == 2
    assert "optim.total_steps" in capsys.readouterr().err
    assert lpo_main(["--help", "loop.rounds"]) == 2
    assert "python -m repo_jax.lpo has no config key" in capsys.readouterr().err


def test_command_line_keeps_argparse_behaviour(tmp_path):
    """As a user runs it: --help prints and exits 0; --config, overrides and unknown flags behave
    as before (a missing config file and a bad flag exit 2)."""
    run = lambda *args: subprocess.run([sys.executable, "-m", "repo_jax.sft", *args], capture_output=True,
                                       text=True, cwd=ROOT, timeout=300)
    out = run("--help", "model.lora")
    assert out.returncode == 0 and "model.lora.alpha\n    type: float\n    default: 16.0" in out.stdout
    missing = tmp_path / "missing.yaml"
    out = run("--config", str(missing), "train.steps=3")
    assert out.returncode == 2 and f"config file {missing} does not exist" in out.stderr
    out = run("--no-such-flag")
    assert out.returncode == 2 and "unrecognized arguments: --no-such-flag" in out.stderr
