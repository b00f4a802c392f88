"""Cluster operations on localhost (CPU, gloo), launched the way users launch them.

Two "nodes" are two ``launch/torchrun.sh --nnodes 2 --node-rank R`` processes on
127.0.0.1, each in its own session so a test can signal or kill one node's whole
process tree (launcher, torchrun agent, rank) like slurm or a node failure does.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from parallel.watchdog import WATCHDOG_EXIT_CODE
from tests.conftest import REPO, run_cli
from tests.distributed import env, free_port, last_step, losses, signal_node, wait_for_step

pytestmark = pytest.mark.slow

REQUEUE = 75
LAUNCH = REPO / "launch" / "torchrun.sh"
ARGS = [
    "model=tiny",
    "train.micro_batch=6",
    "train.global_batch=12",
    "train.eval_every=0",
    "train.eval_batches=1",
    "train.sample_tokens=0",
    "logging.progress_bar=false",
]


def start_node(node: int, nnodes: int, port: int, log: Path, *args: str) -> subprocess.Popen:
    cmd = ["bash", str(LAUNCH), "--nnodes", str(nnodes), "--nproc-per-node", "1", "--node-rank", str(node)]
    cmd += ["--master-addr", "127.0.0.1", "--master-port", str(port), "--", "pretrain.train", *ARGS, *args]
    out = log.open("w")
    environ = {**env(), "WANDB_MODE": "offline"}  # the resumed job continues the wandb run (asserted below)
    return subprocess.Popen(cmd, cwd=REPO, env=environ, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def kill_all(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            signal_node(p, signal.SIGKILL)
            p.wait(timeout=30)


def latest_step(run_dir: Path) -> int:
    return int((run_dir / "checkpoints" / "latest").read_text().strip().removeprefix("step_"))


def test_preempted_two_node_run_requeues_and_resumes_on_one_node(char_shards: Path, tmp_path: Path) -> None:
    steps = 120
    common = [f"data.dir={char_shards}", f"train.max_steps={steps}", "train.save_every=0"]
    ref = tmp_path / "ref"
    result = run_cli("pretrain.train", *ARGS, *common, f"run.dir={ref}", "logging.wandb=disabled")
    assert result.returncode == 0, result.stderr[-3000:]

    run = tmp_path / "run"
    args = [*common, f"run.dir={run}", "logging.wandb=offline"]
    port = free_port()
    nodes = [start_node(i, 2, port, tmp_path / f"node{i}.log", *args) for i in (0, 1)]
    try:
        wait_for_step(run, 5, nodes)
        signal_node(nodes[1], signal.SIGTERM)  # what slurm does to every process of node 1's step
        codes = [p.wait(timeout=180) for p in nodes]
    finally:
        kill_all(nodes)
    logs = [(tmp_path / f"node{i}.log").read_text() for i in (0, 1)]
    assert codes == [REQUEUE, REQUEUE], logs[0][-3000:] + logs[1][-3000:]
    stopped = latest_step(run)
    assert 5 <= stopped < steps
    assert "rank 1: got SIGTERM" in logs[1] and f"step {stopped}: SIGTERM: saving a checkpoint" in logs[0]
    assert "Logging error" not in logs[1]  # torchrun handled the signal once
    assert last_step(run) == stopped
    wandb_id = (run / "wandb_id").read_text().strip()

    one = start_node(0, 1, free_port(), tmp_path / "resume.log", *args)
    try:
        assert one.wait(timeout=300) == 0, (tmp_path / "resume.log").read_text()[-3000:]
    finally:
        kill_all([one])
    assert (
        f"resumed from {run / 'checkpoints' / f'step_{stopped}'} at step {stopped}"
        in (tmp_path / "resume.log").read_text()
    )
    got, want = losses(run), losses(ref)
    assert sorted(got) == list(range(1, steps + 1))
    worst = max(abs(got[s] - want[s]) for s in want)
    assert worst < 1e-4, f"resumed losses differ from the uninterrupted run by {worst}"
    # the resumed job continued the same wandb run
    assert (run / "wandb_id").read_text().strip() == wandb_id
    offline = sorted((run / "wandb").glob("offline-run-*"))
    assert len(offline) == 2 and all(p.name.endswith(wandb_id) for p in offline)


def _watchdog_case(char_shards: Path, tmp_path: Path, how: signal.Signals, resume: bool) -> tuple[str, float]:
    """Stop node 1 (killed or frozen) after a checkpoint; node 0 must fail with the watchdog's message.
    With ``resume``, one node then finishes the run from the last complete step."""
    timeout_s = 15
    run = tmp_path / "run"
    args = [f"data.dir={char_shards}", f"run.dir={run}", "train.max_steps=100", "train.save_every=20"]
    args += [f"parallel.timeout_s={timeout_s}", "logging.wandb=disabled"]
    port = free_port()
    nodes = [start_node(i, 2, port, tmp_path / f"node{i}.log", *args) for i in (0, 1)]
    try:
        wait_for_step(run, 25, nodes)
        signal_node(nodes[1], how)
        start = time.monotonic()
        code = nodes[0].wait(timeout=timeout_s + 60)
        elapsed = time.monotonic() - start
    finally:
        kill_all(nodes)
    log = (tmp_path / "node0.log").read_text()
    assert code == WATCHDOG_EXIT_CODE, log[-3000:]
    assert elapsed < timeout_s + 20, f"node 0 took {elapsed:.0f} s to fail"
    complete = latest_step(run)
    assert complete >= 20 and complete % 20 == 0
    if not resume:
        return log, elapsed

    one = start_node(0, 1, free_port(), tmp_path / "resume.log", *args)
    try:
        assert one.wait(timeout=300) == 0, (tmp_path / "resume.log").read_text()[-3000:]
    finally:
        kill_all([one])
    assert f"at step {complete}" in (tmp_path / "resume.log").read_text()
    assert last_step(run) == 100
    return log, elapsed


@pytest.mark.serial
def test_killed_node_fails_the_other_with_the_watchdog_message(char_shards: Path, tmp_path: Path) -> None:
    log, _ = _watchdog_case(char_shards, tmp_path, signal.SIGKILL, resume=True)
    line = next(x for x in log.splitlines() if x.startswith("watchdog:"))
    assert line.startswith("watchdog: rank 0 of 2, step ") and "operation '" in line, line


@pytest.mark.serial
def test_hung_node_fails_the_other_within_the_timeout(char_shards: Path, tmp_path: Path) -> None:
    """A frozen peer (no socket error, as when a node's network dies) is caught by the timeout."""
    log, elapsed = _watchdog_case(char_shards, tmp_path, signal.SIGSTOP, resume=False)  # the resume: above
    line = next(x for x in log.splitlines() if x.startswith("watchdog:"))
    assert "rank 0 of 2, step " in line and ("parallel.timeout_s=15" in line or "timed out" in line.lower()), line
    assert elapsed >= 14, f"failed after {elapsed:.1f} s, before the 15 s timeout"


def test_kill_during_async_save_leaves_latest_on_the_previous_step(char_shards: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    args = [*ARGS, f"data.dir={char_shards}", f"run.dir={run}", "model.hidden_size=256", "model.ffn_hidden_size=1024"]
    args += ["train.max_steps=40", "train.save_every=10", "train.async_save=true", "logging.wandb=disabled"]
    log = tmp_path / "run.log"
    cmd = [sys.executable, "-m", "pretrain.train", *args]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env(), stdout=log.open("w"), stderr=subprocess.STDOUT)
    writing = run / "checkpoints" / ".step_20.tmp"
    try:
        deadline = time.monotonic() + 180
        while not writing.exists():
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline
            time.sleep(0.002)
        signal_node(proc, signal.SIGSTOP)  # freeze trainer and writer mid-save, then look
        assert writing.is_dir() and not (run / "checkpoints" / "step_20").exists()
        assert (run / "checkpoints" / "latest").read_text().strip() == "step_10"
    finally:
        kill_all([proc])
    before = losses(run)  # what the killed run logged past step 10
    assert max(before) > 10

    result = run_cli("pretrain.train", *args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resumed from {run / 'checkpoints' / 'step_10'} at step 10" in result.stdout
    after = losses(run)
    assert all(abs(after[s] - before[s]) < 1e-6 for s in before), "the resumed run differs from the killed one"
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_40"
    assert not list((run / "checkpoints").glob(".step_*.tmp"))  # the stale half-written step is gone


def test_deepspeed_launcher_preemption_exits_with_the_requeue_code(char_shards: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    cmd = ["bash", str(REPO / "launch" / "deepspeed.sh"), "--num-gpus", "2", "--master-port", str(free_port()), "--"]
    cmd += [*ARGS, f"data.dir={char_shards}", f"run.dir={run}", "parallel.zero_stage=1", "train.max_steps=2000"]
    cmd += ["train.save_every=0", "logging.wandb=disabled"]
    log = tmp_path / "ds.log"
    proc = subprocess.Popen(cmd, cwd=REPO, env=env(), stdout=log.open("w"), stderr=subprocess.STDOUT)
    try:
        wait_for_step(run, 5, [proc])
        signal_node(proc, signal.SIGTERM)
        code = proc.wait(timeout=120)
    finally:
        kill_all([proc])
    assert code == REQUEUE, log.read_text()[-3000:]
    stopped = latest_step(run)
    assert 5 <= stopped < 2000 and last_step(run) == stopped


FAKE_SRUN = """#!/usr/bin/env bash
# records its arguments, then runs the task once per node as slurm would (SLURM_NODEID, SLURMD_NODENAME)
# and exits with FAKE_SRUN_RC, else with its tasks' highest code as srun does
echo "srun $*" >> "$FAKE_LOG"
while [ "$1" != bash ]; do shift; done
hosts=($(scontrol show hostnames "$SLURM_JOB_NODELIST"))
rc=0
for node in $(seq 0 $((SLURM_JOB_NUM_NODES - 1))); do
  code=0
  SLURM_NODEID=$node SLURMD_NODENAME=${hosts[$node]} "$@" >> "$FAKE_LOG" || code=$?
  [ "$code" -le "$rc" ] || rc=$code
done
exit "${FAKE_SRUN_RC:-$rc}"
"""
# the torchrun agent that launch/torchrun.sh starts on node SLURM_NODEID: it exits with that node's
# word in FAKE_NODE_RCS, or for "lost" kills the node's launcher (kill -9, as when the node dies)
FAKE_AGENT = """#!/usr/bin/env bash
codes=($FAKE_NODE_RCS)
code=${codes[$SLURM_NODEID]}
if [ "$code" = lost ]; then kill -9 "$PPID"; exit 137; fi
exit "$code"
"""
FAKE_SCONTROL = """#!/usr/bin/env bash
case "$1 $2" in
  "show hostnames") printf 'gpu-node-a\\ngpu-node-b\\n' ;;
  *) echo "scontrol $*" >> "$FAKE_LOG" ;;
esac
"""


def render_sbatch(
    tmp_path: Path, srun_rc: int | None, node_rcs: str | None = None
) -> tuple[subprocess.CompletedProcess, str]:
    """Run launch/slurm.sbatch with a fake srun and scontrol (two nodes, job 4242, submitted from
    ``tmp_path``): dry runs of launch/torchrun.sh, or with ``node_rcs`` real runs of it whose fake
    torchrun agents end per node as FAKE_AGENT says (srun's code then that of the tasks, unless ``srun_rc``)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    fakes = [("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)] + ([("python", FAKE_AGENT)] if node_rcs else [])
    for name, text in fakes:
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    fake_log = tmp_path / f"slurm{srun_rc}-{(node_rcs or '').replace(' ', '-')}.log"
    slurm = {"SLURM_JOB_NUM_NODES": "2", "SLURM_GPUS_ON_NODE": "8", "SLURM_JOB_NODELIST": "gpu-node-[a-b]"}
    slurm |= {"SLURM_SUBMIT_DIR": str(tmp_path), "REPO": str(REPO), "SLURM_JOB_ID": "4242", "TMPDIR": str(tmp_path)}
    slurm |= {"FAKE_LOG": str(fake_log)} | ({} if srun_rc is None else {"FAKE_SRUN_RC": str(srun_rc)})
    slurm |= {"FAKE_NODE_RCS": node_rcs} if node_rcs else {"LAUNCH_DRY_RUN": "1"}
    run_env = {**env(), **slurm, "PATH": f"{bin_dir}:{env()['PATH']}"}
    if node_rcs:
        run_env.pop("LAUNCH_DRY_RUN", None)
    cmd = ["bash", str(REPO / "launch" / "slurm.sbatch"), "data.dir=/shared/owt", "model=gpt2-small"]
    result = subprocess.run(cmd, cwd=tmp_path, env=run_env, capture_output=True, text=True, timeout=60)
    assert fake_log.is_file(), result.stdout + result.stderr
    return result, fake_log.read_text()


def test_sbatch_template_renders_one_torchrun_per_node_and_requeues(tmp_path: Path) -> None:
    template = (REPO / "launch" / "slurm.sbatch").read_text()
    assert subprocess.run(["bash", "-n", str(REPO / "launch" / "slurm.sbatch")]).returncode == 0
    for directive in ("--signal=B:USR1@", "--requeue", "--ntasks-per-node=1"):
        assert f"#SBATCH {directive}" in template

    result, log = render_sbatch(tmp_path, srun_rc=0)
    assert result.returncode == 0, result.stderr
    srun = [line for line in log.splitlines() if line.startswith("srun ")]
    assert len(srun) == 1 and "--nodes=2 --ntasks-per-node=1" in srun[0]
    assert "launch/torchrun.sh --nnodes 2 --nproc-per-node 8 --master-addr gpu-node-a --master-port 29500" in srun[0]
    torchruns = [line for line in log.splitlines() if "torchrun_agent.py" in line]
    assert len(torchruns) == 2
    for node, line in enumerate(torchruns):
        assert f"--nnodes 2 --nproc_per_node 8 --node_rank {node} --master_addr gpu-node-a --master_port 29500" in line
        assert line.endswith("-m pretrain.train data.dir=/shared/owt model=gpt2-small")
        assert line.startswith("python ")  # a static rendezvous: no elastic job identity for the lease
    assert "scontrol requeue" not in log

    result, log = render_sbatch(tmp_path, srun_rc=REQUEUE)  # the ranks saved after a stop signal
    assert result.returncode == REQUEUE
    assert "scontrol requeue 4242" in log


def test_sbatch_elastic_exit_is_the_surviving_nodes_code(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """srun fails when a node is lost with its task; an elastic job whose survivors finished is not FAILED.
    The real launch/torchrun.sh records each node's code; its fake torchrun agent ends as each node does."""
    monkeypatch.setenv("MIN_NODES", "1")
    result, log = render_sbatch(tmp_path, srun_rc=0)  # a dry run: the ranks' elastic job identity
    assert all(line.startswith("GPT_ELASTIC_JOB=4242@gpu-node-a:29500 python ") for line in log.splitlines()[1:])
    exits = tmp_path / ".slurm-exit"

    result, log = render_sbatch(tmp_path, srun_rc=None, node_rcs="0 lost")  # node b died with its launcher
    assert result.returncode == 0, result.stdout + result.stderr
    line = "srun exited 137 after losing node(s) gpu-node-b; the surviving nodes finished with 0"
    assert line in result.stdout.splitlines() and "scontrol requeue" not in log
    assert not exits.exists()  # the script removes what it made

    result, log = render_sbatch(tmp_path, srun_rc=None, node_rcs="lost 75")  # the survivor saved on a stop signal
    assert result.returncode == REQUEUE and "scontrol requeue 4242" in log
    assert "losing node(s) gpu-node-a; the surviving nodes finished with 75" in result.stdout

    for rcs, code in (("0 1", 1), ("1 lost", 1)):  # disagreement stands; survivors that failed, fail
        result, _ = render_sbatch(tmp_path, srun_rc=None, node_rcs=rcs)
        assert result.returncode == code, (rcs, result.stdout + result.stderr)
        assert ("losing node(s)" in result.stdout) == ("lost" in rcs)

    monkeypatch.delenv("MIN_NODES")  # not elastic: srun's code, as before, and no exit files
    result, log = render_sbatch(tmp_path, srun_rc=None, node_rcs="0 lost")
    assert result.returncode == 137 and "losing node" not in result.stdout and not exits.exists()


def test_stop_request_catches_a_signal_and_rejects_unknown_names() -> None:
    from conf.errors import UserError
    from pretrain.trainer.preemption import StopRequest

    stop = StopRequest(["SIGUSR1"]).install()
    try:
        assert stop.agreed() is None
        os.kill(os.getpid(), signal.SIGUSR1)
        time.sleep(0.05)
        assert stop.agreed() == "SIGUSR1"
    finally:
        stop.uninstall()
    with pytest.raises(UserError, match="SIGNOPE"):
        StopRequest(["SIGNOPE"])


@pytest.mark.serial
def test_watchdog_ends_a_stuck_phase_with_rank_step_and_operation() -> None:
    code = (
        "import time\nfrom parallel.watchdog import Watchdog\n"
        "w = Watchdog(0.5, rank=3, world_size=4)\n"
        "with w.watch('checkpoint save', 7):\n    time.sleep(30)\n"
    )
    start = time.monotonic()
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == WATCHDOG_EXIT_CODE
    assert time.monotonic() - start < 15
    assert "watchdog: rank 3 of 4, step 7, operation 'checkpoint save': not finished after" in result.stderr


def test_async_save_is_refused_for_the_deepspeed_engine(char_shards: Path, tmp_path: Path) -> None:
    args = [f"data.dir={char_shards}", f"run.dir={tmp_path}", "parallel.engine=deepspeed", "train.async_save=true"]
    result = run_cli("pretrain.train", *args)
    assert result.returncode == 2
    assert "train.async_save=true: only the megatron engine" in result.stderr
