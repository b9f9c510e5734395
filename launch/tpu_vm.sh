#!/usr/bin/env bash
# Run a repo_jax program, detached, on every worker of a Cloud TPU VM (single host or pod slice).
#
#   bash launch/tpu_vm.sh [--dry-run] --name NAME --zone ZONE --accelerator TYPE [--project P] \
#        [--version RUNTIME] [--repo GIT_URL] [--create [--spot | --queued [--spot]]] -- CMD...
#   bash launch/tpu_vm.sh --name NAME --zone ZONE --logs [--worker N]   follow worker N's log (0)
#   bash launch/tpu_vm.sh --name NAME --zone ZONE --status              every worker's job state
#   bash launch/tpu_vm.sh --name NAME --zone ZONE --stop                SIGTERM on every worker
#   bash launch/tpu_vm.sh --name NAME --zone ZONE --delete [--queued]   delete the TPU VM
#
# A run, start to end (its run_dir a gs:// folder, so nothing lives only on the VM's disk):
#   bash launch/tpu_vm.sh --name align --zone us-west4-a --accelerator v5litepod-8 --create --spot -- \
#        python -m repo_jax.irepo --config configs/mistral7b_irepo_lora.yaml run_dir=gs://BUCKET/runs/m7
#   bash launch/tpu_vm.sh --name align --zone us-west4-a --logs
#   (a spot VM is reclaimed: the program gets SIGTERM, checkpoints to the bucket and exits 143)
#   bash launch/tpu_vm.sh --name align --zone us-west4-a --delete
#   ... then the first command again: a new VM, the same run_dir, and the run resumes from the bucket.
#
# Accelerator types and runtime versions, as Google's Cloud TPU docs name them (--version
# overrides the runtime; any other type is refused, naming the valid ones):
#   v5litepod-N (TPU v5e, N chips)      runtime v2-alpha-tpuv5-lite
#   v5p-N       (TPU v5p, N/2 chips)    runtime v2-alpha-tpuv5
#   v6e-N       (TPU v6e, N chips)      runtime v2-alpha-tpuv6e
#   v4-N        (TPU v4, N/2 chips)     runtime tpu-ubuntu2204-base
#
# --create makes the TPU VM first: on demand, --spot (cheaper, reclaimable at any time), or
# --queued (a queued resource named NAME that waits for capacity; with --spot, a spot one): the
# script waits until it is ACTIVE. Then, on every worker (--worker=all): the code (git clone
# --repo, or this checkout's committed files as a git archive), the venv (launch/remote.sh
# setup: skipped when .venv was built from the same pyproject.toml, extra and python), and the
# command, started detached (launch/remote.sh start: a dropped ssh session does not end it; its
# output in ~/repo_jax/logs/job-<worker host>.log). JAX's runtime finds the other hosts by itself
# on TPU pods, so the program needs no multi-host flags. --dry-run prints the commands instead.
set -euo pipefail

die() { echo "tpu_vm.sh: $1 (see the header of $0)" >&2; exit 2; }
need_value() { [[ $# -ge 2 && -n "$2" && "$2" != --* ]] || die "$1 needs a value"; }

dry_run=0 name="" zone="" accel="" project="" version="" repo="" create=0 spot=0 queued=0 action=launch worker=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) dry_run=1; shift ;;
    --name) need_value "$@"; name="$2"; shift 2 ;;
    --zone) need_value "$@"; zone="$2"; shift 2 ;;
    --accelerator) need_value "$@"; accel="$2"; shift 2 ;;
    --project) need_value "$@"; project="$2"; shift 2 ;;
    --version) need_value "$@"; version="$2"; shift 2 ;;
    --repo) need_value "$@"; repo="$2"; shift 2 ;;
    --create) create=1; shift ;;
    --spot) spot=1; shift ;;
    --queued) queued=1; shift ;;
    --logs) action=logs; shift ;;
    --worker) need_value "$@"; worker="$2"; shift 2 ;;
    --status) action=status; shift ;;
    --stop) action=stop; shift ;;
    --delete) action=delete; shift ;;
    --) shift; break ;;
    *) die "unknown argument $1" ;;
  esac
done
[[ -n "$name" && -n "$zone" ]] || die "--name and --zone are required"
[[ "$worker" =~ ^[0-9]+$ ]] || die "--worker must be a number, got '$worker'"

