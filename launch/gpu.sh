#!/usr/bin/env bash
# Run a repo_jax program on one or more GPU hosts (jax[cuda12]), one process per host.
#
#   bash launch/gpu.sh [--dry-run] --hosts H1,H2,... [--port 1234] [--dir PATH] -- CMD...
#
# Host 0 is the coordinator. Each host gets JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and
# JAX_PROCESS_ID, which repo_jax.sharding reads to call jax.distributed.initialize(); all local
# GPUs of a host belong to its one process. A single host needs no coordinator and runs the
# command as it is. --dry-run prints the ssh commands instead of running them.
set -euo pipefail

dry_run=0 hosts="" port=1234 dir="repo_jax"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) dry_run=1; shift ;;
    --hosts) hosts="$2"; shift 2 ;;
    --port) port="$2"; shift 2 ;;
    --dir) dir="$2"; shift 2 ;;
    --) shift; break ;;
    *) echo "gpu.sh: unknown argument $1 (see the header of $0)" >&2; exit 2 ;;
  esac
done
[[ -n "$hosts" ]] || { echo "gpu.sh: --hosts is required" >&2; exit 2; }
[[ $# -gt 0 ]] || { echo "gpu.sh: give the command to run after --" >&2; exit 2; }

IFS=, read -r -a host_list <<< "$hosts"
n=${#host_list[@]}
cmd=$(printf '%q ' "$@")
setup="cd $dir && . .venv/bin/activate"
pids=()
for i in "${!host_list[@]}"; do
  h=${host_list[$i]}
  env_vars=""
  if [[ $n -gt 1 ]]; then
    env_vars="JAX_COORDINATOR_ADDRESS=${host_list[0]}:$port JAX_NUM_PROCESSES=$n JAX_PROCESS_ID=$i "
  fi
  remote="$setup && ${env_vars}$cmd"
  if [[ $dry_run == 1 ]]; then
    printf 'ssh %q %q\n' "$h" "$remote"
  else
    ssh "$h" "$remote" &
    pids+=($!)
  fi
done
status=0
for p in "${pids[@]}"; do wait "$p" || status=$?; done
exit $status
