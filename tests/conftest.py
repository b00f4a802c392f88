"""Shared fixtures: prepared shard sets built once per session from ../shared/data."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"
TINYSHAKESPEARE = SHARED_DATA / "tinyshakespeare.txt"


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


def run_cli(*args: str, timeout: float = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run a console script as a user would (``python -m module``), capturing output."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True, timeout=timeout, env=full_env
    )
