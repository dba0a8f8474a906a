#!/usr/bin/env bash
# The modelloop image's entrypoint: its first argument selects what the container runs.
#
#   serve   [OPTIONS]          the prediction service        (modelloop serve)
#   monitor [OPTIONS]          the monitoring sidecar        (modelloop monitor)
#   retrain --name MODEL ...   one retraining job            (modelloop retrain)
#   batch   score IN OUT ...   batch scoring of one file     (modelloop batch)
#   batch-shard IN_DIR OUT_DIR one shard of a Kubernetes Indexed Job: the files of IN_DIR whose
#                              position (sorted by name) modulo JOB_COMPLETIONS is
#                              JOB_COMPLETION_INDEX, each scored to OUT_DIR/<name>.parquet
#   bootstrap NAME [OPTIONS]   train and promote model NAME (modelloop train options) unless
#                              the registry already has a production version of it
#   healthcheck                the image's HEALTHCHECK: probes whatever this container runs
#   modelloop ARGS...          any other modelloop command
#
# The serving image (docker build --target serving) runs serve, batch, batch-shard and
# healthcheck; it has no training or monitoring, so monitor, retrain and bootstrap need the full
# image (MODELLOOP_IMAGE_TARGET, set by the Dockerfile, tells the two apart).
#
# Everything else is configured through the settings' environment variables
# (MODELLOOP_HOME, MODELLOOP_SERVING_*, MODELLOOP_MONITOR_*, MODELLOOP_TRAINING_*).
#
# Two variables belong to this script alone:
#   MODELLOOP_RUN_DIR        where the container notes its role and the serving process's pid
#                            (default /run/modelloop; shared by serving and sidecar in a pod)
#   MODELLOOP_PID_WAIT_S     how long the sidecar waits for serving's pid file (default 60)
# When serving and sidecar share a process namespace (docker-compose `pid: service:serving`,
# Kubernetes `shareProcessNamespace`) and this run directory, the sidecar watches the serving
# process's CPU and memory without being told its pid.
set -euo pipefail

run_dir="${MODELLOOP_RUN_DIR:-/run/modelloop}"

die() {
  echo "modelloop-entrypoint: $*" >&2
  exit 64 # EX_USAGE
}

# The serving image has neither torch nor Evidently: refuse its missing roles in one line rather
# than fail later with an import error.
require_full_image() {
  if [ "${MODELLOOP_IMAGE_TARGET:-full}" = serving ]; then
    die "this serving image has no training or monitoring and cannot run '$1'; use the full image (docker build --target full, the default target)"
  fi
}

# Best effort: a job on a read-only root file system without a run dir still runs.
note_role() {
  if mkdir -p "$run_dir" 2>/dev/null && printf '%s\n' "$1" 2>/dev/null >"$run_dir/role.$$"; then
    mv -f "$run_dir/role.$$" "$run_dir/role"
  fi
}

usage() {
  sed -n '2,21p' "$0" | sed 's/^# \{0,1\}//'
}

# The sidecar's target: an explicit MODELLOOP_MONITOR_TARGET_PID or _TARGET_CGROUP wins;
# else serving's pid file, waited for because both containers start together.
find_serving_pid() {
  if [ -n "${MODELLOOP_MONITOR_TARGET_PID:-}" ] || [ -n "${MODELLOOP_MONITOR_TARGET_CGROUP:-}" ]; then
    return 0
  fi
  local pid_file="$run_dir/serving.pid" wait_s="${MODELLOOP_PID_WAIT_S:-60}"
  local deadline=$((SECONDS + wait_s))
  while [ ! -s "$pid_file" ] && [ "$SECONDS" -lt "$deadline" ]; do
    sleep 0.5
  done
  if [ -s "$pid_file" ]; then
    local pid
    pid="$(cat "$pid_file")"
    if [ -d "/proc/$pid" ]; then
      export MODELLOOP_MONITOR_TARGET_PID="$pid"
      echo "modelloop-entrypoint: watching serving process $pid" >&2
      return 0
    fi
  fi
  echo "modelloop-entrypoint: no serving process visible (pid file $pid_file); CPU and memory of serving are not watched" >&2
}

# Files of IN_DIR that belong to this shard; every shard sees the same sorted list.
shard_files() {
  local in_dir="$1" index="$2" count="$3" i=0 f
  while IFS= read -r -d '' f; do
    if [ $((i % count)) -eq "$index" ]; then
      printf '%s\0' "$f"
    fi
    i=$((i + 1))
  done < <(find "$in_dir" -maxdepth 1 -type f \( -name '*.csv' -o -name '*.parquet' \) -print0 | sort -z)
}

