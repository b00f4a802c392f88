"""Faults and bad input, run through the console scripts as a user would (issue: nothing lost,
nothing silently wrong). Each case copies one small finished run and does one thing to it."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, TINYSHAKESPEARE, one_line_error, prepare_cfg, run_cli
from tests.distributed import free_port

pytestmark = pytest.mark.slow

ARGS = [
    "model=tiny",
    "train.micro_batch=2",
    "train.global_batch=2",
    "train.eval_every=0",
    "train.eval_batches=1",
    "train.sample_tokens=0",
    "train.keep_last=10",
    "logging.wandb=disabled",
    "logging.progress_bar=false",
]


def train(data: Path, run: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return run_cli("pretrain.train", *ARGS, f"data.dir={data}", f"run.dir={run}", *args, env=env)


def tree_hash(path: Path) -> str:
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(str(file.relative_to(path)).encode() + file.read_bytes())
    return digest.hexdigest()


def events(run: Path, kind: str) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r.get("event") == kind]


def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.fixture(scope="session")
def base_run(char_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """6 steps with checkpoints at 2, 4 and 6."""
    run = tmp_path_factory.mktemp("faults") / "base"
    result = train(char_shards, run, "train.max_steps=6", "train.save_every=2")
    assert result.returncode == 0, result.stderr[-3000:]
    return run


@pytest.fixture
def run_copy(base_run: Path, tmp_path: Path) -> Path:
    shutil.copytree(base_run, tmp_path / "run", symlinks=True)
    return tmp_path / "run"


def test_stale_latest_and_corrupt_steps_fall_back_to_the_newest_intact(char_shards: Path, run_copy: Path) -> None:
    ckpts = run_copy / "checkpoints"
    (ckpts / "latest").unlink()  # a missing hint never restarts from 0
    flip_byte(next((ckpts / "step_6").glob("*.distcp")))  # same-size bit rot
    shard = next((ckpts / "step_4").glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:100])  # truncated
    step_2 = tree_hash(ckpts / "step_2")
    result = train(char_shards, run_copy, "train.max_steps=6", "train.save_every=2")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "step_6 is not intact" in result.stderr and "checksum mismatch" in result.stderr
    assert "step_4 is not intact" in result.stderr and "bytes" in result.stderr
    assert f"resumed from {ckpts / 'step_2'} at step 2" in result.stdout
    assert [e["checkpoint"] for e in events(run_copy, "fallback")] == ["step_6", "step_4"]
    assert tree_hash(ckpts / "step_2") == step_2
    # the corrupt steps were moved aside by the new saves, not deleted
    assert (ckpts / "step_6.superseded-1").is_dir() and (ckpts / "step_4.superseded-1").is_dir()
    assert (ckpts / "latest").read_text().strip() == "step_6"


def test_no_intact_checkpoint_is_one_line_and_changes_nothing(char_shards: Path, run_copy: Path) -> None:
    ckpts = run_copy / "checkpoints"
    for step in (2, 4, 6):
        flip_byte(ckpts / f"step_{step}" / "rng_rank0.pt")
    before = tree_hash(run_copy)
    line = one_line_error(train(char_shards, run_copy, "train.max_steps=8"), 1)
    assert "no intact checkpoint" in line and "run.restart=true" in line
    assert tree_hash(run_copy) == before


def test_resume_refuses_another_tokenizer_or_shard_set(char_shards: Path, run_copy: Path, tmp_path: Path) -> None:
    from data.prepare import prepare

    byte = prepare(prepare_cfg(input=str(TINYSHAKESPEARE), out=str(tmp_path / "byte"), tokenizer="byte"))
    line = one_line_error(train(byte, run_copy, "train.max_steps=8"), 2)
    assert "another tokenizer" in line and "vocab 67" in line
    other = prepare(prepare_cfg(input=str(TINYSHAKESPEARE), out=str(tmp_path / "char2"), val_fraction=0.2))
    line = one_line_error(train(other, run_copy, "train.max_steps=8"), 2)
    assert "another shard set" in line and "data.allow_new=true" in line


def test_resume_applies_the_new_schedule_and_allowed_new_data(run_copy: Path, tmp_path: Path) -> None:
    from data.prepare import prepare

    other = prepare(prepare_cfg(input=str(TINYSHAKESPEARE), out=str(tmp_path / "char2"), val_fraction=0.2))
    args = ["train.lr=1e-3", "train.lr_schedule=constant", "train.warmup_steps=0", "train.max_steps=8"]
    result = train(other, run_copy, *args, "data.allow_new=true")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resume: train.lr 0.004 -> 0.001" in result.stdout
    changes = {e["key"]: e["new"] for e in events(run_copy, "config_change")}
    assert changes["train.lr"] == 1e-3 and changes["train.lr_schedule"] == "constant"
    assert changes["train.max_steps"] == 8
    assert events(run_copy, "new_data")[0]["data_dir"] == str(other)
    rows = [json.loads(line) for line in (run_copy / "metrics.jsonl").read_text().splitlines()]
    assert [r["lr"] for r in rows if r.get("step", 0) > 6 and "lr" in r] == [1e-3, 1e-3]
    assert "lr: 0.001" in (run_copy / "config.yaml").read_text()


def test_restart_moves_the_old_run_aside_and_a_requeue_resumes(char_shards: Path, run_copy: Path) -> None:
    before = tree_hash(run_copy / "checkpoints")
    result = train(char_shards, run_copy, "train.max_steps=2", "run.restart=true")
    assert result.returncode == 0, result.stderr[-3000:]
    (archive,) = run_copy.glob("restarted-*")
    assert tree_hash(archive / "checkpoints") == before and (archive / "metrics.jsonl").is_file()
    assert [p.name for p in (run_copy / "checkpoints").glob("step_*")] == ["step_2"]
    again = train(char_shards, run_copy, "train.max_steps=2", "run.restart=true")  # e.g. a requeue
    assert again.returncode == 0 and "resuming it" in again.stdout and "nothing to do" in again.stdout


def losses(run: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def start_long_run(data: Path, run: Path, *args: str, after: int = 0) -> subprocess.Popen:
    """A gpt-pretrain that trains until signalled, returned once it has logged a step past ``after``."""
    cmd = [sys.executable, "-m", "pretrain.train", *ARGS, f"data.dir={data}", f"run.dir={run}"]
    cmd += ["train.max_steps=100000", "train.save_every=0", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    proc = subprocess.Popen(
        cmd,
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # as from a terminal: a suite started under nohup would hand on SIGHUP ignored, and a run
        # started ignoring a signal keeps ignoring it
        preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_DFL),
    )
    deadline = time.monotonic() + 120
    while not (run / "metrics.jsonl").is_file() or max(losses(run), default=0) <= after:
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"the run did not start: {proc.communicate()[1][-3000:]}")
        time.sleep(0.1)
    return proc


def stopped_by(proc: subprocess.Popen, sig: signal.Signals) -> tuple[str, str]:
    try:
        proc.send_signal(sig)
        return proc.communicate(timeout=120)
    finally:
        proc.kill()


def test_one_writer_per_run_dir_sighup_saves_a_requeue_resumes_and_ctrl_c_saves(
    char_shards: Path, tmp_path: Path
) -> None:
    """A second gpt-pretrain on a live run's dir refuses in one line naming the holder and changes
    nothing; a closed terminal (SIGHUP) saves and exits 75; the requeued run takes the released
    lease and resumes; Ctrl-C saves and exits 130 without a traceback."""
    run = tmp_path / "run"
    proc = start_long_run(char_shards, run, "train.lr=1e-3")
    try:
        line = one_line_error(train(char_shards, run, "train.max_steps=4", "train.lr=4e-3"), 2)
        assert "is in use by another run" in line and f"pid {proc.pid}" in line, line
    finally:
        out, err = stopped_by(proc, signal.SIGHUP)
    assert proc.returncode == 75, err[-3000:]
    (step_dir,) = (run / "checkpoints").glob("step_*")
    step = int(step_dir.name.removeprefix("step_"))
    assert f"step {step}: SIGHUP: saving a checkpoint" in out, out[-2000:]
    assert list(losses(run)) == list(range(1, step + 1))  # one writer's lines, each step once
    assert "lr: 0.001" in (run / "config.yaml").read_text() and not (run / ".lease.json").exists()

    again = start_long_run(char_shards, run, "train.lr=1e-3", after=step)  # the requeue
    out, err = stopped_by(again, signal.SIGINT)
    assert again.returncode == 130, err[-3000:]
    assert f"resumed from {step_dir} at step {step}" in out, out[-2000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    last = max(int(p.name.removeprefix("step_")) for p in (run / "checkpoints").glob("step_*"))
    assert last > step and f"step {last}: SIGINT: saving a checkpoint" in out, out[-2000:]


def test_a_crafted_pickle_never_runs_torn_metrics_and_inherited_fault_variables_change_nothing(
    char_shards: Path, base_run: Path, run_copy: Path, tmp_path: Path
) -> None:
    """A run killed with kill -9 left its lease (its pid is dead): it is taken over with a note.
    step_6's RNG file is replaced by a pickle that would run a command (its checksum updated to
    match): the step is refused as unreadable and the run resumes from step_4. The last metrics line
    is torn. GPT_FAULT_NAN_STEPS without the test switch is ignored. Steps 5 and 6 come out as
    in the uninterrupted run."""
    from parallel import checksums

    payload = tmp_path / "executed"

    class Payload:
        def __reduce__(self) -> tuple:
            return (os.system, (f"touch {payload}",))

    step_6 = run_copy / "checkpoints" / "step_6"
    import torch

    torch.save({"python": Payload()}, step_6 / "rng_rank0.pt")
    listed = json.loads((step_6 / checksums.MANIFEST).read_text())
    file = step_6 / "rng_rank0.pt"
    listed["files"]["rng_rank0.pt"] = {"size": file.stat().st_size, checksums.ALGORITHM: checksums.file_digest(file)}
    (step_6 / checksums.MANIFEST).write_text(json.dumps(listed))
    with (run_copy / "metrics.jsonl").open("a") as metrics:
        metrics.write('{"step": 7, "loss": 3.9')  # cut off by a crash
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lease = {"host": socket.gethostname(), "pid": dead.pid, "token": "gone", "since": 0.0, "heartbeat": time.time()}
    (run_copy / ".lease.json").write_text(json.dumps(lease))  # left by a run killed with kill -9
    env = {"GPT_FAULT_NAN_STEPS": "5"}  # inherited, without GPT_TEST_HARNESS=1
    result = train(char_shards, run_copy, "train.max_steps=6", "train.save_every=2", env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert not payload.exists()
    assert "step_6 is not intact (unreadable: UnpicklingError" in result.stderr, result.stderr[-3000:]
    assert "dropped 1 malformed line" in result.stdout and "test fault" not in result.stderr
    assert f"took over the lease of run.dir={run_copy} from host" in result.stdout
    assert f"pid {dead.pid} is not running" in result.stdout and not (run_copy / ".lease.json").exists()
    assert losses(run_copy) == losses(base_run)


def test_second_ctrl_c_aborts_at_once_without_traceback() -> None:
    script = (
        "import os, signal, time\n"
        "from pretrain.trainer.preemption import StopRequest\n"
        "StopRequest(['SIGINT']).install()\n"
        "os.kill(os.getpid(), signal.SIGINT)\n"
        "os.kill(os.getpid(), signal.SIGINT)\n"
        "time.sleep(30)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 130 and "Traceback" not in result.stderr
    assert "second SIGINT; aborting" in result.stderr


def test_nan_skip_is_agreed_on_two_ranks_then_stops(char_shards: Path, tmp_path: Path) -> None:
    """A NaN on rank 1 only skips the step on both dp ranks (a one-sided skip would hang the
    distributed optimizer's collectives); too many in a row stop the run, last checkpoint kept."""
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1"]
    cmd += [f"--master_port={free_port()}", "-m", "pretrain.train", *ARGS, f"data.dir={char_shards}"]
    cmd += [f"run.dir={run}", "train.global_batch=4", "train.max_steps=10", "train.save_every=2", "train.max_skipped=2"]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "GPT_FAULT_NAN_STEPS": "3,5,6",
        "GPT_FAULT_RANK": "1",
        "GPT_TEST_HARNESS": "1",
    }
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "step 6: 2 consecutive steps skipped" in result.stderr, result.stderr[-3000:]
    rows = {r["step"]: r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r}
    assert sorted(rows) == [1, 2, 3, 4, 5, 6]
    assert [s for s, r in rows.items() if r.get("skipped")] == [3, 5, 6]
    assert rows[6]["skipped_steps"] == 3 and rows[4]["skipped_steps"] == 1
    # a skipped step does not advance the warmup: step 4 runs at step 3's lr
    assert rows[2]["lr"] < rows[3]["lr"] == rows[4]["lr"] < rows[5]["lr"]
    assert sorted(p.name for p in (run / "checkpoints").glob("step_*")) == ["step_2", "step_4"]


