"""Annotators: judge the K responses of each prompt and return pairwise preferences.

* :mod:`~repo_jax.annotators.base`          the ``Annotator`` protocol, score- and pair-based
  bases with per-round caches, Bradley-Terry probabilities from scores
* :mod:`~repo_jax.annotators.rules`         verifiable scorers (numeric answer, regex, length)
* :mod:`~repo_jax.annotators.custom`        your own scorers: ``module:attribute`` rule names,
  ``@register_scorer``
* :mod:`~repo_jax.annotators.reward_model`  JAX model + score head; transformers reward models
* :mod:`~repo_jax.annotators.judge`         LLM judge read from the logits of "A" vs "B"
* :mod:`~repo_jax.annotators.panel`         panels -> count matrices; simulated noisy raters

Typical round (the iREPO host loop)::

    panel.reset()
    counts_PxKxK = panel.counts(prompts_P, responses_PxK)
    strengths_PxK = repo_jax.preferences.zermelo(counts_PxKxK, pseudo_count=0.5)
"""

from repo_jax.annotators.base import Annotator, PairwiseAnnotator, ScoreAnnotator, bt_probs
from repo_jax.annotators.custom import ScorerLoadError, register_scorer
from repo_jax.annotators.judge import DEFAULT_TEMPLATE, LLMJudge
from repo_jax.annotators.panel import AnnotatorError, Panel, SimulatedAnnotator, simulated_panel
from repo_jax.annotators.reward_model import HFRewardModel, JaxRewardModel, ScoreHead
from repo_jax.annotators.rules import ExactNumber, LengthBudget, RegexMatch, RuleAnnotator, Weighted, extract_number

__all__ = [
    "DEFAULT_TEMPLATE", "Annotator", "AnnotatorError", "ExactNumber", "HFRewardModel", "JaxRewardModel", "LLMJudge", "LengthBudget",
    "PairwiseAnnotator", "Panel", "RegexMatch", "RuleAnnotator", "ScoreAnnotator", "ScoreHead", "ScorerLoadError",
    "SimulatedAnnotator", "Weighted", "bt_probs", "extract_number", "register_scorer", "simulated_panel",
]
