"""gpt-pretrain as a user runs it: run-dir files, exact resume after SIGKILL, one-line errors."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO, one_line_error, run_cli
from tests.remote_server import ShardServer

FAST = [
    "model=tiny",
    "train.micro_batch=4",
    "train.global_batch=8",
    "train.eval_batches=2",
    "train.eval_micro_batch=16",
    "logging.progress_bar=false",
    "train.sample_tokens=0",
]


def losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


@pytest.mark.slow
def test_run_dir_files_and_sample(char_shards: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    result = run_cli(
        "pretrain.train",
        f"data.dir={char_shards}",
        f"run.dir={run}",
        *FAST[:-1],
        "train.sample_tokens=40",
        "train.max_steps=30",
        "train.eval_every=10",
        "train.save_every=20",
        "train.keep_last=1",
        "train.peak_tflops=1e-6",  # a "peak" every step beats: MFU is never reported above 1
        "logging.console_every=10",
        "logging.wandb=offline",
        env={"WANDB_MODE": "offline"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "--- sample ---" in out and out.count("warning: train.peak_tflops=1e-06 is below what this run") == 1
    # piped output: a banner, interval lines with elapsed time and an ETA, evaluations that say what they cover
    banner = next(line for line in out.splitlines() if line.startswith("gpt-pretrain: model tiny"))
    assert "M parameters" in banner and "8 x 64 = 512 tokens per step" not in banner and "512 tokens per step" in banner
    assert f"steps 0 -> 30; run dir {run}" in banner and f"data.dir {char_shards}" in banner
    lines = [line for line in out.splitlines() if line.startswith("step=")]
    assert [line.split()[0] for line in lines if "eta=" in line] == ["step=10/30", "step=20/30", "step=30/30"]
    assert all("avg_steps=10" in line and " elapsed=0:" in line for line in lines if "eta=" in line)
    assert out.count("evaluating 32 windows of the validation split (train.eval_batches)...") == 3
    assert "val_loss " in out and "(32 windows of the validation split (train.eval_batches), step 30)" in out
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == list(range(1, 31))
    assert all({"loss", "lr", "tokens_per_s", "grad_norm"} <= set(r) and "mfu" not in r for r in train_rows)
    assert 0 < train_rows[0]["startup_s"] < 300 and all("startup_s" not in r for r in train_rows[1:])
    assert [r["step"] for r in rows if "val_loss" in r] == [10, 20, 30]
    assert train_rows[-1]["loss"] < train_rows[0]["loss"]
    assert (run / "loss.png").stat().st_size > 1000
    assert (run / "config.yaml").read_text().count("num_layers: 4") == 1
    ckpts = run / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "step_30"
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step_30"]  # keep_last=1
    assert list((run / "wandb").glob("offline-run-*"))


@dataclass
class KilledRun:
    """A 200-step run killed (SIGKILL) after its step-100 checkpoint and rerun in place, beside the same
    run uninterrupted; shared by the exact-resume and the goodput tests (one set of runs for both)."""

    reference: Path
    run: Path
    lost: dict[int, float]  # step -> step_time_s of the lines the killed run logged after step 100
    wall_s: float  # launch of the killed run -> the rerun's last line of output, measured here
    rerun_stdout: str


@pytest.fixture(scope="module")
def sigkill_run(char_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> KilledRun:
    tmp_path = tmp_path_factory.mktemp("sigkill")
    args = [
        f"data.dir={char_shards}",
        *FAST,
        "train.max_steps=200",
        "train.save_every=100",
        "train.eval_every=0",
        "logging.wandb=disabled",
    ]
    reference = tmp_path / "reference"
    assert run_cli("pretrain.train", *args, f"run.dir={reference}").returncode == 0

    killed = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    began = time.time()
    proc = subprocess.Popen(
        [sys.executable, "-m", "pretrain.train", *args, f"run.dir={killed}"],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    latest = killed / "checkpoints" / "latest"
    deadline = time.time() + 300
    # killed some steps after the step-100 checkpoint: those steps are lost, and trained again
    while not (latest.is_file() and latest.read_text().strip() == "step_100" and max(losses(killed)) >= 110):
        assert proc.poll() is None and time.time() < deadline, "run ended before step 110"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert latest.read_text().strip() == "step_100"
    rows = [json.loads(line) for line in (killed / "metrics.jsonl").read_text().splitlines()]
    lost = {r["step"]: r["step_time_s"] for r in rows if r["step"] > 100 and "step_time_s" in r}

    cmd = [sys.executable, "-m", "pretrain.train", *args, f"run.dir={killed}"]
    with (tmp_path / "rerun.err").open("w") as err:
        rerun = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=err, text=True)
        lines, last_line = [], began
        for line in rerun.stdout:  # the time of its last line: the interpreter's exit after it is not the run's
            lines.append(line)
            last_line = time.time()
        assert rerun.wait(timeout=600) == 0, (tmp_path / "rerun.err").read_text()[-3000:]
    return KilledRun(reference, killed, lost, last_line - began, "".join(lines))


@pytest.mark.slow
def test_sigkill_after_checkpoint_then_rerun_logs_identical_losses(sigkill_run: KilledRun) -> None:
    """The trunk's exact-resume criterion: 200 steps vs killed after step 100 and rerun."""
    assert "resumed from" in sigkill_run.rerun_stdout
    ref, got = losses(sigkill_run.reference), losses(sigkill_run.run)
    assert sorted(got) == list(range(1, 201))  # steps logged after the checkpoint by the killed run were dropped
    assert [got[s] for s in range(101, 201)] == [ref[s] for s in range(101, 201)]