def _can_mount_tmpfs(path: Path) -> bool:
    if os.geteuid() != 0 or not shutil.which("mount"):
        return False
    path.mkdir()
    ok = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(path)], capture_output=True)
    if ok.returncode == 0:
        subprocess.run(["umount", str(path)], check=True)
    return ok.returncode == 0


def test_disk_full_is_one_line_keeps_the_previous_step_and_restarts_in_place(char_shards: Path, tmp_path: Path) -> None:
    disk = tmp_path / "disk"
    if not _can_mount_tmpfs(disk):
        pytest.skip("needs root and a permitted `mount -t tmpfs` to make a small full disk")
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=14m", "tmpfs", str(disk)], check=True)  # one step fits
    try:
        run = disk / "run"
        line = one_line_error(train(char_shards, run, "train.max_steps=6", "train.save_every=2"), 1)
        assert "step_4 failed: no space left on device" in line and "step_2 is intact" in line
        assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest", "step_2"]  # no .tmp left
        subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True)
        result = train(char_shards, run, "train.max_steps=6", "train.save_every=2")
        assert result.returncode == 0 and "at step 2" in result.stdout, result.stderr[-3000:]
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def test_a_corrupt_validation_shard_fails_after_the_checkpoint(char_shards: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    shutil.copytree(char_shards, data)
    flip_byte(sorted(data.glob("val-*.tar"))[0])  # the one evaluated; same size: only its sha256 check sees it
    run = tmp_path / "run"
    line = one_line_error(train(data, run, "train.max_steps=2", "train.save_every=2", "train.eval_every=2"), 2)
    assert "val-" in line
    assert (run / "checkpoints" / "step_2" / "checksums.json").is_file()


def test_bad_values_are_one_line_errors(char_shards: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from conf.cli import compose
    from conf.errors import UserError
    from conf.schema import check_logging, check_train

    bad = ["train.lr=-1", "train.lr=0", "train.max_steps=-5", "train.min_lr_ratio=2", "train.beta2=1"]
    bad += ["train.spike_factor=0.5", "train.max_skipped=0", "train.micro_batch=0", "train.lr_schedule=nope"]
    for override in bad:
        with pytest.raises(UserError, match=override.split("=")[0].replace(".", r"\.")):
            check_train(compose(["data.dir=x", override]))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    with pytest.raises(UserError, match="no wandb credentials"):
        check_logging(compose(["data.dir=x", "logging.wandb=online"]))
    line = one_line_error(train(char_shards, tmp_path / "r", "train.lr=-1"), 2)
    assert line == "error: train.lr=-1: must be > 0" and not (tmp_path / "r").exists()
    result = train(char_shards, tmp_path / "r", "train.max_steps=0")
    assert result.returncode == 0 and "train.max_steps=0: nothing to do" in result.stdout


def test_io_errors_name_their_cause(tmp_path: Path) -> None:
    from parallel.checkpoint import describe_io_error

    full = OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "x.distcp"))
    try:
        raise RuntimeError("unexpected pos 704 vs 598") from full
    except RuntimeError as wrapped:
        assert describe_io_error(wrapped, tmp_path) == f"no space left on device ({tmp_path / 'x.distcp'})"
    text = RuntimeError("Worker failure: [Errno 28] No space left on device")
    assert describe_io_error(text, tmp_path).startswith("no space left on device")


def test_hashes_computed_while_writing_match_the_file(tmp_path: Path) -> None:
    import torch

    from parallel import checksums

    path = tmp_path / "t.pt"
    with checksums.hashing_open(path, "wb") as stream:
        torch.save({"w": torch.randn(64, 64)}, stream)
    sidecar = json.loads(Path(str(path) + checksums.SIDECAR).read_text())
    assert sidecar == {"size": path.stat().st_size, "xxh3_64": checksums.file_digest(path)}
    with checksums.hashing_open(tmp_path / "s.bin", "wb") as stream:  # a writer that seeks back
        stream.write(b"x" * 10)
        stream.seek(0)
        stream.write(b"y")
    sidecar = json.loads((tmp_path / f"s.bin{checksums.SIDECAR}").read_text())
    assert sidecar["xxh3_64"] == checksums.file_digest(tmp_path / "s.bin")
