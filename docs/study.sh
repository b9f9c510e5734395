#!/usr/bin/env bash
# The small-scale study of docs/results.md, 3 seeds an arm on a 2-core CPU:
#   bash docs/study.sh offline    # LPO / LPO-abs / LiPO-lambda / DPO pair modes, from SmolLM2-135M-Instruct
#   bash docs/study.sh irepo      # iREPO vs Iter-DPO, Iter-IPO, soft-label DPO (+ iREPO with LoRA) at the default budget
#   bash docs/study.sh raters     # iREPO with H = 1, 3, 9 simulated raters
# Runs land in runs/study/<study>/<arm>_s<seed>; each study ends with python -m repo_jax.compare.
# SEEDS="0 1" and (online study) ARMS="irepo dpo" pick a subset, e.g. one stream per core:
#   SEEDS="0 1" taskset -c 0 bash docs/study.sh irepo & SEEDS=2 taskset -c 1 bash docs/study.sh irepo
set -euo pipefail
cd "$(dirname "$0")/.."
SEEDS=${SEEDS:-"0 1 2"}
OUT=${OUT:-runs/study}

offline() {
  python -m repo_jax.tasks.make_data --listwise 40 --out-dir "$OUT/data" > /dev/null
  local common=(--config configs/smollm2_lpo.yaml "data.path=$OUT/data/arithmetic_listwise_40.jsonl" eval.holdout=12
                data.num_epochs=0 train.steps=6 data.max_response_len=32 "data.length_buckets=[112]"
                eval.num_prompts=0 optim.lr=2.0e-5 export=false progress=false)
  local -A arms=(
    [lpo]="train.loss.name=lpo"
    [lpo_linear]="train.loss.name=lpo train.loss.weight=linear"
    [lpo_abs]="train.loss.name=lpo_abs"
    [lipo_lambda]="train.loss.name=lipo_lambda"
    [dpo_pw]="train.loss.name=dpo pairs.mode=pw"
    [dpo_1vsO]="train.loss.name=dpo pairs.mode=1vsO"
    [dpo_bvr]="train.loss.name=dpo pairs.mode=best_vs_random"
  )
  for seed in $SEEDS; do
    for arm in lpo lpo_linear lpo_abs lipo_lambda dpo_pw dpo_1vsO dpo_bvr; do
      # shellcheck disable=SC2086
      python -m repo_jax.lpo "${common[@]}" ${arms[$arm]} "run_dir=$OUT/offline/${arm}_s$seed" \
        "data.seed=$seed" "train.seed=$seed" "pairs.seed=$seed" | tail -n 3
    done
  done
  python -m repo_jax.compare "$OUT"/offline/* --by train.loss.name,train.loss.weight,pairs.mode \
    --metrics eval/loss,eval/kendall_tau,eval/pair_accuracy,eval/reward_margin --out "$OUT/offline_compare.png"
}

# The short online setting of the first study (2026-12-02); the raters study still uses it.
ONLINE=(loop.rounds=1 loop.prompts_per_round=16 loop.sample_batch=16 sample.max_new_tokens=40 train.seq_len=128
        eval.num_prompts=24 eval.kl_prompts=12 eval.max_new_tokens=40 loop.export=false loop.progress=false)

# The online study at the default config's budget (configs/default.yaml: 3 rounds x 64 prompts x 4
# samples, the 7-member panel, 128 held-out prompts, 32 of them with KL samples): the four losses
# with full fine-tuning, and iREPO with rank-16 LoRA adapters on the attention projections
# (alpha 32, lr 1e-4: adapters start at zero and need a larger rate). Only the loss (or the
# adapters) and the seed differ; train.seed and data.seed = s pick the round's prompts, the
# sampling and the simulated raters' noise.
irepo() {
  local -A arms=(
    [irepo]="train.loss.name=irepo"
    [dpo]="train.loss.name=dpo"
    [ipo]="train.loss.name=ipo"
    [soft_dpo]="train.loss.name=soft_dpo"
    [irepo_lora16]="train.loss.name=irepo model.lora.rank=16 model.lora.alpha=32 optim.lr=1.0e-4"
  )
  for seed in $SEEDS; do
    for arm in ${ARMS:-irepo dpo ipo soft_dpo irepo_lora16}; do
      # shellcheck disable=SC2086
      python -m repo_jax.irepo ${arms[$arm]} "run_dir=$OUT/online/${arm}_s$seed" "train.seed=$seed" \
        "data.seed=$seed" loop.export=false loop.progress=false | tail -n 6
    done
  done
  python -m repo_jax.compare "$OUT"/online/* --by train.loss.name,model.lora.rank --paired irepo/0 \
    --out "$OUT/online_compare.png"
}

raters() {
  for seed in $SEEDS; do
    for h in 1 3 9; do
      python -m repo_jax.irepo "${ONLINE[@]}" "annotate.panel=[{kind: simulated, count: $h}]" \
        "run_dir=$OUT/raters/h${h}_s$seed" "train.seed=$seed" "data.seed=$seed" | tail -n 4
    done
  done
  python -m repo_jax.compare "$OUT"/raters/* --by annotate.panel --out "$OUT/raters_compare.png"
}

studies=("$@")
[ ${#studies[@]} -gt 0 ] || studies=(offline irepo raters)
for study in "${studies[@]}"; do
  echo "== $study"
  SECONDS=0
  "$study"
  echo "== $study: $SECONDS s"
done
