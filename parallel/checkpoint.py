"""Run-dir checkpoint layout: ``checkpoints/step_<N>/`` committed atomically, ``latest`` last.

A step is written into ``checkpoints/.step_<N>.tmp`` by every rank (megatron-core
``dist_checkpointing`` shards plus one RNG file per rank), then rank 0 renames it
to ``step_<N>`` and only then rewrites ``latest``. A crash at any point leaves
``latest`` naming the previous complete checkpoint; stale ``.tmp`` directories are
removed on the next save. An async save (``train.async_save``) stages the shards into
shared memory, a writer process writes them while training goes on, and the step is
committed at a later step boundary once every rank's writer has finished.
"""

from __future__ import annotations

import functools
import json
import os
import random
import shutil
import threading
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from data.errors import UserError

LATEST = "latest"
PREFIX = "step_"
TRAIN_STATE = "train_state.json"  # the engine-independent common state (step, data, config, layout)


def _barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def rng_state() -> dict[str, Any]:
    from megatron.core import tensor_parallel

    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    from megatron.core import tensor_parallel

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def read_common(step_dir: Path) -> dict[str, Any]:
    """A step's common state without building an engine: ``train_state.json``, or the
    megatron ``common.pt`` of checkpoints written before that file existed."""
    state = step_dir / TRAIN_STATE
    if state.is_file():
        return json.loads(state.read_text())
    from megatron.core import dist_checkpointing

    return dist_checkpointing.load_common_state_dict(str(step_dir))["common"]


def checkpoint_engine(common: dict[str, Any]) -> str:
    return str(common.get("engine", "megatron"))


class CheckpointDir:
    """``run.dir/checkpoints``: find, save, load and prune step directories."""

    def __init__(self, run_dir: str | Path, keep_last: int = 3):
        self.root = Path(run_dir) / "checkpoints"
        self.keep_last = keep_last
        self._async: Any = None  # megatron-core AsyncCallsQueue, created by the first async save
        self._pending: list[Path] = []
        self._pruner: threading.Thread | None = None

    def _join_pruner(self) -> None:
        if self._pruner is not None:
            self._pruner.join()
            self._pruner = None

    @staticmethod
    def resolve(spec: str | Path) -> Path:
        """``checkpoint=`` as users pass it: a run dir (its ``latest``) or one ``step_<N>`` dir."""
        path = Path(spec).expanduser()
        if (path / "checkpoints").is_dir():
            found = CheckpointDir(path).latest()
            if found is None:
                raise UserError(f"checkpoint={spec}: run dir without a complete checkpoint")
            return found
        if any((path / name).is_file() for name in (TRAIN_STATE, "common.pt", "metadata.json")):
            return path
        raise UserError(f"checkpoint={spec}: not a run dir or a checkpoints/step_<N> dir")

    def latest(self) -> Path | None:
        """The newest complete checkpoint, or None."""
        marker = self.root / LATEST
        if not marker.is_file():
            return None
        path = self.root / marker.read_text().strip()
        if not path.is_dir():
            raise UserError(f"{marker}: names {path.name}, which does not exist")
        return path

    def save(
        self, step: int, engine: Any, common: dict[str, Any], files: tuple[Path, ...] = (), async_save: bool = False
    ) -> Path:
        """Write step ``step``; ``files`` (e.g. the tokenizer) are copied in so the step dir stands alone.

        With ``async_save`` the engine's shards are written by a background process and
        the step is committed (renamed, ``latest`` moved) by :meth:`finalize` once every
        rank's writer is done; until then ``latest`` names the previous complete step.
        One save is in flight at a time: a new one first waits for the previous one.
        """
        self.finalize(blocking=True)
        final = self.root / f"{PREFIX}{step}"
        tmp = self.root / f".{PREFIX}{step}.tmp"
        if _rank() == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            for stale in self.root.glob(f".{PREFIX}*.tmp"):
                shutil.rmtree(stale, ignore_errors=True)
            tmp.mkdir()
        _barrier()
        request = engine.save(tmp, common, async_save=async_save)  # into an empty dir (megatron checks)
        if _rank() == 0:
            for source in files:
                shutil.copy2(source, tmp / source.name)
            (tmp / TRAIN_STATE).write_text(json.dumps(common, indent=1))
        torch.save(rng_state(), tmp / f"rng_rank{_rank()}.pt")
        if request is None:
            self._commit(tmp, final)
            return final
        request.add_finalize_fn(functools.partial(self._commit, tmp, final))
        if self._async is None:
            from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

            from parallel.async_writer import use_writer_process

            self._async = AsyncCallsQueue(persistent=False)
            use_writer_process(self._async)  # staged copy + persistent writer: no fork, no copy-on-write
        self._async.schedule_async_request(request)
        self._pending.append(final)
        return final

    def finalize(self, blocking: bool = False) -> list[Path]:
        """Commit the async saves whose writers are done on every rank (a collective while one
        is pending: call it on all ranks at the same points); returns the committed steps.
        ``blocking`` also waits for the deletion of pruned steps (call it before exiting)."""
        if blocking:
            self._join_pruner()
        if self._async is None or not self._async.get_num_unfinalized_calls():
            return []
        done = self._async.maybe_finalize_async_calls(blocking=blocking)
        committed, self._pending = self._pending[: len(done)], self._pending[len(done) :]
        return committed

    @property
    def pending(self) -> bool:
        return bool(self._pending)

    def _commit(self, tmp: Path, final: Path) -> None:
        """Every rank's files are in ``tmp``: rank 0 renames it and then moves ``latest``."""
        _barrier()
        if _rank() == 0:
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            _fsync_dir(self.root)
            marker_tmp = self.root / f".{LATEST}.tmp"
            marker_tmp.write_text(final.name + "\n")
            os.replace(marker_tmp, self.root / LATEST)
            _fsync_dir(self.root)
            # deleting a large old step takes a while: off the training thread
            self._join_pruner()
            self._pruner = threading.Thread(target=self._prune, name="gpt-checkpoint-prune", daemon=True)
            self._pruner.start()
        _barrier()

    def load(self, path: Path, engine: Any, restore_rng: bool) -> dict[str, Any]:
        common = engine.load(path)
        rng_file = path / f"rng_rank{_rank()}.pt"
        if restore_rng and rng_file.is_file():
            set_rng_state(torch.load(rng_file, weights_only=False))
        return common

    def _prune(self) -> None:
        """Delete all but the newest ``keep_last`` complete steps (never ``latest`` or a .tmp)."""
        steps = sorted(
            (int(p.name[len(PREFIX) :]), p)
            for p in self.root.glob(f"{PREFIX}*")
            if p.is_dir() and p.name[len(PREFIX) :].isdigit()
        )
        for _, path in steps[: max(0, len(steps) - self.keep_last)]:
            shutil.rmtree(path, ignore_errors=True)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
