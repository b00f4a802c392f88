"""Shared fixtures: prepared shard sets built once per session from ../shared/data."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"
TINYSHAKESPEARE = SHARED_DATA / "tinyshakespeare.txt"


# Under pytest-xdist (tests/run.sh: two workers), the tests that share an expensive session or module
# fixture run on one worker, so the fixture is built once: a group per fixture.
SHARED_FIXTURE_GROUPS = {  # the first fixture of the list that a test uses names its group
    "trained_runs": "trained-runs",  # session: 3 torchrun trainings, read by eval/export/fine-tuning
    "runs": "parallel-layouts",  # test_parallel's module cache: a layout trained once, resharded later
    "ds_runs": "deepspeed-layouts",  # test_deepspeed's module cache
    "base_run": "faults",
    "sigkill_run": "sigkill-resume",  # test_pretrain_e2e: a run killed and rerun, read by the goodput test
    "moe_runs": "moe-layouts",  # test_moe's module cache
    "results": "bad-inputs",  # test_bad_inputs: every case's command, run concurrently once
}


def pytest_itemcollected(item: pytest.Item) -> None:
    """As each test is collected (before any ``pytest_collection_modifyitems``, where xdist reads the
    groups into the test ids): the group of the expensive fixture it uses, if any."""
    group = next((g for name, g in SHARED_FIXTURE_GROUPS.items() if name in item.fixturenames), None)
    if group is not None:
        item.add_marker(pytest.mark.xdist_group(group))


@pytest.fixture(scope="session", autouse=True)
def megatron_on_cpu() -> None:
    """In-process tests build engines as the commands do: with the CPU compatibility layer applied."""
    from parallel import cpu_compat

    cpu_compat.apply()


@pytest.fixture(scope="module", autouse=True)
def no_process_group_left() -> Iterator[None]:
    """An in-process test that loads a model (gpt-eval's loader does ``Topology.init`` and, like
    the command, never tears down) must not leave its process group to the next test module."""
    yield
    from parallel.topology import Topology

    Topology.destroy()


def prepare_cfg(**overrides: object) -> object:
    base = OmegaConf.load(REPO / "conf" / "prepare.yaml")
    base.pop("defaults")
    return OmegaConf.merge(base, overrides)


@pytest.fixture(scope="session")
def char_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tinyshakespeare, char tokenizer, seq_len 64 (the nanoGPT recipe's data)."""
    from data.prepare import prepare

    out = tmp_path_factory.mktemp("shards") / "ts"
    prepare(prepare_cfg(input=str(TINYSHAKESPEARE), out=str(out), tokenizer="char", seq_len=64))
    return out


@pytest.fixture(scope="session")
def small_char_shards(char_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """8,000 characters of tinyshakespeare with char_shards' tokenizer: a small second source of a
    mixture (one train shard of 112 windows, so it runs through epochs while char_shards does not)."""
    from data.prepare import prepare

    root = tmp_path_factory.mktemp("small")
    text = root / "text.txt"
    text.write_text(TINYSHAKESPEARE.read_text()[:8000])
    tokenizer = f"file:{char_shards / 'tokenizer.json'}"
    prepare(prepare_cfg(input=str(text), out=str(root / "shards"), tokenizer=tokenizer, seq_len=64))
    return root / "shards"


def run_cli(*args: str, timeout: float = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run a console script as a user would (``python -m module``), capturing output."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True, timeout=timeout, env=full_env
    )


def one_line_error(result: subprocess.CompletedProcess, code: int) -> str:
    """The refusal: exit ``code``, no traceback, a single ``error:`` line (warnings aside), read
    from the whole of stderr (not its last line); returns that line."""
    assert result.returncode == code, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and len(result.stderr.strip().splitlines()) <= 4, result.stderr
    return errors[0]


# Small trained runs shared by the export and evaluation tests: char at tp=1 and tp=2 (same seed and
# data, so numerically the same model) and BPE.
TRAIN = [
    "model=tiny",
    "train.micro_batch=4",
    "train.global_batch=8",
    "train.max_steps=40",
    "train.eval_every=0",
    "train.eval_batches=1",
    "train.sample_tokens=0",
    "logging.wandb=disabled",
    "logging.progress_bar=false",
]


@pytest.fixture(scope="session")
def bpe_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from data.prepare import prepare

    root = tmp_path_factory.mktemp("bpe")
    text = root / "text.txt"
    text.write_text(TINYSHAKESPEARE.read_text()[:200_000])
    prepare(prepare_cfg(input=str(text), out=str(root / "shards"), tokenizer="bpe", vocab_size=512, seq_len=64))
    return root / "shards"


@pytest.fixture(scope="session")
def trained_runs(char_shards: Path, bpe_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from tests.distributed import torchrun

    root = tmp_path_factory.mktemp("trained_runs")
    torchrun(1, f"data.dir={char_shards}", f"run.dir={root / 'tp1'}", *TRAIN)
    torchrun(2, f"data.dir={char_shards}", f"run.dir={root / 'tp2'}", *TRAIN, "parallel.tp=2")
    torchrun(1, f"data.dir={bpe_shards}", f"run.dir={root / 'bpe'}", *TRAIN)
    return {name: root / name for name in ("tp1", "tp2", "bpe")}


@pytest.fixture(scope="session")
def llama_tiny_single(char_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """model=llama-tiny trained in one process with test_parallel's settings (10 steps, checkpoints at
    5 and 10): the reference of the llama-tiny layout and DeepSpeed parity tests, trained once."""
    from tests.integration.test_parallel import MODERN, train_layout

    return train_layout(char_shards, tmp_path_factory.mktemp("llama_tiny") / "single", f"{MODERN}:single")


def run_of(cfg: object, world_size: int = 1) -> object:
    """The Run of a composed config in this process (rank 0), as the commands build it."""
    from parallel.run_config import Run

    return Run.from_config(cfg, world_size=world_size, rank=0)


def opened_sources(cfg: object) -> tuple:
    """``data.sources`` of a composed config opened as gpt-pretrain opens them: (sources, identity)."""
    from pretrain.trainer.source_changes import open_sources, resolved_sources

    run = run_of(cfg)
    return open_sources(resolved_sources(run.data), run.model.seq_len)