proj_flag=()
[[ -n "$project" ]] && proj_flag=(--project "$project")
run() {  # one local command (printed under --dry-run)
  if [[ $dry_run == 1 ]]; then printf '%q ' "$@"; echo; else "$@"; fi
}
on() {  # on(WORKERS, COMMAND): a shell command on the workers, from the repo_jax folder
  run gcloud compute tpus tpu-vm ssh "$name" --zone "$zone" "${proj_flag[@]}" --worker="$1" --command "$2"
}

case "$action" in
  logs) on "$worker" "cd repo_jax && bash launch/remote.sh logs"; exit ;;
  status) on all "cd repo_jax && bash launch/remote.sh status"; exit ;;
  stop) on all "cd repo_jax && bash launch/remote.sh stop"; exit ;;
  delete)
    if [[ $queued == 1 ]]; then
      run gcloud compute tpus queued-resources delete "$name" --zone "$zone" "${proj_flag[@]}" --force --quiet
    else
      run gcloud compute tpus tpu-vm delete "$name" --zone "$zone" "${proj_flag[@]}" --quiet
    fi
    exit ;;
esac

[[ -n "$accel" ]] || die "--accelerator is required to launch"
[[ $# -gt 0 ]] || die "give the command to run after --"
[[ $create == 1 || ($spot == 0 && $queued == 0) ]] || die "--spot and --queued go with --create"
case "$accel" in  # the table in the header
  v5litepod-[0-9]*) runtime=v2-alpha-tpuv5-lite ;;
  v5p-[0-9]*) runtime=v2-alpha-tpuv5 ;;
  v6e-[0-9]*) runtime=v2-alpha-tpuv6e ;;
  v4-[0-9]*) runtime=tpu-ubuntu2204-base ;;
  v5e-*) die "--accelerator $accel: gcloud names TPU v5e slices v5litepod-N (--accelerator v5litepod-${accel#v5e-})" ;;
  *) die "--accelerator $accel is not one of v5litepod-N, v5p-N, v6e-N, v4-N" ;;
esac
version=${version:-$runtime}
cmd=$(printf '%q ' "$@"); cmd=${cmd% }
spot_flag=()
[[ $spot == 1 ]] && spot_flag=(--spot)

if [[ $create == 1 && $queued == 1 ]]; then
  run gcloud compute tpus queued-resources create "$name" --node-id "$name" --zone "$zone" "${proj_flag[@]}" \
    --accelerator-type "$accel" --runtime-version "$version" "${spot_flag[@]}"
  # waits for capacity: WAITING_FOR_RESOURCES -> PROVISIONING -> ACTIVE (FAILED / SUSPENDED end it)
  describe=(gcloud compute tpus queued-resources describe "$name" --zone "$zone" "${proj_flag[@]}" --format "value(state.state)")
  if [[ $dry_run == 1 ]]; then
    run "${describe[@]}"
  else
    while state=$("${describe[@]}"); [[ "$state" != ACTIVE ]]; do
      case "$state" in FAILED|SUSPENDED|SUSPENDING) echo "tpu_vm.sh: queued resource $name is $state" >&2; exit 1 ;; esac
      echo "tpu_vm.sh: queued resource $name is $state; waiting"; sleep 60
    done
  fi
elif [[ $create == 1 ]]; then
  run gcloud compute tpus tpu-vm create "$name" --zone "$zone" "${proj_flag[@]}" --accelerator-type "$accel" \
    --version "$version" "${spot_flag[@]}"
fi
if [[ -n "$repo" ]]; then
  on all "[ -d repo_jax ] || git clone $(printf '%q' "$repo") repo_jax"
else  # ship this checkout's committed files (git archive) to every worker
  top=$(git -C "$(dirname "$0")/.." rev-parse --show-toplevel)
  run git -C "$top" archive --format=tar.gz --prefix=repo_jax/ -o /tmp/repo_jax.tgz HEAD
  run gcloud compute tpus tpu-vm scp /tmp/repo_jax.tgz "$name":repo_jax.tgz --zone "$zone" "${proj_flag[@]}" --worker=all
  on all "tar xzf repo_jax.tgz"
fi
on all "cd repo_jax && bash launch/remote.sh setup tpu"
on all "cd repo_jax && bash launch/remote.sh start -- $cmd"
echo "follow it: bash $0 --name $name --zone $zone${project:+ --project $project} --logs   (--status, --stop)" >&2
