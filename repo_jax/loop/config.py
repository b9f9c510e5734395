"""``IrepoConfig``: the iREPO host loop's config, the training ``RunConfig`` plus its own sections.

Sections added to ``RunConfig`` (``model``, ``data``, ``mesh``, ``train``, ``optim``,
``checkpoint``):

* ``task``      the embedded task whose prompts, reward and rules the loop uses (``arithmetic``,
                ``toy_digits``), or ``""`` for a prompt dataset in ``data.path`` without a task;
* ``loop``      rounds, prompts per round, responses per prompt, epochs, pair selection,
                optimiser reset or carry between rounds;
* ``sample``    the sampling policy of a round (temperature, top-p, top-k, max new tokens);
* ``annotate``  the panel (rules, simulated raters, LLM judges, reward models, each weighted)
                and the Zermelo pseudo-count;
* ``eval``      held-out prompts, greedy answers, KL samples.

What the loop derives instead of reading twice: the prompt pipeline's batch size is
``loop.prompts_per_round`` (``data.batch_size`` is not read), and the reference pass and the
train step see ``train.batch_size`` pairs (or lists) of ``train.seq_len`` tokens per step;
:func:`check` says, in one sentence each, what does not fit.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from repo_jax.config import ConfigError
from repo_jax.data.config import DataConfig
from repo_jax.training.config import RunConfig
from repo_jax.training.objectives import LOSSES


@dataclasses.dataclass(frozen=True)
class LoopConfig:
    """``rounds`` iREPO rounds of ``prompts_per_round`` prompts x ``num_responses`` responses.

    rounds: iREPO rounds to run (each samples, annotates, trains and evaluates); a finished or
      interrupted run resumed with a larger ``rounds`` goes on to it.
    prompts_per_round: prompts drawn from the prompt data each round (the loop's pipeline batch;
      ``data.batch_size`` is not read).
    num_responses: responses sampled per prompt (at least 2); the panel judges every pair of them.
    pairs: which pairs of a prompt's responses a round trains on: ``best_vs_worst`` (the paper:
      strongest vs weakest response by Zermelo strength) or ``all_pairs`` (every ``i < j``);
      pairwise losses only (listwise losses take all responses).
    list_scores: the scores of an online LPO / InfoNCA list: ``win_rate`` (10 x each response's
      mean ``p_hat`` against the others, on UltraFeedback's 0-10 scale) or ``strength`` (the
      Zermelo strength ``w``, geometric mean 1).
    epochs: passes over the round's pairs (reshuffled each epoch, seeded).
    group_by_length: each epoch's batches hold examples of similar length (the shuffled pairs
      sorted by their row's length, cut into batches, the batches shuffled; seeded), so a batch
      pads less to its length bucket; ``false``: plain shuffled batches.
    optimizer: the optimiser between rounds: ``reset`` (fresh AdamW moments and schedule every
      round: ``optim.total_steps`` counts one round's steps) or ``carry`` (one optimiser over the
      whole run).
    sample_batch: decode slots of the sampler: rows (prompt x response) decoded together. A
      round's prompts (and the eval's) go to one sampler call; rows that finish are refilled
      with the prompts still queued (``sampling.sample``'s ``slots``). Rounded up to a multiple
      of the mesh's batch devices and of the responses per prompt.
    sample_waves: with served members in the panel (``served_judge`` / ``served_score``), the
      round's prompts are sampled in this many calls; while one wave decodes, the previous
      waves' responses are already being asked of the judge machines (their answers cached),
      so a round costs about max(sample, annotate) + train instead of their sum. The tokens,
      judgements and round files are those of one call (each wave's random keys continue the
      row numbering). 1: sample everything, then annotate. Without served members: one call.
      Fewer waves when a wave would not fill the ``sample_batch`` decode slots.
    progress: progress bars on stderr.
    reference: how the round's reference log-probs (``pi_ref = pi_{t-1}``, the policy that
      sampled the round) are obtained: ``forward`` (a forward pass over the round's train rows
      before any update, in the train step's shapes) or ``sampler`` (the log-probs the sampler
      computed under the unmodified model while drawing them, summed per response: no extra
      pass; equal to ``forward`` up to float rounding of the KV-cache decode, ~1e-5 per token in
      float32). Saved in the round file (``responses[].logp``).
    export: at the end, write the final policy to ``run_dir/policy`` as an HF folder
      (``config.json``, safetensors, the tokenizer when it has ``save_pretrained``), which
      ``transformers`` and every ``--model`` of this project load (one process only); with
      LoRA the adapters are merged into it, and ``run_dir/adapter`` holds them as a PEFT folder.
    lora_merge (``model.lora.rank`` > 0): ``never`` (one set of adapters trained over the whole
      run on the loaded base; the checkpoints hold the adapters, not the base) or
      ``every_round`` (at the start of each round after the first the adapters are folded into
      the base, ``W += (alpha / rank) A B`` in the base's dtype, and fresh adapters with fresh
      AdamW moments start: each round's update is low-rank, the run's is not; the checkpoints
      then hold the base too). Either way the round's reference is its starting policy, and
      the sampler decodes a copy with the adapters merged in once per round.
    """

    rounds: int = 3
    prompts_per_round: int = 32
    num_responses: int = 4
    epochs: int = 1
    group_by_length: bool = True
    pairs: Literal["best_vs_worst", "all_pairs"] = "best_vs_worst"
    list_scores: Literal["win_rate", "strength"] = "win_rate"
    optimizer: Literal["reset", "carry"] = "reset"
    sample_batch: int = 64
    sample_waves: int = 4
    progress: bool = True
    reference: Literal["forward", "sampler"] = "forward"
    export: bool = True
    lora_merge: Literal["never", "every_round"] = "never"


@dataclasses.dataclass(frozen=True)
class SampleConfig:
    """The round's sampling policy (``temperature > 0``; top-k / top-p optional).

    temperature: the sampling temperature of the round's responses (> 0: they are sampled, not
      greedy).
    top_p: nucleus sampling: only the most likely tokens whose probabilities add up to ``top_p``
      are kept (``null`` = off).
    top_k: only the ``top_k`` most likely tokens are kept (``null`` = off).
    max_new_tokens: the longest response, in tokens (also the greedy evaluation answers' when
      ``eval.max_new_tokens`` is 0).
    """

    temperature: float = 0.8
    top_p: float | None = None
    top_k: int | None = None
    max_new_tokens: int = 64


@dataclasses.dataclass(frozen=True)
class AnnotatorSpec:
    """One member (or, for ``simulated``, ``count`` members) of the panel. Each kind reads only
    its own keys (named in parentheses below).

    kind: ``rule`` (a scorer of the task, named by ``name``), ``simulated`` (``count`` noisy
      raters judging by the task reward), ``judge`` (our port of the causal LM at ``model``, read
      from the logits of " A" vs " B", both orders), ``hf_reward_model`` (a transformers
      sequence-classification folder at ``model``; needs torch), ``served_judge`` /
      ``served_score`` (``repo_jax.annotators.served``: the model ``model`` served at
      ``base_url`` over the OpenAI API, judging pairs or scoring each response).
    name: for ``rule`` the task's scorer (e.g. ``correct``, ``format``, ``length``, ``reward``),
      or your own Python scorer as ``module:attribute`` (a function ``(prompt, response) ->
      float``, a callable object, a class built with no arguments, or a name the module
      registered with ``repo_jax.annotators.register_scorer``; the module is imported from the
      working directory or ``PYTHONPATH``); for the other kinds the member's name in the round files and messages (``""`` = from the
      kind and ``model``; ``simulated`` members get it with their number appended).
    weight: multiplies the member's judgements in the counts (``n_ij + n_ji`` = the total weight).
    temperature (``rule``, ``hf_reward_model``, ``served_score``): the Bradley-Terry temperature
      that turns two scores into a preference, ``p_ij = sigmoid((s_i - s_j) / temperature)``.
    count (``simulated``): how many simulated raters this entry adds.
    bias_std (``simulated``): each rater's position bias is drawn from ``N(0, bias_std^2)``.
    scale (``simulated``): the raters' Bradley-Terry scale on the task reward,
      ``p = sigmoid(scale * (r_a - r_b) + bias)``.
    seed (``simulated``): draws the raters' biases and votes.
    model (``judge``, ``hf_reward_model``, ``served_judge``, ``served_score``): for ``judge`` an
      HF folder, a ``.gguf`` or ``smollm2``; for ``hf_reward_model`` a transformers
      sequence-classification folder; for the served kinds the model name the server serves.
    dtype (``judge``): the judge model's dtype.
    max_response_tokens (``judge``, ``served_judge``): each response is cut to this many tokens
      inside the judge prompt.
    batch_size (``judge``, ``hf_reward_model``): rows per forward pass of the judge or reward
      model.
    base_url (served kinds): the OpenAI-compatible server's URL.
    api_key_env (served kinds): the name of the environment variable holding the API key (the
      key itself is never written anywhere).
    endpoint (served kinds): ``chat`` (the template as a user message) or ``completions`` (with
      ``tokenizer``: exactly the prompt text the in-process judge feeds its model).
    tokenizer (``served_judge``): with ``endpoint: completions``, the tokenizer (an HF folder, a
      ``.gguf`` or ``smollm2``) whose chat template renders the in-process judge's prompt.
    template (served kinds): the prompt template; ``""`` = the shipped default.
    max_concurrency (served kinds): requests in flight at once.
    timeout (served kinds): seconds one request may take.
    max_retries / retry_budget_s (served kinds): a failed request (429, 5xx, a dropped
      connection) is retried after the server's ``Retry-After`` or an exponential backoff with
      jitter, up to ``max_retries`` times and ``retry_budget_s`` seconds of waiting.
    max_requests_per_minute / max_tokens_per_minute (served kinds): client-side rate limits
      (tokens: prompt + completion, estimated; 0 = none).
    max_requests (served kinds): the most requests per round (0 = no budget); a round that would
      pass it is an error.
    score_range (``served_score``): ``[low, high]``, the range of the scores the model is asked to
      give.
    """

    kind: Literal["rule", "simulated", "judge", "hf_reward_model", "served_judge", "served_score"] = "rule"
    name: str = ""
    weight: float = 1.0
    temperature: float = 0.25
    count: int = 1
    bias_std: float = 0.5
    scale: float = 4.0
    seed: int = 0
    model: str = ""
    dtype: Literal["float32", "bfloat16"] = "float32"
    max_response_tokens: int = 256
    batch_size: int = 16
    base_url: str = ""
    api_key_env: str = ""
    endpoint: Literal["chat", "completions"] = "chat"
    tokenizer: str = ""
    template: str = ""
    max_concurrency: int = 4
    timeout: float = 60.0
    max_retries: int = 8
    retry_budget_s: float = 120.0
    max_requests_per_minute: float = 0.0
    max_tokens_per_minute: float = 0.0
    max_requests: int = 0
    score_range: tuple[int, ...] = (1, 10)


DEFAULT_PANEL = (
    AnnotatorSpec(kind="rule", name="correct"),
    AnnotatorSpec(kind="rule", name="format"),
    AnnotatorSpec(kind="rule", name="length"),
    AnnotatorSpec(kind="simulated", count=5),
)


@dataclasses.dataclass(frozen=True)
class AnnotateConfig:
    """The panel and the Zermelo fit.

    panel: the annotators, a list of members with the keys of ``annotate.panel[]``; every
      member judges every pair of a prompt's responses, weighted by its ``weight``.
    pseudo_count: added to every pairwise count before the Zermelo (Bradley-Terry) fit
      (ALGORITHMS.md): a response that never wins keeps a strength above 0 and no ``p_hat`` is
      exactly 0 or 1.
    """

    panel: tuple[AnnotatorSpec, ...] = DEFAULT_PANEL
    pseudo_count: float = 0.5


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """Held-out evaluation every iteration (iteration 0 = the starting policy).

    num_prompts: held-out prompts answered greedily at each evaluation: the first ``num_prompts``
      of the task's eval split (or of ``data_path``).
    max_new_tokens: the longest greedy answer, in tokens (0 = ``sample.max_new_tokens``).
    kl_samples: responses per prompt sampled at temperature 1 from ``pi_t`` for
      ``eval/kl = mean log pi_t(y) - log pi_0(y)`` (0 disables; it keeps a copy of ``pi_0``).
    kl_prompts: the first ``kl_prompts`` held-out prompts get KL samples (0 = all of them).
    data_path: the held-out prompts when there is no task (a file or hub name, like ``data.path``).
    data_split: the hub split of ``data_path``; ``""`` = ``data.split``.
    """

    num_prompts: int = 64
    max_new_tokens: int = 0
    kl_samples: int = 1
    kl_prompts: int = 0
    data_path: str = ""
    data_split: str = ""


@dataclasses.dataclass(frozen=True)
class IrepoConfig(RunConfig):
    """The iREPO loop's config (see the module docstring).

    task: the embedded task whose prompts, reward and rules the loop uses (``arithmetic``,
      ``toy_digits``), your own as ``module:Class`` (``prompts_file``, ``prompts``, ``reward``,
      ``scorers``, ``metrics``, as the embedded tasks have them), or ``""`` for a prompt dataset
      in ``data.path`` without a task (then ``eval.data_path`` holds the held-out prompts).
    """

    task: str = "arithmetic"
    loop: LoopConfig = LoopConfig()
    sample: SampleConfig = SampleConfig()
    annotate: AnnotateConfig = AnnotateConfig()
    eval: EvalConfig = EvalConfig()

    @property
    def eval_max_new_tokens(self) -> int:
        return self.eval.max_new_tokens or self.sample.max_new_tokens


def check(cfg: IrepoConfig) -> None:
    """Raises ``ConfigError`` naming the key when the sections do not fit together."""
    loop, train = cfg.loop, cfg.train
    if train.loss.name == "sft":
        raise ConfigError("train.loss.name=sft is python -m repo_jax.sft's loss, not a preference loss")
    if train.loss.name not in LOSSES:
        valid = sorted(n for n in LOSSES if n != "sft")
        raise ConfigError(f"train.loss.name={train.loss.name!r} is not a loss; choose one of {valid}")
    if (loop.rounds < 0 or loop.prompts_per_round < 1 or loop.epochs < 1 or loop.sample_batch < 1
            or loop.sample_waves < 1):
        raise ConfigError("loop.rounds must be >= 0 and loop.prompts_per_round, loop.epochs, loop.sample_batch, "
                          "loop.sample_waves >= 1")
    if loop.num_responses < 2:
        raise ConfigError(f"loop.num_responses must be at least 2 (pairs need two responses), got {loop.num_responses}")
    if cfg.sample.temperature <= 0:
        raise ConfigError("sample.temperature must be > 0: the round's responses are sampled, not greedy")
    if cfg.data.batch_size != DataConfig().batch_size and cfg.data.batch_size != loop.prompts_per_round:
        raise ConfigError("data.batch_size is not read by the iREPO loop (it draws loop.prompts_per_round prompts "
                          "a round); remove it")
    if train.layout == "shared":  # a row holds the prompt and all of an example's responses
        longest = cfg.data.max_prompt_len + max(train.num_responses * cfg.sample.max_new_tokens,
                                                cfg.eval.kl_samples * cfg.eval_max_new_tokens)
        what = "data.max_prompt_len + max(train.num_responses x sample.max_new_tokens, eval.kl_samples x eval max new tokens)"
    else:
        longest = cfg.data.max_prompt_len + max(cfg.sample.max_new_tokens, cfg.eval_max_new_tokens)
        what = "data.max_prompt_len + max new tokens"
    if train.seq_len < longest:
        raise ConfigError(f"train.seq_len={train.seq_len} is shorter than {what} = {longest} "
                          f"(train.layout={train.layout}); raise train.seq_len")
    listwise = not LOSSES[train.loss.name].pairwise
    if listwise and train.num_responses != loop.num_responses:
        raise ConfigError(f"train.num_responses={train.num_responses} must equal loop.num_responses="
                          f"{loop.num_responses} for the listwise loss {train.loss.name!r}")
    if not listwise and train.num_responses != 2:
        raise ConfigError(f"train.num_responses must be 2 for the pairwise loss {train.loss.name!r}")
    if loop.lora_merge != "never" and not cfg.model.lora.rank:
        raise ConfigError("loop.lora_merge is only read with LoRA (model.lora.rank > 0); remove it")
    if train.reference != "batch":
        raise ConfigError("train.reference must be 'batch': the loop computes reference log-probs once a round")
    if not cfg.annotate.panel:
        raise ConfigError("annotate.panel is empty: the loop needs at least one annotator")
    if not cfg.task and not cfg.eval.data_path:
        raise ConfigError("task is empty: set eval.data_path to the held-out prompts")


def items_per_round(cfg: IrepoConfig) -> int:
    """Training examples a round yields at most: a list per prompt (listwise losses), else the
    selected pairs (``best_vs_worst``: one a prompt; ``all_pairs``: ``K (K - 1) / 2``). Hard-label
    losses drop tied pairs, so a round may yield fewer."""
    p, k = cfg.loop.prompts_per_round, cfg.loop.num_responses
    if not LOSSES[cfg.train.loss.name].pairwise or cfg.loop.pairs == "best_vs_worst":
        return p
    return p * k * (k - 1) // 2


def steps_per_round(cfg: IrepoConfig) -> int:
    """Optimiser steps of a round: ``loop.epochs x ceil(items_per_round / train.batch_size)``."""
    return cfg.loop.epochs * -(-items_per_round(cfg) // cfg.train.batch_size)


def schedule_steps(cfg: IrepoConfig) -> tuple[int, str]:
    """The optimiser steps one schedule spans (the run's with ``loop.optimizer=carry``, one
    round's with ``reset``) and, in words, where the number comes from."""
    per, items = steps_per_round(cfg), items_per_round(cfg)
    what = (f"{items} {'lists' if not LOSSES[cfg.train.loss.name].pairwise else 'pairs'} a round / "
            f"train.batch_size={cfg.train.batch_size} x loop.epochs={cfg.loop.epochs} = {per} a round")
    if cfg.loop.optimizer == "reset":
        return per, what + " (loop.optimizer=reset: one schedule a round)"
    return per * max(cfg.loop.rounds, 1), what + f" x loop.rounds={cfg.loop.rounds}"


def unread_keys(cfg: IrepoConfig) -> list[str]:
    """Keys a loop config sets that the loop does not read, one sentence each."""
    out = []
    if cfg.train.steps:
        out.append(f"train.steps={cfg.train.steps} is not read by the iREPO loop (its steps follow from loop.rounds, "
                   "loop.prompts_per_round, loop.epochs and train.batch_size); remove it")
    d = DataConfig()
    for key in ("max_response_len", "num_responses"):
        if getattr(cfg.data, key) != getattr(d, key):
            out.append(f"data.{key} is read by the offline programs only (the loop samples sample.max_new_tokens "
                       "up to train.seq_len); remove it")
    return out
