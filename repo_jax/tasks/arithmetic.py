"""The embedded default task: short arithmetic word problems with a verifiable numeric answer.

Why this task: a 135M-parameter instruct model (SmolLM2) gets some of these right and some
wrong, so the D responses it samples for a prompt differ in a way a rule can check -- exactly the
signal iREPO's annotators turn into empirical preferences -- and a laptop can run a round.

A :class:`Problem` is a prompt with its integer answer and the expression that computes it. The
task's reward (used by the rule annotators, the simulated raters and ``eval/reward``) is::

    reward = 1.0 * correct + 0.25 * format + 0.25 * length
    correct: the last number of the response equals the answer
    format:  the response ends with "Answer: <number>"
    length:  1 up to 60 words, falling linearly to 0 at 120 words
"""

from __future__ import annotations

import dataclasses
import json
import random
from collections.abc import Iterable, Sequence
from importlib import resources

from repo_jax.annotators import (
    ExactNumber, LengthBudget, LLMJudge, Panel, RegexMatch, RuleAnnotator, Weighted, simulated_panel,
)

INSTRUCTION = "End your reply with 'Answer: <number>'."
ANSWER_FORMAT = r"Answer:\s*-?\d[\d,]*(?:\.\d+)?\s*\.?\s*$"
MAX_WORDS = 60
WEIGHTS = {"correct": 1.0, "format": 0.25, "length": 0.25}
MAX_REWARD = sum(WEIGHTS.values())

NAMES = ("Ava", "Ben", "Chloe", "Dan", "Ella", "Finn", "Grace", "Hugo", "Isla", "Jack", "Kira", "Liam", "Maya",
         "Noah", "Olga", "Pablo", "Quinn", "Rosa", "Sam", "Tara")
ITEMS = ("apples", "pencils", "stickers", "marbles", "cookies", "books", "coins", "cards", "shells", "stamps")


@dataclasses.dataclass(frozen=True)
class Problem:
    id: str
    prompt: str
    answer: int
    expression: str

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), ensure_ascii=False)


def _question(rng: random.Random) -> tuple[str, int, str]:
    """One word problem: ``(question, answer, expression)``."""
    name, item, kind = rng.choice(NAMES), rng.choice(ITEMS), rng.randrange(6)
    if kind == 0:
        a, b = rng.randint(2, 20), rng.randint(2, 20)
        return f"{name} has {a} {item}. {name} buys {b} more. How many {item} does {name} have now?", a + b, f"{a} + {b}"
    if kind == 1:
        a = rng.randint(10, 30)
        b = rng.randint(1, a - 1)
        return (f"{name} had {a} {item} and gave {b} of them to a friend. How many {item} does {name} have left?",
                a - b, f"{a} - {b}")
    if kind == 2:
        a, b = rng.randint(2, 9), rng.randint(2, 9)
        return f"There are {a} boxes with {b} {item} in each box. How many {item} are there in total?", a * b, f"{a} * {b}"
    if kind == 3:
        a, b = rng.randint(2, 9), rng.randint(2, 9)
        return (f"{name} shares {a * b} {item} equally among {a} friends. How many {item} does each friend get?",
                b, f"{a * b} / {a}")
    if kind == 4:
        a, b = rng.randint(5, 20), rng.randint(2, 10)
        c = rng.randint(1, a + b - 1)
        return (f"{name} has {a} {item}, buys {b} more and then gives away {c}. How many {item} does {name} have now?",
                a + b - c, f"{a} + {b} - {c}")
    a, b, c = rng.randint(2, 20), rng.randint(2, 9), rng.randint(2, 9)
    return f"What is {a} + {b} * {c}?", a + b * c, f"{a} + {b} * {c}"


def generate(n: int, seed: int, *, exclude: Iterable[str] = (), prefix: str = "arith") -> list[Problem]:
    """``n`` distinct problems from ``seed`` (deterministic), none with a prompt in ``exclude``."""
    rng, seen, out = random.Random(seed), set(exclude), []
    while len(out) < n:
        question, answer, expr = _question(rng)
        prompt = f"{question} {INSTRUCTION}"
        if prompt in seen:
            continue
        seen.add(prompt)
        out.append(Problem(f"{prefix}-{len(out):05d}", prompt, answer, expr))
    return out