@pytest.mark.slow
def test_goodput_accounts_a_killed_and_resumed_run(sigkill_run: KilledRun) -> None:
    """gpt-goodput on the killed-and-rerun dir: the lost steps exactly, the wall time within 5%."""
    run = sigkill_run.run
    done = run_cli("pretrain.goodput", str(run), "--json")
    assert done.returncode == 0, done.stderr[-3000:]
    acc = json.loads(done.stdout)
    assert acc["recomputed_steps"] == len(sigkill_run.lost) >= 10
    assert abs(acc["recomputed_s"] - sum(sigkill_run.lost.values())) < 1e-9
    assert acc["productive_steps"] == 200 and acc["skipped_steps"] == 0
    assert len(acc["sessions"]) == 2 and acc["saves"] == 2 and acc["evaluations"] == 1 and acc["ended"]
    assert acc["between_sessions_s"] > 0 and acc["startup_s"] > 0 and acc["save_stall_s"] > 0
    rows = ("productive_s", "startup_s", "save_stall_s", "eval_s", "skipped_s", "recomputed_s", "between_sessions_s")
    assert abs(sum(acc[k] for k in (*rows, "other_s")) - acc["total_s"]) < 1e-6  # the rows add up
    assert abs(acc["total_s"] - sigkill_run.wall_s) <= 0.05 * sigkill_run.wall_s, (acc["total_s"], sigkill_run.wall_s)
    assert 0 < acc["other_s"] < 0.05 * acc["total_s"], acc  # little time that no record explains
    assert acc["goodput"] == pytest.approx(acc["productive_s"] / acc["total_s"])
    print(f"goodput: total {acc['total_s']:.1f} s, measured {sigkill_run.wall_s:.1f} s, goodput {acc['goodput']:.3f}")
    assert acc["plot"] == str(run / "goodput.png") and (run / "goodput.png").stat().st_size > 1000
    from pretrain.trainer import goodput  # the table gpt-goodput prints without --json: the same account
    from pretrain.trainer.metrics import read_metrics

    table = goodput.table(goodput.account(read_metrics(run)))
    row = next(line for line in table.splitlines() if line.startswith("recomputed after a failure"))
    assert row.split()[-4:] == [f"{acc['recomputed_s']:.2f}", row.split()[-3], str(len(sigkill_run.lost)), "steps"]
    assert f"goodput = productive / total = {acc['goodput']:.3f}" in table


def test_goodput_refuses_a_bad_run_dir_in_one_line(tmp_path: Path) -> None:
    assert "not a directory" in one_line_error(run_cli("pretrain.goodput", str(tmp_path / "nope")), 2)
    assert "no metrics.jsonl" in one_line_error(run_cli("pretrain.goodput", str(tmp_path)), 2)
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0, "step_time_s": 0.1}\n')
    assert "no session_start event" in one_line_error(run_cli("pretrain.goodput", str(tmp_path)), 2)
    assert "unknown option" in one_line_error(run_cli("pretrain.goodput", str(tmp_path), "--nope"), 2)
    assert not (tmp_path / "goodput.png").exists()


