"""Run-dir checkpoint layout: ``checkpoints/step_<N>/`` committed atomically and verified.

A step is written into ``checkpoints/.step_<N>.tmp`` by every rank (megatron-core
``dist_checkpointing`` shards or DeepSpeed's files, plus one RNG file per rank); rank 0
then writes ``checksums.json`` (sizes and digests the writers computed as they wrote,
see ``parallel/checksums.py``), renames the directory to ``step_<N>`` — the commit — and
only then rewrites ``latest``. A crash at any point leaves the previous steps complete;
a failed save removes its ``.tmp`` at once. ``latest`` is a hint for people: the step a
run resumes from is the newest ``step_<N>`` that passes verification, and a step that
fails it is named in one line and skipped for the next older one. An async save
(``train.async_save``) stages the shards into shared memory, a writer process writes
them while training goes on, and the step is committed at a later step boundary once
every rank's writer has finished.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import os
import random
import re
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException

from conf.errors import RunError, UserError
from parallel import checksums
from parallel.train_state import TRAIN_STATE, TrainState

LATEST = "latest"
PREFIX = "step_"


def _barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


RNG_FORMAT = 2  # 1: pickled Python / numpy objects (loaded through an allow-list); 2: tensors and numbers only


def rng_state() -> dict[str, Any]:
    """This rank's RNG states as tensors, lists and numbers only: the file loads with
    ``torch.load(weights_only=True)``, which never executes code from a run dir."""
    from megatron.core import tensor_parallel

    version, words, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "format": RNG_FORMAT,
        "python": [version, torch.tensor(words, dtype=torch.int64), gauss],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    from megatron.core import tensor_parallel

    if state.get("format") == RNG_FORMAT:
        version, words, gauss = state["python"]
        random.setstate((version, tuple(int(w) for w in words.tolist()), gauss))
        kind, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    else:  # format 1 (earlier versions): the objects themselves
        random.setstate(state["python"])
        np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def load_rng_file(path: Path) -> dict[str, Any]:
    """An ``rng_rank<R>.pt`` of either format, unpickled with ``weights_only=True``: format 1 held
    numpy's state array, so numpy's array reconstructors (data only, no code) are allowed too.
    A file that needs anything else raises instead of running it."""
    core = getattr(np, "_core", None) or np.core
    rebuild = core.multiarray._reconstruct  # pickled as numpy.core.* by numpy 1.x, numpy._core.* by 2.x
    allowed = [
        (rebuild, "numpy.core.multiarray._reconstruct"),
        (rebuild, "numpy._core.multiarray._reconstruct"),
        np.ndarray,
        np.dtype,
        type(np.dtype(np.uint32)),
    ]
    with torch.serialization.safe_globals(allowed):
        return torch.load(path, weights_only=True)


class CheckpointDir:
    """``run.dir/checkpoints``: find, verify, save, load and prune step directories."""

    def __init__(self, run_dir: str | Path, keep_last: int = 3):
        self.root = Path(run_dir) / "checkpoints"
        self.keep_last = keep_last
        self._async: Any = None  # megatron-core AsyncCallsQueue, created by the first async save
        self._pending: list[tuple[Path, Path]] = []  # (tmp, final) of async saves not yet committed
        self._pruner: threading.Thread | None = None

    def _join_pruner(self) -> None:
        if self._pruner is not None:
            self._pruner.join()
            self._pruner = None

    def steps(self) -> list[Path]:
        """Complete step directories (committed by their rename), newest first."""
        if not self.root.is_dir():
            return []
        found = [p for p in self.root.glob(f"{PREFIX}*") if p.is_dir() and p.name[len(PREFIX) :].isdigit()]
        return sorted(found, key=lambda p: int(p.name[len(PREFIX) :]), reverse=True)

    @staticmethod
    def resolve(spec: str | Path) -> Path:
        """``checkpoint=`` as users pass it: a run dir (its newest intact step) or one ``step_<N>`` dir,
        verified; a run dir falls back past a step that fails verification, with a warning line."""
        path = Path(spec).expanduser()
        if (path / "checkpoints").is_dir():
            found, _ = CheckpointDir(path).select()
            if found is None:
                raise UserError(f"checkpoint={spec}: run dir without a complete checkpoint")
            return found
        if any((path / name).is_file() for name in (TRAIN_STATE, "common.pt", "metadata.json")):
            problem = _problem(path)
            if problem:
                raise UserError(f"checkpoint={spec}: {problem}")
            return path
        raise UserError(f"checkpoint={spec}: not a run dir or a checkpoints/step_<N> dir")

    def select(self, older_than: int | None = None) -> tuple[Path | None, list[dict[str, Any]]]:
        """The newest step that passes verification (every rank checks a share of the files and
        all agree), and a ``fallback`` event for each newer one skipped. Raises :class:`RunError`
        when steps exist but none is intact."""
        events: list[dict[str, Any]] = []
        steps = [p for p in self.steps() if older_than is None or int(p.name[len(PREFIX) :]) < older_than]
        for path in steps:
            problem = _problem(path, distributed=True)
            if problem is None:
                return path, events
            events.append(self.fallback(path, problem))
        if steps:
            raise RunError(
                f"{self.root}: no intact checkpoint left ({events[0]['checkpoint']}: {events[0]['reason']}); "
                "move the run dir away or pass run.restart=true to start over"
            )
        return None, events

    def fallback(self, path: Path, problem: str) -> dict[str, Any]:
        """Say (rank 0, one line) that ``path`` is skipped, and return its ``metrics.jsonl`` event."""
        if _rank() == 0:
            print(f"warning: {path} is not intact ({problem}); trying the next older step", file=sys.stderr, flush=True)
        return {"event": "fallback", "checkpoint": path.name, "reason": problem}

    def remove_stale(self) -> None:
        """Rank 0: remove ``.step_<N>.tmp`` dirs a killed or failed save of ours left behind."""
        if _rank() == 0:
            self._remove_tmp_dirs()
        _barrier()

    def _remove_tmp_dirs(self) -> None:
        for stale in self.root.glob(f".{PREFIX}*.tmp"):
            shutil.rmtree(stale, ignore_errors=True)

    def archive(self, run_dir: Path, names: tuple[str, ...]) -> Path | None:
        """Rank 0: move this run's checkpoints and ``names`` (run files) into ``restarted-<time>/``
        (``run.restart=true``): a restart keeps what the earlier run wrote, out of the way."""
        target = None
        if _rank() == 0:
            target = run_dir / time.strftime("restarted-%Y%m%d-%H%M%S")
            target.mkdir()
            for name in ("checkpoints", *names):
                for path in run_dir.glob(name):
                    os.replace(path, target / path.name)
        _barrier()
        return target

    def save(
        self, step: int, engine: Any, state: TrainState, files: tuple[Path, ...] = (), async_save: bool = False
    ) -> Path:
        """Write step ``step``; ``files`` (e.g. the tokenizer) are copied in so the step dir stands alone.

        With ``async_save`` the engine's shards are written by a background process and
        the step is committed (renamed, ``latest`` moved) by :meth:`finalize` once every
        rank's writer is done; until then the previous step is the newest complete one.
        One save is in flight at a time: a new one first waits for the previous one.
        A failed write removes its ``.tmp`` at once and raises :class:`RunError` naming the cause.
        """
        self.finalize(blocking=True)
        final = self.root / f"{PREFIX}{step}"
        tmp = self.root / f".{PREFIX}{step}.tmp"
        try:
            if _rank() == 0:
                self.root.mkdir(parents=True, exist_ok=True)
                self._remove_tmp_dirs()
                tmp.mkdir()
            _barrier()
            handle = engine.save(tmp, state.to_dict(), async_save=async_save)  # into an empty dir (megatron checks)
            if _rank() == 0:
                for source in files:
                    shutil.copy2(source, tmp / source.name)
                state.write(tmp)
            torch.save(rng_state(), tmp / f"rng_rank{_rank()}.pt")
            if handle is None:
                self._commit(tmp, final)
                return final
        except (Exception, CheckpointException) as exc:  # DCP's exception is a BaseException
            raise self._failed(tmp, final, exc) from exc
        handle.on_done(functools.partial(self._commit, tmp, final))
        if self._async is None:
            from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

            from parallel.async_writer import use_writer_process

            self._async = AsyncCallsQueue(persistent=False)
            use_writer_process(self._async)  # staged copy + persistent writer: no fork, no copy-on-write
        handle.schedule(self._async)
        self._pending.append((tmp, final))
        return final

    def _failed(self, tmp: Path, final: Path, exc: BaseException) -> RunError:
        """Remove the half-written step now (a restart in place must find room) and say why, in one line."""
        if _rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        previous = next((p.name for p in self.steps() if p != final), None)
        kept = f"; {previous} is intact" if previous else ""
        return RunError(f"saving {final} failed: {describe_io_error(exc, self.root)}{kept}")

    def finalize(self, blocking: bool = False) -> list[Path]:
        """Commit the async saves whose writers are done on every rank (a collective while one
        is pending: call it on all ranks at the same points); returns the committed steps.
        ``blocking`` also waits for the deletion of pruned steps (call it before exiting)."""
        if blocking:
            self._join_pruner()
        if self._async is None or not self._async.get_num_unfinalized_calls():
            return []
        try:
            done = self._async.maybe_finalize_async_calls(blocking=blocking)
        except (Exception, CheckpointException) as exc:
            tmp, final = self._pending[0]
            raise self._failed(tmp, final, exc) from exc
        committed, self._pending = self._pending[: len(done)], self._pending[len(done) :]
        return [final for _, final in committed]

    @property
    def pending(self) -> bool:
        return bool(self._pending)

    def _commit(self, tmp: Path, final: Path) -> None:
        """Every rank's files are in ``tmp``: rank 0 writes the checksums, renames it, then moves ``latest``.

        A step dir of the same number (one that failed verification and was fallen back from)
        is moved aside to ``step_<N>.superseded-<k>``, never deleted or overwritten.
        """
        _barrier()
        if _rank() == 0:
            checksums.write_manifest(tmp)
            if final.exists():
                aside = next(
                    final.with_name(f"{final.name}.superseded-{k}")
                    for k in itertools.count(1)
                    if not final.with_name(f"{final.name}.superseded-{k}").exists()
                )
                os.replace(final, aside)
                print(f"warning: {final.name} existed (not intact); moved to {aside.name}", file=sys.stderr)
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

    def load(self, path: Path, engine: Any, restore_rng: bool) -> TrainState:
        """Load step ``path`` into ``engine``; the RNG file is read first, so a step refused for it
        leaves the engine untouched."""
        rng_file = path / f"rng_rank{_rank()}.pt"
        rng = load_rng_file(rng_file) if restore_rng and rng_file.is_file() else None
        state = TrainState.from_dict(engine.load(path))
        if rng is not None:
            set_rng_state(rng)
        return state

    def _prune(self) -> None:
        """Delete all but the newest ``keep_last`` complete steps (never a .tmp or a superseded step,
        nor a weights-only step: ``gpt-import`` wrote it, not this run)."""
        for path in self.steps()[self.keep_last :]:
            if not _weights_only(path):
                shutil.rmtree(path, ignore_errors=True)


def _weights_only(path: Path) -> bool:
    try:
        return bool(json.loads((path / TRAIN_STATE).read_text()).get("weights_only", False))
    except (OSError, ValueError, AttributeError):  # no or unreadable state: an ordinary step to prune
        return False


def _problem(path: Path, distributed: bool = False) -> str | None:
    """What is wrong with a step dir (one line), or None; with ``distributed`` the ranks split
    the files and agree. A step written before checksums existed loads unverified, with a warning."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed and dist.is_initialized() else (0, 1)
    try:
        problems = checksums.verify(path, rank, world)
    except checksums.CorruptCheckpoint as exc:
        problems = [str(exc)]
    if world > 1:
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, problems)
        problems = None if all(g is None for g in gathered) else sorted(p for g in gathered for p in g or [])
    if problems is None:
        if rank == 0:
            print(
                f"warning: {path} has no {checksums.MANIFEST} (written before checksums): loading it unverified",
                file=sys.stderr,
                flush=True,
            )
        return None
    if problems:
        more = f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""
        return problems[0] + more
    return None


