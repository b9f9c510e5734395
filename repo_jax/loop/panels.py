"""The annotator panel of a run, built from ``annotate.panel`` (see ``AnnotatorSpec``).

Each entry becomes one member (``simulated`` becomes ``count`` members) with its weight; names
are unique and readable (``rule/correct``, ``simulated3``, ``judge/smollm2``), because the round
files and error messages use them. Judges and reward models load their own weights once.
"""

from __future__ import annotations

from collections.abc import Sequence

from repo_jax.annotators import LLMJudge, Panel, RuleAnnotator, simulated_panel
from repo_jax.annotators.custom import ScorerLoadError, as_scorer, load_object, registered_scorers
from repo_jax.config import ConfigError
from repo_jax.loop.config import AnnotatorSpec


def _rule(spec: AnnotatorSpec, task, where: str):
    """A scorer of the task, a registered one, or ``module:attribute`` (:mod:`repo_jax.annotators.custom`)."""
    scorers = task.scorers() if task is not None else {}
    registered = registered_scorers()
    label = f"{where} (rule {spec.name!r})"
    try:
        if ":" in spec.name:
            scorer = as_scorer(*load_object(spec.name))
        elif spec.name in scorers and spec.name in registered:
            raise ConfigError(f"{label}: the name is both a scorer of the task {task.name!r} and a registered "
                              "scorer; register it under another name")
        elif spec.name in scorers:
            scorer = scorers[spec.name]
        elif spec.name in registered:
            scorer = as_scorer(registered[spec.name], spec.name)
        else:
            what = f"the task {task.name!r}" if task is not None else "a run without a task"
            known = sorted({*scorers, *registered})
            raise ConfigError(f"{where}: rule {spec.name!r} is not a scorer of {what}; "
                              + (f"choose one of {known}, or " if known else "")
                              + "name a Python scorer as 'module:attribute'")
    except ScorerLoadError as e:
        raise ConfigError(f"{label}: {e}") from e.__cause__
    return [RuleAnnotator(scorer, temperature=spec.temperature, name=f"rule/{spec.name}", where=label)]


def _simulated(spec: AnnotatorSpec, task, where: str):
    if task is None:
        raise ConfigError(f"{where}: simulated raters judge by the task reward, and this run has no task")
    if spec.count < 1:
        raise ConfigError(f"{where}.count must be at least 1, got {spec.count}")
    members = simulated_panel(task.reward, spec.count, bias_std=spec.bias_std, scale=spec.scale, seed=spec.seed)
    for m in members:
        m.name = f"{spec.name or 'simulated'}{m.name.removeprefix('simulated')}"
    return members


def _judge(spec: AnnotatorSpec, task, where: str):
    from repo_jax import models
    from repo_jax.assets import load_tokenizer, resolve_model_path

    if not spec.model:
        raise ConfigError(f"{where}.model is empty: set it to an HF folder, a .gguf file or 'smollm2'")
    path = resolve_model_path(spec.model)
    import jax.numpy as jnp

    judge = LLMJudge(models.from_pretrained(str(path), dtype=jnp.dtype(spec.dtype)), load_tokenizer(path), max_response_tokens=spec.max_response_tokens,
                     batch_size=spec.batch_size, name=spec.name or f"judge/{_stem(spec.model)}")
    return [judge]


def _hf_reward_model(spec: AnnotatorSpec, task, where: str):
    from repo_jax.annotators import HFRewardModel

    if not spec.model:
        raise ConfigError(f"{where}.model is empty: set it to a transformers reward-model folder")
    return [HFRewardModel(spec.model, temperature=spec.temperature, batch_size=spec.batch_size,
                          name=spec.name or f"reward_model/{_stem(spec.model)}")]


def _served(spec: AnnotatorSpec, task, where: str, cache_dir, progress: bool = False):
    from repo_jax.annotators.served import SCORE_TEMPLATE, Endpoint, ServedJudge, ServedScore, cache_file
    from repo_jax.annotators.judge import DEFAULT_TEMPLATE

    if not spec.model:
        raise ConfigError(f"{where}.model is empty: the model name the server at base_url serves")
    name = spec.name or f"{spec.kind}/{_stem(spec.model)}"
    cache = cache_file(cache_dir, name) if cache_dir else None
    try:
        endpoint = Endpoint(name=name, base_url=spec.base_url, model=spec.model, api_key_env=spec.api_key_env,
                            timeout=spec.timeout, max_retries=spec.max_retries, retry_budget_s=spec.retry_budget_s,
                            max_concurrency=spec.max_concurrency, max_requests=spec.max_requests,
                            max_requests_per_minute=spec.max_requests_per_minute,
                            max_tokens_per_minute=spec.max_tokens_per_minute, cache_path=cache, show_progress=progress)
    except ValueError as e:
        raise ConfigError(f"{where}: {e}") from None
    chat = spec.endpoint == "chat"
    if spec.kind == "served_score":
        if len(spec.score_range) != 2 or spec.score_range[0] >= spec.score_range[1]:
            raise ConfigError(f"{where}.score_range must be [low, high] with low < high, got {list(spec.score_range)}")
        return [ServedScore(endpoint, chat=chat, template=spec.template or SCORE_TEMPLATE, low=spec.score_range[0],
                            high=spec.score_range[1], temperature=spec.temperature, name=name)]
    tokenizer = None
    if spec.tokenizer:
        from repo_jax.assets import load_tokenizer, resolve_model_path

        tokenizer = load_tokenizer(resolve_model_path(spec.tokenizer))
    return [ServedJudge(endpoint, chat=chat, tokenizer=tokenizer, template=spec.template or DEFAULT_TEMPLATE,
                        max_response_tokens=spec.max_response_tokens, name=name)]


def _stem(path: str) -> str:
    return str(path).rstrip("/").rsplit("/", 1)[-1].removesuffix(".gguf")


BUILDERS = {"rule": _rule, "simulated": _simulated, "judge": _judge, "hf_reward_model": _hf_reward_model}
SERVED = ("served_judge", "served_score")  # built by _served (they also take the cache folder)


def build_panel(specs: Sequence[AnnotatorSpec], task, cache_dir=None, progress: bool = False) -> Panel:
    """The panel of ``annotate.panel`` for ``task`` (an embedded task, or None); served members
    cache their answers in ``cache_dir`` (the run's ``annotations/``) and show a requests bar
    when ``progress``."""
    members, weights = [], []
    for n, spec in enumerate(specs):
        where = f"annotate.panel[{n}]"
        if spec.kind not in BUILDERS and spec.kind not in SERVED:
            raise ConfigError(f"{where}.kind={spec.kind!r} is not an annotator kind; choose one of "
                              f"{sorted([*BUILDERS, *SERVED])}")
        if spec.weight < 0:
            raise ConfigError(f"{where}.weight must be >= 0, got {spec.weight}")
        new = (_served(spec, task, where, cache_dir, progress) if spec.kind in SERVED
               else BUILDERS[spec.kind](spec, task, where))
        members += new
        weights += [spec.weight] * len(new)
    names = [m.name for m in members]
    dup = sorted({x for x in names if names.count(x) > 1})
    if dup:
        raise ConfigError(f"annotate.panel has two members named {dup[0]!r}; give one a distinct name")
    return Panel(members, weights)