def load(split: str = "train") -> list[Problem]:
    """The committed problems (``repo_jax/tasks/data/arithmetic_{split}.jsonl``; regenerate with
    ``python -m repo_jax.tasks.make_data``)."""
    path = resources.files("repo_jax.tasks") / "data" / f"arithmetic_{split}.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; splits are 'train' and 'eval' "
                                "(regenerate with python -m repo_jax.tasks.make_data)")
    return [Problem(**json.loads(line)) for line in path.read_text().splitlines() if line.strip()]


class ArithmeticTask:
    """Prompts, answers, the verifiable reward and the default annotator panel.

    The host loop uses: ``problems(split)`` / ``prompts(split)`` for prompts, ``reward(prompt,
    response)`` for ``eval/reward``, and ``panel(...)`` for the annotators of a round.
    """

    name = "arithmetic"

    def __init__(self, problems: Sequence[Problem] | None = None):
        self._splits: dict[str, list[Problem]] = {}
        self.answers: dict[str, int] = {}
        if problems is not None:
            self._splits["train"] = list(problems)
            self.answers.update((p.prompt, p.answer) for p in problems)

    def prompts_file(self, split: str = "train") -> str:
        """The committed prompt file of ``split`` (a prompt dataset for ``data.path``)."""
        path = resources.files("repo_jax.tasks") / "data" / f"arithmetic_{split}.jsonl"
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist; splits are 'train' and 'eval'")
        return str(path)

    def problems(self, split: str = "train") -> list[Problem]:
        if split not in self._splits:
            self._splits[split] = load(split)
            self.answers.update((p.prompt, p.answer) for p in self._splits[split])
        return self._splits[split]

    def prompts(self, split: str = "train") -> list[str]:
        return [p.prompt for p in self.problems(split)]

    def answer(self, prompt: str) -> int:
        if prompt not in self.answers:
            for split in ("train", "eval"):
                self.problems(split)
        if prompt not in self.answers:
            raise KeyError(f"the prompt {prompt[:80]!r} is not a problem of the arithmetic task")
        return self.answers[prompt]

    # ---- scorers (prompt, response) -> float --------------------------------------------------
    def correct(self) -> ExactNumber:
        return ExactNumber(self.answer)

    @staticmethod
    def format() -> RegexMatch:
        return RegexMatch(ANSWER_FORMAT)

    @staticmethod
    def length() -> LengthBudget:
        return LengthBudget(MAX_WORDS)

    def scorer(self) -> Weighted:
        return Weighted(((WEIGHTS["correct"], self.correct()), (WEIGHTS["format"], self.format()),
                         (WEIGHTS["length"], self.length())))

    def reward(self, prompt: str, response: str) -> float:
        """The task's reward in ``[0, MAX_REWARD]`` (see the module docstring)."""
        return self.scorer()(prompt, response)

    def scorers(self) -> dict:
        """The rule scorers an ``annotate.panel`` entry of kind ``rule`` names."""
        return {"correct": self.correct(), "format": self.format(), "length": self.length(), "reward": self.reward}

    def metrics(self, prompt: str, response: str) -> dict[str, float]:
        """``accuracy`` (the answer is right) and ``format`` (it ends with "Answer: <number>")."""
        return {"accuracy": self.correct()(prompt, response), "format": self.format()(prompt, response)}

    def panel(self, *, num_simulated: int = 5, bias_std: float = 0.5, scale: float = 4.0, temperature: float = 0.25,
              seed: int = 0, judge: LLMJudge | None = None) -> Panel:
        """The default panel: three rule annotators (correctness, format, length), a simulated
        noisy human panel of ``num_simulated`` raters judging by the task reward (Bradley-Terry
        with ``scale`` and position biases ~ ``N(0, bias_std^2)``), and optionally an LLM judge."""
        rules = [RuleAnnotator(self.correct(), temperature=temperature, name="rule/correct"),
                 RuleAnnotator(self.format(), temperature=temperature, name="rule/format"),
                 RuleAnnotator(self.length(), temperature=temperature, name="rule/length")]
        sims = simulated_panel(self.reward, num_simulated, bias_std=bias_std, scale=scale, seed=seed) if num_simulated else []
        return Panel(rules + sims + ([judge] if judge is not None else []))