def describe_io_error(exc: BaseException, root: Path) -> str:
    """The OS-level cause of a failed write (``no space left on device`` and the path), found
    in the exception chain (torch and DCP wrap it), else the free space, else the last line."""
    seen: list[BaseException] = []
    todo: list[Any] = [exc]
    while todo:
        item = todo.pop()
        if not isinstance(item, BaseException) or item in seen:
            continue
        seen.append(item)
        if isinstance(item, OSError) and item.errno:
            where = f" ({item.filename})" if item.filename else ""
            return f"{os.strerror(item.errno).lower()}{where}"
        found = re.search(r"\[Errno (\d+)\]", str(item))  # a writer process's error, passed on as text
        if found:
            return f"{os.strerror(int(found.group(1))).lower()} ({root})"
        failures = [f for v in getattr(item, "failures", {}).values() for f in (v if isinstance(v, tuple) else (v,))]
        todo += [item.__cause__, item.__context__, *failures, *item.args]
    with contextlib.suppress(OSError):
        if shutil.disk_usage(root if root.exists() else root.parent).free < 64 << 20:
            return f"no space left on device ({root})"
    return one_line(exc)


def one_line(exc: BaseException) -> str:
    """An exception raised deep in torch or megatron, as one line: its type and last line."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[-1] if lines else ''}"[:300]


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
