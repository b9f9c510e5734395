"""Your own Python scorers as panel rules (``name: "module:attribute"``, ``@register_scorer``) and
your own task (``task: "module:Class"``), from modules written into a temporary directory: the
preferences they give, every error with its message, and the tiny loop with such a rule alone.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import numpy as np
import pytest
import yaml

from repo_jax import config as config_lib
from repo_jax.annotators import AnnotatorError, custom, register_scorer
from repo_jax.config import ConfigError
from repo_jax.loop.config import IrepoConfig
from repo_jax.loop.panels import build_panel
from repo_jax.tasks import get_task

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"

SCORERS = '''
import math

from repo_jax.annotators import register_scorer


def words(prompt: str, response: str) -> float:
    return float(len(response.split()))


class Cited:
    """A class: built once with no arguments, its instance scores."""

    def __init__(self):
        self.mark = "[1]"

    def __call__(self, prompt: str, response: str) -> float:
        return 2.0 if self.mark in response else 0.0


@register_scorer("short-{tag}")
def _short(prompt, response):
    return -len(response) / 10


LIMIT = 100


def factory():
    return words


def needs_args(prompt, response, style):
    return 0.0


class NeedsConfig:
    def __init__(self, path):
        self.path = path


def text(prompt, response):
    return "long" if len(response) > 3 else 1.0


def nan(prompt, response):
    return math.nan if response == "b" else 0.0
'''


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """``tmp_path`` as the working directory, with ``sys.path`` and the scorer registry restored
    afterwards; yields a function writing ``name.py`` there."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", ".")])  # only the cwd rule finds it
    monkeypatch.setattr(custom, "_REGISTRY", dict(custom._REGISTRY))
    written = []

    def write(name: str, code: str) -> str:
        (tmp_path / f"{name}.py").write_text(textwrap.dedent(code))
        written.append(name)
        return name

    yield write
    for name in written:
        sys.modules.pop(name, None)


def scorers_module(write, tmp_path) -> str:
    """A module of scorers with a name of its own (modules stay imported for the session)."""
    name = f"scorers_{tmp_path.name.replace('-', '_')}"
    return write(name, SCORERS.replace("{tag}", name))


def panel_of(*members: str, task: str = ""):
    cfg = config_lib.load(IrepoConfig, None, [f"task={task}", f"annotate.panel=[{', '.join(members)}]"])
    return build_panel(cfg.annotate.panel, get_task(cfg.task) if cfg.task else None)


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


# ------------------------------------------------------------------ preferences of custom rules


def test_module_attribute_rule_gives_bradley_terry_preferences(workdir, tmp_path):
    mod = scorers_module(workdir, tmp_path)
    panel = panel_of(f"{{kind: rule, name: '{mod}:words', temperature: 0.5}}",
                     f"{{kind: rule, name: '{mod}:Cited', temperature: 2.0, weight: 3.0}}")
    assert panel.names == [f"rule/{mod}:words", f"rule/{mod}:Cited"]
    prompts = ["Why is the sky blue?", "Name a prime."]
    responses = [["Rayleigh scattering [1].", "Because of the way sunlight scatters off air", "Blue."],
                 ["7 [1]", "Seven is a prime number", "2"]]
    probs = panel.probs(prompts, responses)
    words = [[3, 8, 1], [2, 5, 1]]  # s of `words`, counted by hand
    cited = [[2, 0, 0], [2, 0, 0]]  # s of `Cited`
    for h, (s, t) in enumerate(((words, 0.5), (cited, 2.0))):
        for p in range(2):
            want = [[0.0 if i == j else sigmoid((s[p][i] - s[p][j]) / t) for j in range(3)] for i in range(3)]
            np.testing.assert_allclose(probs[h, p], want, atol=1e-6)
    counts = panel.counts(prompts, responses)
    np.testing.assert_allclose(counts + counts.transpose(0, 2, 1), [4.0 * (1 - np.eye(3))] * 2, atol=1e-5)
    np.testing.assert_allclose(counts[0, 1, 0], sigmoid(5 / 0.5) + 3 * sigmoid(-2 / 2.0), atol=1e-5)


