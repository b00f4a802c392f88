"""gpt-prepare ``executor=ray`` on a real local Ray of 2 workers: the same bytes as ``executor=local``
with and without dedup, a worker killed mid-job, a failed job resumed, and no Ray installed.

One Ray start (seconds) serves the whole module: ``prepare()`` uses a Ray already initialised in
its process as it is. The module's tests stay on one pytest-xdist worker (their xdist group).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from conf.errors import UserError
from data.prepare import prepare
from data.shards import load_manifest
from tests.conftest import REPO, TINYSHAKESPEARE, one_line_error, prepare_cfg

pytestmark = pytest.mark.xdist_group("prepare-ray")
DELAY_HOOK = "GPT_FAULT_PREPARE_TASK_DELAY_MS"  # data/prepare_ray.py


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[None]:
    """A local Ray of 2 CPUs (2 workers) for the module, as ``executor.address=null`` starts one."""
    import logging

    ray = pytest.importorskip("ray")
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level=logging.WARNING)
    yield
    ray.shutdown()


@pytest.fixture
def small_pieces(monkeypatch: pytest.MonkeyPatch) -> None:
    """Documents cut into pieces and chunks a hundredth of the real size (the Ray tasks cut them as
    the driver says): long documents span chunks, and their hashes are made of several pieces'."""
    import data.corpus

    monkeypatch.setattr(data.corpus, "PIECE_CHARS", 300)
    monkeypatch.setattr(data.corpus, "CHUNK_CHARS", 2000)


