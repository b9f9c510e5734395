"""A toy task a tiny random model can learn in a few rounds: answer with digits.

The tiny configs (``configs/tiny.yaml``, what the tests run) use a random-init model with the
byte tokenizer (:mod:`repo_jax.data.byte_tokenizer`): its samples are near-uniform bytes, about
4% of them ASCII digits. The reward is the fraction of the response's characters that are
digits, so responses of one prompt differ in reward from the start, and a policy that learns
to prefer digit bytes raises it. ``accuracy`` is the fraction of answers that are non-empty and
all digits. Prompts are short random words (``toy_digits_{train,eval}.jsonl``).
"""

from __future__ import annotations

import json
import random
from importlib import resources

from repo_jax.annotators import LengthBudget

LETTERS = "abcdefghijklmnopqrstuvwxyz"


def digit_fraction(prompt: str, response: str) -> float:
    """Share of the response's characters that are ASCII digits (0 for an empty response)."""
    return sum(c in "0123456789" for c in response) / len(response) if response else 0.0


def all_digits(prompt: str, response: str) -> float:
    return float(bool(response) and all(c in "0123456789" for c in response))


def make_prompts(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [{"id": f"toy-{i:05d}", "prompt": "Digits for " + "".join(rng.choice(LETTERS) for _ in range(rng.randint(3, 8)))}
            for i in range(n)]


class ToyDigitsTask:
    name = "toy_digits"

    def prompts_file(self, split: str) -> str:
        path = resources.files("repo_jax.tasks") / "data" / f"toy_digits_{split}.jsonl"
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist; splits are 'train' and 'eval'")
        return str(path)

    def prompts(self, split: str = "train") -> list[str]:
        with open(self.prompts_file(split)) as f:
            return [json.loads(line)["prompt"] for line in f if line.strip()]

    def scorers(self) -> dict:
        return {"digits": digit_fraction, "all_digits": all_digits, "length": LengthBudget(4), "reward": self.reward}

    def reward(self, prompt: str, response: str) -> float:
        return digit_fraction(prompt, response)

    def metrics(self, prompt: str, response: str) -> dict[str, float]:
        return {"accuracy": all_digits(prompt, response)}