def test_registered_scorer_by_module_or_by_name_and_task_scorers_still_by_name(workdir, tmp_path):
    mod = scorers_module(workdir, tmp_path)
    panel = panel_of(f"{{kind: rule, name: '{mod}:short-{mod}', temperature: 0.0}}")
    assert panel.probs(["q"], [["ab", "abcd"]])[0, 0].tolist() == [[0.0, 1.0], [0.0, 0.0]]  # hard votes
    # the module is imported now, so its registered name also works bare, next to a task's scorers
    panel = panel_of(f"{{kind: rule, name: 'short-{mod}'}}", "{kind: rule, name: digits}", task="toy_digits")
    assert panel.names == [f"rule/short-{mod}", "rule/digits"]

    @register_scorer("digits")
    def digits(prompt: str, response: str) -> float:
        return 0.0

    with pytest.raises(ConfigError, match=r"annotate.panel\[0\] \(rule 'digits'\): the name is both a scorer of the "
                                          r"task 'toy_digits' and a registered scorer"):
        panel_of("{kind: rule, name: digits}", task="toy_digits")
    with pytest.raises(ConfigError, match=r"rule 'nope' is not a scorer of a run without a task; choose one of "
                                          r".*'digits'.*or name a Python scorer as 'module:attribute'"):
        panel_of("{kind: rule, name: nope}")


def test_register_scorer_refuses_a_second_object_under_a_name():
    register_scorer("twice")(len)
    register_scorer("twice")(len)  # the same object again (a re-import) is fine
    with pytest.raises(ValueError, match=r"register_scorer\('twice'\): the name is already registered by"):
        register_scorer("twice")(abs)
    with pytest.raises(TypeError, match="is not callable"):
        register_scorer("three")(3)
    with pytest.raises(ValueError, match="has no ':'"):
        register_scorer("a:b")
    custom._REGISTRY.pop("twice")


# ------------------------------------------------------------------------------- errors


@pytest.mark.parametrize("name, message", [
    ("no_such_module:f", r"no module named 'no_such_module' in the working directory \(.+\) or on PYTHONPATH"),
    ("broken:f", r"importing module 'broken' failed: ZeroDivisionError: division by zero"),
    ("syntax:f", r"importing module 'syntax' failed: SyntaxError"),
    ("{mod}:missing", r"module '{mod}' \(.+{mod}\.py\) has no attribute 'missing' and registers no scorer by that "
                      r"name \(registered: .+\); it defines \['Cited', 'NeedsConfig', 'factory', 'nan', 'needs_args'"),
    ("{mod}:LIMIT", r"{mod}\.LIMIT is an int \(100\), not a scorer: a function \(prompt, response\) -> float"),
    ("{mod}:factory", r"{mod}\.factory\(\) cannot be called as scorer\(prompt, response\).*written as a class"),
    ("{mod}:needs_args", r"{mod}\.needs_args\(prompt, response, style\) cannot be called as scorer"),
    ("{mod}:NeedsConfig", r"{mod}\.NeedsConfig\(\) failed: TypeError: .*missing 1 required positional argument: "
                          r"'path' \(a scorer class is built with no arguments"),
    ("{mod}:", r"'{mod}:' is not of the form 'module:attribute'"),
])
def test_a_bad_module_attribute_is_refused_at_build_time_naming_member_and_module(workdir, tmp_path, name, message):
    mod = scorers_module(workdir, tmp_path)
    workdir("broken", "x = 1 / 0\n")
    workdir("syntax", "def f(:\n")
    name, message = name.replace("{mod}", mod), message.replace("{mod}", mod)
    with pytest.raises(ConfigError, match=re.escape(f"annotate.panel[1] (rule {name!r}): ") + message):
        panel_of("{kind: rule, name: digits}", f"{{kind: rule, name: '{name}'}}", task="toy_digits")


def test_a_score_that_is_not_a_finite_number_names_the_member_and_the_prompt(workdir, tmp_path):
    mod = scorers_module(workdir, tmp_path)
    panel = panel_of(f"{{kind: rule, name: '{mod}:text'}}")
    with pytest.raises(AnnotatorError, match=re.escape(
            f"annotator 'rule/{mod}:text' failed: ValueError: annotate.panel[0] (rule '{mod}:text'): the scorer "
            f"{mod}.text returned 'long' (str) for prompt 1 (response 0); a scorer returns a finite number")):
        panel.probs(["p0", "p1"], [["a", "b"], ["long answer", "c"]])
    panel = panel_of(f"{{kind: rule, name: '{mod}:nan'}}")
    with pytest.raises(AnnotatorError, match=re.escape(f"{mod}.nan returned nan (float) for prompt 0 (response 1)")):
        panel.probs(["p0"], [["a", "b"]])


# ----------------------------------------------------------------------------- a whole task


