"""What a loop run builds once and where it stands: ``Progress`` and ``Run``.

``Run`` holds the model's train state and programs (train step, reference pass, optimiser
reset), the prompt iterator, the held-out prompts, the panel and the Orbax checkpointer;
``Progress`` is the JSON ``loop`` item of every checkpoint (iteration, phase, metric records,
iteration 0's answers, and inside a round the train position, reference log-probs and the
prompt iterator's position before the round). See :mod:`repo_jax.loop.runner`; the run
folder, checkpoints and batch placement are :mod:`repo_jax.runs`'.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from repo_jax import config as config_lib
from repo_jax import sampling
from repo_jax import sharding as shd
from repo_jax.data import DataConfig, make_pipeline
from repo_jax.data.tokenize import Formatter
from repo_jax.loop.config import IrepoConfig, check, schedule_steps, unread_keys
from repo_jax.loop.panels import build_panel
from repo_jax.runs import RunBase, check_start, load_tokenizer_for, prepare_run_dir, run_mesh
from repo_jax.training import optim
from repo_jax.training import state as st
from repo_jax.training import step as sp
from repo_jax.training.checkpoint import Checkpointer

RESUMABLE_KEYS = ("loop.rounds", "loop.progress")


# ------------------------------------------------------------------------------ the run


@dataclasses.dataclass
class Progress:
    """Where the run stands (the ``loop`` item of a checkpoint)."""

    iteration: int = -1          # the last evaluated policy (-1: not even pi_0 yet)
    phase: str = "done"          # "done" (iteration complete) or "train" (inside round iteration + 1)
    records: list = dataclasses.field(default_factory=list)
    baseline_answers: list = dataclasses.field(default_factory=list)
    saves: int = 0
    train_pos: int = 0
    ref_logps: list = dataclasses.field(default_factory=list)
    train_sums: dict = dataclasses.field(default_factory=dict)
    times: dict = dataclasses.field(default_factory=dict)
    global_steps: int = 0
    data_state: dict = dataclasses.field(default_factory=dict)  # prompt iterator before this phase's round


class Run(RunBase):
    """Everything built once per run (model, optimiser, programs, data, panel)."""

    progress_cls = Progress

    def __init__(self, cfg: IrepoConfig, log=print):
        from repo_jax.tasks import get_task

        check(cfg)
        self.mesh = run_mesh(cfg)
        steps, what = schedule_steps(cfg)  # before anything is written, sampled or loaded
        resolved = check_start(cfg, self.mesh, run_steps=steps, what=what, unread=unread_keys(cfg), log=log)
        self.main = jax.process_index() == 0
        self.show_progress = cfg.loop.progress
        folder = prepare_run_dir(cfg, RESUMABLE_KEYS)  # the config as given (optim.total_steps: 0 stays 0)
        self.run_dir, self.mirror = folder.path, folder.mirror
        self.cfg = cfg = resolved
        self.log = log
        self.task = get_task(cfg.task) if cfg.task else None
        self.tokenizer = load_tokenizer_for(cfg.model)
        self.formatter = Formatter(self.tokenizer, chat_template=cfg.data.chat_template)
        self.eos_id = self.tokenizer.eos_token_id
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.panel = build_panel(cfg.annotate.panel, self.task, cache_dir=self.run_dir / "annotations",
                                 progress=cfg.loop.progress and self.main)

        model = self._start_model()
        self.tx = optim.make_optimizer(cfg.optim)
        self.graphdef, state, self.shardings = st.state_from_model(model, self.tx, cfg.train, self.mesh,
                                                                     tolerance=cfg.mesh.sharding_tolerance)
        del model
        self.abstract = jax.eval_shape(lambda s: s, state)
        self.state = state
        self.record_base(cfg.model.weights)
        fold = cfg.loop.lora_merge == "every_round"
        # pi_0 for the KL estimate: (params, frozen); a LoRA base is shared unless folding replaces it
        self.pi0 = ((jax.tree.map(jnp.copy, state.params),
                     jax.tree.map(jnp.copy, state.frozen) if fold else state.frozen) if cfg.eval.kl_samples else None)
        self.train_step = sp.make_train_step(self.graphdef, cfg, self.mesh, self.shardings)
        self.ref_logprobs = sp.make_reference_logprobs(self.graphdef, cfg.train, self.mesh, self.shardings.params,
                                                       frozen_shardings=self.shardings.frozen)
        tx, sh, graphdef = self.tx, self.shardings, self.graphdef
        own = sh.replace(frozen=None)  # the LoRA base is never donated: pi0 and the sampler share it
        self._reset_opt = jax.jit(lambda s: s.replace(opt_state=tx.init(s.params)), in_shardings=(own,),
                                  out_shardings=own, donate_argnums=0)
        self._fold = jax.jit(lambda s, key: st.fold_adapters(graphdef, s, tx, jax.random.wrap_key_data(key)),
                             in_shardings=(sh, None), out_shardings=sh, donate_argnums=0) if fold else None

        data = self._prompt_data_config()
        self.prompts = make_pipeline(data, self.tokenizer, kind="prompt", run_dir=self.run_dir if self.main else None,
                                     log=log if self.main else None)
        self.iterator = self.prompts.iterator()
        self.eval_texts, self.eval_ids = self._eval_prompts()
        self.checkpointer = Checkpointer(cfg.checkpoint_dir, dataclasses.replace(cfg.checkpoint, every_steps=1),
                                         save_base=fold)
        self.progress = Progress()
        self.policy = None  # the sampling copy of the current policy (decoding layout)

    # ---- construction helpers
    def _start_model(self):
        m = self.cfg.model
        if m.weights:
            return st.pretrained_model(m, self.mesh, seed=self.cfg.train.seed)
        return st.model_factory(m, seed=self.cfg.train.seed)()

    def _prompt_data_config(self) -> DataConfig:
        d = self.cfg.data
        path = d.path or (self.task.prompts_file("train") if self.task else "")
        if not path:
            raise config_lib.ConfigError("data.path is empty and there is no task to take prompts from")
        return dataclasses.replace(d, path=path, batch_size=self.cfg.loop.prompts_per_round, shard_index=0,
                                   shard_count=1)

    def _eval_prompts(self):
        cfg = self.cfg
        if cfg.eval.data_path:
            from repo_jax.data import load_examples
            from repo_jax.data.tokenize import plain_prompt

            d = dataclasses.replace(cfg.data, path=cfg.eval.data_path, split=cfg.eval.data_split or cfg.data.split,
                                    schema="auto")
            examples, _ = load_examples(d, tokenizer=self.tokenizer, log=None)
            convs = [ex["prompt"] for ex in examples[:cfg.eval.num_prompts]]
            texts = [plain_prompt(c) for c in convs]
        else:
            texts = self.task.prompts("eval")[:cfg.eval.num_prompts]
            convs = [[{"role": "user", "content": t}] for t in texts]
        ids = [self.formatter.prompt_ids(c)[-cfg.data.max_prompt_len:] for c in convs]
        return texts, ids

    # ---- small utilities
    def decode(self, ids) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True).strip()

    def make_policy(self):
        """The current parameters in the sampling layout (one copy per round, see the sampler;
        LoRA adapters merged into it, so decoding costs what the base costs)."""
        return sampling.sampling_copy(st.model_of(self.graphdef, self.state), self.mesh)

    def reset_optimizer(self) -> None:
        """Fresh AdamW moments (``loop.optimizer=reset``)."""
        frozen = self.state.frozen
        self.state = self._reset_opt(self.state.replace(frozen=None)).replace(frozen=frozen)

    def fold_adapters(self, t: int) -> None:
        """``loop.lora_merge=every_round``: round ``t``'s adapters start fresh on a base that holds
        the previous rounds' (``training.state.fold_adapters``)."""
        key = jax.random.key_data(jax.random.key(self.seed(t, 4)))
        self.state = self._fold(self.state, key)

    def sampler_mesh(self):
        return self.mesh if self.mesh.size > 1 else None

    def seed(self, *parts: int) -> int:
        return int(np.random.SeedSequence([self.cfg.train.seed, *parts]).generate_state(1)[0] % (2**31 - 64))
