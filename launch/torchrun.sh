#!/usr/bin/env bash
# Launch one node's share of a run with torchrun; run it once per node.
#
#   launch/torchrun.sh [--nnodes N | --nnodes MIN:MAX] [--nproc-per-node P] [--node-rank R]
#                      [--master-addr HOST] [--master-port PORT] [--max-restarts K]
#                      [--rdzv-conf KEY=VALUE,...] [--] COMMAND [ARGS...]
#
# COMMAND is a module (pretrain.train, pretrain.finetune) or a console script
# (gpt-pretrain, gpt-finetune); ARGS are its Hydra overrides. Every option falls back
# to the environment: NNODES, NPROC_PER_NODE, NODE_RANK, MASTER_ADDR, MASTER_PORT,
# then to slurm's (SLURM_NNODES, SLURM_NODEID, the first host of SLURM_JOB_NODELIST),
# then to one node with one process per GPU (or 2 on a CPU machine).
#
# With a node rank (given, or SLURM_NODEID) the rendezvous is static on MASTER_ADDR:PORT;
# without one it is torchrun's c10d rendezvous there (ranks by arrival, RDZV_ID names the job).
#
# Elastic: a node range (--nnodes MIN:MAX, or NNODES=1:4) always uses the c10d rendezvous (a node
# rank is ignored) and lets torchrun restart the ranks up to K times (--max-restarts, MAX_RESTARTS;
# default 3 with a range, else 0): when a node is lost the surviving nodes meet again and their
# ranks resume from the newest checkpoint at the smaller dp (tp and pp stay; the global batch,
# the sample order and the lr schedule too); a node that joins later grows the job back the same
# way. The node at MASTER_ADDR hosts the rendezvous: losing it ends the job. --rdzv-conf (RDZV_CONF)
# tunes torchrun's rendezvous, e.g. last_call_timeout=30,keep_alive_interval=5,keep_alive_max_attempt=3.
#
# Exit status: the workers' requeue code (train.requeue_exit_code, 75) after a
# preemption signal was handled and a checkpoint saved -- torchrun itself reports any
# failing worker as 1, so the workers write the code to $GPT_LAUNCH_STATUS -- else
# torchrun's status. Signals: SIGTERM, SIGUSR1 and SIGHUP reach the workers through torchrun
# (launch/torchrun_agent.py), which waits SHUTDOWN_TIMEOUT seconds (default 900) for
# their checkpoint. A kill -9 of this script ends the job too: torchrun dies with it, and the
# ranks with torchrun (parallel/process_hygiene.py).
# LAUNCH_DRY_RUN=1 prints the torchrun command instead of running it. With LAUNCH_EXIT_DIR set
# (launch/slurm.sbatch's elastic mode) this node's exit status is written to a file there named
# after the node (SLURMD_NODENAME, else the host name); a node lost with its launcher writes none.
# On the c10d rendezvous the ranks get GPT_ELASTIC_JOB=<rdzv id>@<endpoint>, the job's identity for
# the run-dir lease (parallel/run_lease.py): a new rank 0 after a restart takes over the old one's.
set -euo pipefail
status=
on_exit() {  # the status file away; this node's exit status recorded where slurm.sbatch reads it
  local rc=$?
  [ -z "$status" ] || rm -f "$status"
  [ -z "${LAUNCH_EXIT_DIR:-}" ] || echo "$rc" >"$LAUNCH_EXIT_DIR/${SLURMD_NODENAME:-$(hostname)}" || true
}
trap on_exit EXIT

nnodes=${NNODES:-${SLURM_NNODES:-1}}
node_rank=${NODE_RANK:-${SLURM_NODEID:-}}
master_port=${MASTER_PORT:-29500}
master_addr=${MASTER_ADDR:-}
if [ -z "$master_addr" ] && [ -n "${SLURM_JOB_NODELIST:-}" ] && command -v scontrol >/dev/null; then
  hosts=$(scontrol show hostnames "$SLURM_JOB_NODELIST")  # no `| head`: SIGPIPE + pipefail
  master_addr=${hosts%%$'\n'*}
fi
master_addr=${master_addr:-127.0.0.1}
nproc=${NPROC_PER_NODE:-}
max_restarts=${MAX_RESTARTS:-}
rdzv_conf=${RDZV_CONF:-}