@pytest.mark.slow
def test_bad_inputs_are_one_line_errors(char_shards: Path, tmp_path: Path) -> None:
    corrupt = tmp_path / "corrupt"
    shutil.copytree(char_shards, corrupt)
    shard = sorted(corrupt.glob("train-*.tar"))[0]
    shard.write_bytes(shard.read_bytes()[:5000])
    cases = {
        "missing data dir": ([f"data.dir={tmp_path}/nope"], "nope"),
        "unknown preset": ([f"data.dir={char_shards}", "model=gpt5"], "model=gpt5"),
        "corrupt shard": ([f"data.dir={corrupt}", "data.num_streams=1"], shard.name),
        "bad layout": ([f"data.dir={char_shards}", "train.global_batch=10", "train.micro_batch=4"], "global_batch"),
    }
    for name, (args, culprit) in cases.items():
        run = tmp_path / name.replace(" ", "_")
        result = run_cli("pretrain.train", *args, f"run.dir={run}", "train.max_steps=3", *FAST[3:])
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2, (name, result.stderr[-2000:])
        assert len(lines) == 1 and culprit in lines[0], (name, result.stderr[-2000:])
        assert not (run / "checkpoints" / "latest").exists(), name


@pytest.mark.slow
def test_resume_into_another_model_is_refused(char_shards: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    args = [f"data.dir={char_shards}", f"run.dir={run}", *FAST, "train.max_steps=2", "logging.wandb=disabled"]
    assert run_cli("pretrain.train", *args).returncode == 0
    result = run_cli("pretrain.train", *args, "model.num_layers=2")
    assert result.returncode == 2 and "num_layers=4" in result.stderr


@pytest.mark.slow
def test_bf16_mixed_precision_trains_and_resumes(char_shards: Path, tmp_path: Path) -> None:
    """bf16 weights with fp32 main weights in the optimizer; a resume from the step-3 checkpoint logs
    the uninterrupted run's losses exactly. Also the end-to-end check of remote data: the shards come
    from a local HTTP server, and the resume recognises the shard set at its URL (data/remote.py)."""
    from torch.distributed.checkpoint import FileSystemReader

    run = tmp_path / "run"
    with ShardServer(char_shards.parent) as server:
        args = [
            f"data.dir={server.url}/{char_shards.name}",
            *FAST,
            "train.bf16=true",
            "logging.wandb=disabled",
            "train.save_every=3",
            "train.max_steps=6",  # both runs: the same lr schedule
        ]
        first = run_cli("pretrain.train", *args, f"run.dir={run}")
        assert first.returncode == 0, first.stderr[-3000:]
        # the run dir as a crash after the step-3 checkpoint leaves it (its later lines gone: the resumed
        # run's steps 4-6 are its own)
        resumed = tmp_path / "resumed"
        shutil.copytree(run, resumed)
        shutil.rmtree(resumed / "checkpoints" / "step_6")
        (resumed / "checkpoints" / "latest").write_text("step_3\n")
        metrics = resumed / "metrics.jsonl"
        lines = metrics.read_text().splitlines(keepends=True)
        metrics.write_text("".join(line for line in lines if json.loads(line).get("step", 0) <= 3))
        second = run_cli("pretrain.train", *args, f"run.dir={resumed}")
        assert second.returncode == 0 and "resumed from" in second.stdout, second.stderr[-3000:]
        assert any(name.endswith(".tar") for name in server.requests)  # the shards came over HTTP
    steps, again = losses(run), losses(resumed)
    logged = [r["step"] for r in map(json.loads, metrics.read_text().splitlines()) if "loss" in r]
    assert sorted(steps) == logged == list(range(1, 7)) and steps[6] < steps[1]
    assert [again[s] for s in range(4, 7)] == [steps[s] for s in range(4, 7)]
    # bf16 was in effect: the saved model weights are bf16, the optimizer keeps fp32 main copies of them
    saved = FileSystemReader(str(resumed / "checkpoints" / "step_6")).read_metadata().state_dict_metadata
    dtypes = {name: meta.properties.dtype for name, meta in saved.items() if hasattr(meta, "properties")}  # tensors
    weights = {n: d for n, d in dtypes.items() if n.startswith(("embedding.", "decoder."))}
    main = {n: d for n, d in dtypes.items() if n.startswith("optimizer.state.fp32_param.")}
    assert weights and set(weights.values()) == {torch.bfloat16}, dtypes
    assert {n.removeprefix("optimizer.state.fp32_param.") for n in main} == set(weights)  # one of each
    assert set(main.values()) == {torch.float32}, dtypes