def _outputs(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


def _corpus(root: Path) -> None:
    """Two input files (.jsonl.gz, .jsonl.zst) of shuffled tinyshakespeare lines, with exact and
    normalised duplicates within each file and across the two, long documents among them."""
    import gzip
    import random

    import zstandard

    lines = TINYSHAKESPEARE.read_text()[:100_000].split("\n")
    rng = random.Random(0)
    docs = ["\n".join(rng.choice(lines) for _ in range(rng.randint(1, 60))) for _ in range(100)]
    docs += [docs[i].upper() for i in range(0, 100, 7)] + [docs[i] for i in range(3, 100, 11)]
    rng.shuffle(docs)
    root.mkdir()
    with gzip.open(root / "a.jsonl.gz", "wt", encoding="utf-8") as f:
        f.writelines(json.dumps({"text": d}) + "\n" for d in docs[:60])
    packed = "".join(json.dumps({"text": d}) + "\n" for d in docs[60:]).encode()
    (root / "b.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(packed))


@pytest.mark.parametrize("dedup", [False, True], ids=["no-dedup", "dedup"])
def test_ray_writes_the_bytes_of_the_local_pool(
    tmp_path: Path, ray_cluster: None, small_pieces: None, dedup: bool
) -> None:
    _corpus(tmp_path / "src")
    cfg = {"input": str(tmp_path / "src"), "tokenizer": "bpe", "vocab_size": 300, "seq_len": 16, "dedup": dedup}
    prepare(prepare_cfg(out=str(tmp_path / "local"), workers=1, **cfg))
    prepare(prepare_cfg(out=str(tmp_path / "ray"), executor="ray", workers=2, **cfg))
    assert _outputs(tmp_path / "ray") == _outputs(tmp_path / "local")
    source = load_manifest(tmp_path / "ray").raw["source"]
    assert (source["num_duplicates"] > 10) == dedup, source
    assert not (tmp_path / ".ray.gpt-prepare-work").exists()


def _tokenize_tasks() -> list[psutil.Process]:
    """This process's Ray workers running a tokenize task now (Ray titles a busy worker ``ray::TASK``)."""
    found = []
    for proc in psutil.Process().children(recursive=True):
        try:
            if proc.cmdline()[:1] and proc.cmdline()[0].startswith("ray::tokenize_part"):
                found.append(proc)
        except psutil.Error:
            continue
    return found


def test_a_worker_killed_mid_job_changes_no_byte(
    tmp_path: Path, ray_cluster: None, small_pieces: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    _corpus(tmp_path / "src")
    cfg = {"input": str(tmp_path / "src"), "tokenizer": "char", "seq_len": 16, "dedup": True}
    prepare(prepare_cfg(out=str(tmp_path / "local"), **cfg))
    monkeypatch.setenv("GPT_TEST_HARNESS", "1")
    monkeypatch.setenv(DELAY_HOOK, "3000")  # each file's task pauses 3 s after its first chunk
    both, killed = [], []

    def kill_one_when_both_run() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not killed:
            running = _tokenize_tasks()
            if len(running) == 2:  # the two files on the two workers at once
                both.append([p.pid for p in running])
                time.sleep(0.5)  # mid-file: past the first chunk, in the pause
                os.kill(running[0].pid, signal.SIGKILL)
                killed.append(running[0].pid)
            time.sleep(0.05)

    killer = threading.Thread(target=kill_one_when_both_run, daemon=True)
    killer.start()
    prepare(prepare_cfg(out=str(tmp_path / "ray"), executor="ray", workers=2, **cfg))
    killer.join()
    assert killed and not psutil.pid_exists(killed[0]), (both, killed)
    assert _outputs(tmp_path / "ray") == _outputs(tmp_path / "local")


@pytest.mark.parametrize("resumed_by", ["ray", "local"])
def test_a_failed_ray_job_resumes_without_redoing_finished_files(
    tmp_path: Path, ray_cluster: None, capsys: pytest.CaptureFixture[str], resumed_by: str
) -> None:
    """A bad line in the second file fails the job after the first is scanned; resumed (by either
    executor: the work dir is the same format), the shards are those of a run that never failed."""
    src = tmp_path / "src"
    src.mkdir()
    docs = [" ".join(f"w{i * j % 97}" for j in range(40)) for i in range(80)]
    (src / "a.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs[:40] + docs[:5]))
    (src / "b.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs[35:]) + "{broken\n")
    cfg = {"input": str(src), "tokenizer": "byte", "seq_len": 16, "dedup": True, "executor": "ray", "workers": 2}
    out = tmp_path / "out"
    with pytest.raises(UserError, match=r"b\.jsonl:46: invalid JSON.*1 of 2 input files done and kept"):
        prepare(prepare_cfg(out=str(out), **cfg))
    record = json.loads((tmp_path / ".out.gpt-prepare-work" / "progress.json").read_text())
    assert [entry["index"] for entry in record["scanned"]] == [0] and not out.exists()

    (src / "b.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs[35:]))
    capsys.readouterr()
    prepare(prepare_cfg(out=str(out), **{**cfg, "executor": resumed_by}))
    resumed = "resuming: 1 of 2 input files already tokenized" in capsys.readouterr().out
    assert resumed == (resumed_by == "ray")  # the local pool tokenizes a file scanned for Ray's dedup again
    prepare(prepare_cfg(out=str(tmp_path / "local"), **{**cfg, "executor": "local", "workers": 1}))
    assert _outputs(out) == _outputs(tmp_path / "local")
    assert load_manifest(out).raw["source"]["num_duplicates"] == 10


def test_executor_ray_without_ray_is_one_line(tmp_path: Path) -> None:
    """As where Ray is not installed: an import blocker in a fresh interpreter, the command line's spelling."""
    (tmp_path / "a.txt").write_text("some text " * 50)
    blocked = "import sys; sys.modules['ray'] = None; from data.prepare import main; main()"
    args = [f"input={tmp_path / 'a.txt'}", f"out={tmp_path / 'out'}", "executor=ray", "executor.address=auto"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-c", blocked, *args], cwd=REPO, capture_output=True, text=True, timeout=120, env=env
    )
    assert "pip install -e .[ray]" in one_line_error(result, 2)
    assert not (tmp_path / "out").exists() and not (tmp_path / ".out.gpt-prepare-work").exists()