while [ $# -gt 0 ]; do
  case "$1" in
    --nnodes) nnodes=$2; shift 2 ;;
    --nproc-per-node | --nproc_per_node) nproc=$2; shift 2 ;;
    --node-rank | --node_rank) node_rank=$2; shift 2 ;;
    --master-addr | --master_addr) master_addr=$2; shift 2 ;;
    --master-port | --master_port) master_port=$2; shift 2 ;;
    --max-restarts | --max_restarts) max_restarts=$2; shift 2 ;;
    --rdzv-conf | --rdzv_conf) rdzv_conf=$2; shift 2 ;;
    --) shift; break ;;
    -h | --help) sed -n '2,/^set -euo pipefail/{/^#/p}' "$0"; exit 0 ;;
    -*) echo "launch/torchrun.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    *) break ;;
  esac
done
if [ -z "$nproc" ]; then
  gpus=$(python -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
  nproc=$([ "$gpus" -gt 0 ] && echo "$gpus" || echo 2)
fi
[ $# -gt 0 ] || { echo "launch/torchrun.sh: no command (e.g. pretrain.train data.dir=...)" >&2; exit 2; }

command=$1; shift
case "$command" in
  gpt-pretrain) target=(-m pretrain.train) ;;
  gpt-finetune) target=(-m pretrain.finetune) ;;
  *.py) target=("$command") ;;
  *) target=(-m "$command") ;;
esac

elastic=
case "$nnodes" in
  *:*)
    elastic=1
    [[ "$nnodes" =~ ^[1-9][0-9]*:[1-9][0-9]*$ ]] && [ "${nnodes%%:*}" -le "${nnodes##*:}" ] || {
      echo "launch/torchrun.sh: --nnodes $nnodes: expected N or MIN:MAX with 1 <= MIN <= MAX" >&2; exit 2; }
    node_rank=  # c10d ranks nodes by arrival: a fixed node rank has no meaning in a range
    # a node that joins a running job (the job grows back) meets nodes of earlier rounds: with torch's
    # shared rendezvous store (its default) only a node's first round publishes rank 0's address, so
    # the newcomer and the rank-0 agent wait 60 s for each other's keys and the whole job fails; the
    # ranks' own store is set up afresh every round
    export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1} ;;
esac
max_restarts=${max_restarts:-$([ -n "$elastic" ] && echo 3 || echo 0)}
[[ "$max_restarts" =~ ^[0-9]+$ ]] || { echo "launch/torchrun.sh: --max-restarts $max_restarts: expected an integer >= 0" >&2; exit 2; }
if [ -n "$node_rank" ]; then
  rendezvous=(--node_rank "$node_rank" --master_addr "$master_addr" --master_port "$master_port")
  unset GPT_ELASTIC_JOB
else
  rdzv_id=${RDZV_ID:-${SLURM_JOB_ID:-gpt}}
  rendezvous=(--rdzv_backend c10d --rdzv_endpoint "$master_addr:$master_port" --rdzv_id "$rdzv_id")
  [ -z "$rdzv_conf" ] || rendezvous+=(--rdzv_conf "$rdzv_conf")
  # the job's identity for the run-dir lease (parallel/run_lease.py): after a restart, a new rank 0 on
  # another host takes over the lease of this job's earlier rank 0; a loopback endpoint is per host
  job_host=$master_addr
  case "$master_addr" in 127.* | localhost | ::1 | 0.0.0.0) job_host="$(hostname)/$master_addr" ;; esac
  export GPT_ELASTIC_JOB="$rdzv_id@$job_host:$master_port"
fi
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cmd=(python "$here/torchrun_agent.py" --nnodes "$nnodes" --nproc_per_node "$nproc" "${rendezvous[@]}"
  --max_restarts "$max_restarts" "${target[@]}" "$@")
if [ -n "${LAUNCH_DRY_RUN:-}" ]; then  # print what would run (tests, and checking a job script)
  echo "${GPT_ELASTIC_JOB:+GPT_ELASTIC_JOB=$GPT_ELASTIC_JOB }${cmd[*]}"
  exit 0
fi

status=$(mktemp "${TMPDIR:-/tmp}/gpt-launch-status.XXXXXX")
export GPT_LAUNCH_STATUS=$status OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

# torchrun runs in the background so that this shell can pass signals on at once
# (bash runs traps only between foreground commands)
"${cmd[@]}" &
child=$!
forward() { kill -s "$1" "$child" 2>/dev/null || true; }
trap 'forward TERM' TERM
trap 'forward USR1' USR1
trap 'forward INT' INT
trap 'forward HUP' HUP
rc=0
while :; do
  wait "$child" && rc=0 || rc=$?
  kill -0 "$child" 2>/dev/null || break  # wait returned for a trapped signal: keep waiting
done
# a success is a success: with --max-restarts an earlier attempt's code (e.g. the watchdog's, when a
# node was lost and the others went on without it) is no longer the job's
if [ "$rc" -ne 0 ] && [ -s "$status" ]; then
  exit "$(tail -n 1 "$status")"
fi
exit "$rc"