batch_shard() {
  [ $# -ge 2 ] || die "batch-shard needs IN_DIR OUT_DIR (got: $*)"
  local in_dir="$1" out_dir="$2"
  shift 2
  local index="${JOB_COMPLETION_INDEX:-}" count="${JOB_COMPLETIONS:-}"
  [ -d "$in_dir" ] || die "batch-shard: input folder $in_dir does not exist"
  [[ "$index" =~ ^[0-9]+$ ]] || die "batch-shard: JOB_COMPLETION_INDEX must be a number (got '$index')"
  [[ "$count" =~ ^[1-9][0-9]*$ ]] || die "batch-shard: JOB_COMPLETIONS must be a positive number (got '$count')"
  [ "$index" -lt "$count" ] || die "batch-shard: JOB_COMPLETION_INDEX $index is not below JOB_COMPLETIONS $count"
  mkdir -p "$out_dir"
  local n=0 done_before=0 f base out
  while IFS= read -r -d '' f; do
    base="$(basename "$f")"
    out="$out_dir/${base%.*}.parquet"
    # a retried pod skips what it finished (the output is renamed into place when whole) and
    # resumes what it had begun (modelloop batch score keeps OUT.parts/)
    if [ -e "$out" ] && [ ! -d "$out.parts" ]; then
      echo "modelloop-entrypoint: shard $index/$count already scored $base" >&2
      done_before=$((done_before + 1))
      continue
    fi
    echo "modelloop-entrypoint: shard $index/$count scores $base" >&2
    modelloop batch score "$f" "$out" "$@"
    n=$((n + 1))
  done < <(shard_files "$in_dir" "$index" "$count")
  echo "modelloop-entrypoint: shard $index/$count scored $n file(s), $done_before done before" >&2
}

# A first model for a fresh registry (docker-compose's bootstrap service, the chart's
# bootstrap Job); a no-op once the model has a production version.
bootstrap() {
  [ $# -ge 1 ] || die "bootstrap needs the model NAME (got nothing)"
  local name="$1"
  shift
  if modelloop models show "$name" production >/dev/null 2>&1; then
    echo "modelloop-entrypoint: $name already has a production version; nothing to train" >&2
    return 0
  fi
  echo "modelloop-entrypoint: training the first version of $name" >&2
  exec modelloop train --name "$name" --promote "$@"
}

# The HEALTHCHECK: live when the role's HTTP health route answers; jobs are always healthy.
healthcheck() {
  local role url
  role="$(cat "$run_dir/role" 2>/dev/null || echo none)"
  case "$role" in
    serve) url="http://127.0.0.1:${MODELLOOP_SERVING_PORT:-3000}/v2/health/live" ;;
    monitor) url="http://127.0.0.1:${MODELLOOP_MONITOR_PORT:-8001}/live" ;;
    *) return 0 ;;
  esac
  python3 - "$url" <<'EOF'
import sys
import urllib.request

try:
    with urllib.request.urlopen(sys.argv[1], timeout=4) as response:
        sys.exit(0 if response.status == 200 else 1)
except OSError as exc:
    print(f"{sys.argv[1]}: {exc}", file=sys.stderr)
    sys.exit(1)
EOF
}

command="${1:-}"
[ $# -gt 0 ] && shift
case "$command" in
  serve)
    note_role serve
    # exec keeps this pid, so the pid file names the serving process itself
    if ! echo "$$" 2>/dev/null >"$run_dir/serving.pid"; then
      echo "modelloop-entrypoint: $run_dir is not writable; the sidecar cannot find this process" >&2
    fi
    exec modelloop serve "$@"
    ;;
  monitor)
    require_full_image monitor
    note_role monitor
    find_serving_pid
    exec modelloop monitor "$@"
    ;;
  retrain)
    require_full_image retrain
    note_role job
    exec modelloop retrain "$@"
    ;;
  batch)
    note_role job
    exec modelloop batch "$@"
    ;;
  batch-shard)
    note_role job
    batch_shard "$@"
    ;;
  bootstrap)
    require_full_image bootstrap
    note_role job
    bootstrap "$@"
    ;;
  healthcheck)
    healthcheck
    ;;
  modelloop)
    exec modelloop "$@"
    ;;
  help | -h | --help)
    usage
    ;;
  "")
    usage >&2
    die "no command given"
    ;;
  *)
    usage >&2
    die "unknown command '$command' (serve, monitor, retrain, batch, batch-shard, bootstrap, healthcheck, modelloop)"
    ;;
esac