TASK = '''
class Polite:
    """Prompts from a file of the user's; rewards saying please."""

    def prompts_file(self, split):
        return "prompts.jsonl"

    def prompts(self, split="train"):
        return ["Ask for water.", "Ask for bread."]

    def reward(self, prompt, response):
        return float("please" in response)

    def scorers(self):
        return {"please": self.reward}

    def metrics(self, prompt, response):
        return {"accuracy": self.reward(prompt, response)}


class NoMetrics:
    def reward(self, prompt, response):
        return 0.0
'''


def test_task_module_class_supplies_scorers_and_the_simulated_reward(workdir, tmp_path):
    mod = workdir(f"task_{tmp_path.name.replace('-', '_')}", TASK)
    task = get_task(f"{mod}:Polite")
    assert task.name == f"{mod}:Polite" and task.prompts("eval") == ["Ask for water.", "Ask for bread."]
    panel = panel_of("{kind: rule, name: please, temperature: 1.0}", "{kind: simulated, count: 2}",
                     task=f"{mod}:Polite")
    assert panel.names == ["rule/please", "simulated0", "simulated1"]
    assert panel.probs(["q"], [["please", "no"]])[0, 0, 0, 1] == pytest.approx(sigmoid(1.0))
    with pytest.raises(ConfigError, match=re.escape(f"task '{mod}:NoMetrics': {mod}.NoMetrics() has no method "
                                                    "prompts_file, prompts, scorers, metrics")):
        get_task(f"{mod}:NoMetrics")
    with pytest.raises(ConfigError, match=f"task '{mod}:Nope': module '{mod}' .* has no attribute 'Nope'; it defines"):
        get_task(f"{mod}:Nope")


# ------------------------------------------------------------------ the loop, as documented


def snippet() -> tuple[str, dict]:
    """The scorer file and the YAML lines of the README's custom-reward example."""
    (text,) = re.findall(r"<!-- example: custom-reward -->\n(.*?)<!-- /example: custom-reward -->",
                         README.read_text(), re.S)
    (code,) = re.findall(r"```python\n(.*?)```", text, re.S)
    (lines,) = re.findall(r"```yaml\n(.*?)```", text, re.S)
    return code, yaml.safe_load(lines)


def loop_env() -> dict:
    """One CPU device, and the XLA compilation cache the loop tests share (tests/test_irepo.py)."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1", PYTHONUNBUFFERED="1",
               JAX_COMPILATION_CACHE_DIR=str(Path(tempfile.gettempdir()) / f"repo_jax_tests_xla_{os.getuid()}"),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    return env


def merged(base: dict, update: dict) -> dict:
    out = dict(base)
    for k, v in update.items():
        out[k] = merged(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def test_tiny_loop_with_the_documented_custom_rule_as_the_only_member(tmp_path):
    """The snippet as written: ``my_rewards.py`` and a prompts file in the working directory, its
    YAML lines added to ``configs/tiny.yaml``; the round file holds that member's judgements, the
    closed-form ``sigmoid((s_i - s_j) / T)`` of the scorer on the sampled responses."""
    code, lines = snippet()
    (tmp_path / "my_rewards.py").write_text(code)
    prompts = [f"Cite a fact about {w}." for w in ("tides", "owls", "salt", "rain", "moss", "iron", "wind", "snow")]
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    cfg = merged(yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text()), lines)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    out = subprocess.run([sys.executable, "-m", "repo_jax.irepo", "--config", "config.yaml", "run_dir=run",
                          "loop.rounds=1", "loop.prompts_per_round=8", "loop.epochs=1", "eval.num_prompts=4",
                          "eval.kl_samples=0", "loop.export=false", "loop.progress=false"],
                         cwd=tmp_path, env=loop_env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]

    (member,) = lines["annotate"]["panel"]
    temp = member["temperature"]
    sys.path.insert(0, str(tmp_path))
    try:
        from my_rewards import concise
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("my_rewards", None)
    records = [json.loads(x) for x in (tmp_path / "run" / "rounds" / "round_001.jsonl").read_text().splitlines()]
    assert len(records) == 8
    assert any(abs(x - 0.5) > 1e-3 for rec in records for row in rec["judgements"][f"rule/{member['name']}"] for x in row)
    for rec in records:
        assert list(rec["judgements"]) == [f"rule/{member['name']}"]
        s = [concise(rec["prompt"], r["text"]) for r in rec["responses"]]
        want = [[0.0 if i == j else sigmoid((s[i] - s[j]) / temp) for j in range(4)] for i in range(4)]
        np.testing.assert_allclose(rec["judgements"][f"rule/{member['name']}"], want, atol=1e-5)
        np.testing.assert_allclose(rec["counts"], want, atol=1e-5)  # the only member, weight 1
