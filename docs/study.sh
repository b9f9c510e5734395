#!/usr/bin/env bash
# The small-scale study of docs/results.md, 3 seeds an arm on a 2-core CPU:
#   bash docs/study.sh offline    # LPO / LPO-abs / LiPO-lambda / DPO pair modes, from SmolLM2-135M-Instruct
#   bash docs/study.sh irepo      # iREPO vs Iter-DPO, Iter-IPO, soft-label DPO at equal budget
#   bash docs/study.sh raters     # iREPO with H = 1, 3, 9 simulated raters
# Runs land in runs/study/<study>/<arm>_s<seed>; each study ends with python -m repo_jax.compare.
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

ONLINE=(loop.rounds=1 loop.prompts_per_round=16 loop.sample_batch=16 sample.max_new_tokens=40 train.seq_len=128
        eval.num_prompts=24 eval.kl_prompts=12 eval.max_new_tokens=40 loop.export=false loop.progress=false)

irepo() {
  for seed in $SEEDS; do
    for loss in irepo dpo ipo soft_dpo; do
      python -m repo_jax.irepo "${ONLINE[@]}" "train.loss.name=$loss" "run_dir=$OUT/irepo/${loss}_s$seed" \
        "train.seed=$seed" "data.seed=$seed" | tail -n 4
    done
  done
  python -m repo_jax.compare "$OUT"/irepo/* --by train.loss.name --out "$OUT/irepo_compare.png"
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
