#!/usr/bin/env bash
# Launch the DeepSpeed engine with DeepSpeed's own launcher (pdsh/ssh to the hosts of a hostfile).
#
#   launch/deepspeed.sh [--hostfile FILE] [--num-nodes N] [--num-gpus G]
#                       [--master-addr HOST] [--master-port PORT] [--] OVERRIDES...
#
# Runs `deepspeed ... --module pretrain.train parallel.engine=deepspeed OVERRIDES`; without a
# hostfile, one node with G processes (GPUs, or CPU processes on a CPU machine). Everything
# else (torchrun, slurm: launch/torchrun.sh, launch/slurm.sbatch) works for this engine too;
# this path is for clusters that start jobs with DeepSpeed's launcher.
#
# Signals: SIGTERM / SIGUSR1 to this script become a SIGTERM to DeepSpeed's launcher,
# which passes it to the ranks; they save a checkpoint and exit with the requeue code
# (train.requeue_exit_code, 75), which this script returns. DeepSpeed's launcher
# waits 30 s per rank before killing it. SIGHUP (a closed terminal) does the same. A kill -9 of
# this script kills the whole job within a second. LAUNCH_DRY_RUN=1 prints the command.
set -euo pipefail

opts=()
while [ $# -gt 0 ]; do
  case "$1" in
    --hostfile) opts+=(--hostfile "$2"); shift 2 ;;
    --num-nodes | --num_nodes) opts+=(--num_nodes "$2"); shift 2 ;;
    --num-gpus | --num_gpus) opts+=(--num_gpus "$2"); shift 2 ;;
    --master-addr | --master_addr) opts+=(--master_addr "$2"); shift 2 ;;
    --master-port | --master_port) opts+=(--master_port "$2"); shift 2 ;;
    --) shift; break ;;
    -h | --help) sed -n '2,15p' "$0"; exit 0 ;;
    -*) echo "launch/deepspeed.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    *) break ;;
  esac
done
cmd=(deepspeed "${opts[@]}" --no_local_rank --module pretrain.train parallel.engine=deepspeed "$@")
if [ -n "${LAUNCH_DRY_RUN:-}" ]; then
  echo "${cmd[*]}"
  exit 0
fi

status=$(mktemp "${TMPDIR:-/tmp}/gpt-launch-status.XXXXXX")
trap 'rm -f "$status"' EXIT
export GPT_LAUNCH_STATUS=$status OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
# its own process group (set -m): DeepSpeed's runner may die of the signal while its
# launcher still waits for the ranks' checkpoint, so the whole group is waited for
set -m
"${cmd[@]}" &
child=$!
set +m
# a kill -9 of this script ends the job too: a watcher kills the group once this shell is gone
( trap '' INT TERM HUP USR1; while kill -0 $$ 2>/dev/null; do sleep 1; done; kill -s KILL -- "-$child" 2>/dev/null ) &
watcher=$!
trap 'kill "$watcher" 2>/dev/null || true; rm -f "$status"' EXIT  # (set -e holds in traps too)
trap 'kill -s TERM -- "-$child" 2>/dev/null || true' TERM USR1 INT HUP
rc=0
while :; do
  wait "$child" && rc=0 || rc=$?
  kill -0 "$child" 2>/dev/null || break
done
while kill -0 -- "-$child" 2>/dev/null; do sleep 1; done
if [ -s "$status" ]; then
  exit "$(head -n 1 "$status")"
fi
exit "$rc"
