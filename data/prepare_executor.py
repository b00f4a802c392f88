"""Where gpt-prepare's tasks run: ``executor=local`` (the default) or ``executor=ray``.

Both do the same two jobs for ``data/prepare.py``: turn every unfinished input file into its part
in the work dir (``tokenize``), and run the shard-writing tasks with their results in order
(``map``). Both run the same task code on the same inputs, and a part's bytes depend only on its
file and, with ``dedup=true``, on the files before it: so the output is byte-identical whichever
executor runs it, with any number of workers.

- ``local``: a process pool of ``workers`` on this machine (``data/prepare_pool.py``): the parent
  reads the files in order, the pool tokenizes chunks, dedup is a set of hashes in the parent.
- ``ray``: Ray tasks, one per input file, on a local Ray started for the job or a running cluster
  (``executor.address=``); dedup is a shuffle of hashes by range over Ray tasks
  (``data/prepare_ray.py``). Ray is imported only for ``executor=ray``: it is an optional extra.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor
from pathlib import Path
from typing import Protocol, TypeVar

from conf.errors import UserError
from conf.prepare_schema import PrepareConfig
from data.inputs import InputFile
from data.prepare_dedup import HashSet
from data.prepare_pool import ordered_map, worker_pool
from data.prepare_progress import Progress, tokenize_progress  # noqa: F401
from data.prepare_tokenize import tokenize_files
from data.prepare_work import WorkDir

T = TypeVar("T")
R = TypeVar("R")
RAY_MISSING = "executor=ray: Ray is not installed; pip install -e .[ray] (or pip install 'ray>=2.9')"


class PrepareExecutor(Protocol):
    """What gpt-prepare asks of an executor (see the module docstring)."""

    def running(self, work_path: Path, dtype: str) -> contextlib.AbstractContextManager[None]:
        """Workers ready to load the tokenizer saved in ``work_path`` and write ``dtype`` tokens."""
        ...

    def finished(self, work: WorkDir) -> set[int]:
        """The input files an interrupted run tokenized that this one will not tokenize again."""
        ...

    def tokenize(self, work: WorkDir, files: list[InputFile]) -> None:
        """Every input file not done yet → its finished part, recorded in ``work``."""
        ...

    def map(self, fn: Callable[[T], R], items: Iterable[T]) -> Iterator[R]:
        """``map(fn, items)`` on the workers, in order, a bounded number in flight."""
        ...


class LocalExecutor:
    """A process pool of ``workers`` on this machine (one: the calling process)."""

    def __init__(self, config: PrepareConfig) -> None:
        self.config = config
        self.window = 2 * config.workers + 2
        self.pool: Executor | None = None

    @contextlib.contextmanager
    def running(self, work_path: Path, dtype: str) -> Iterator[None]:
        with worker_pool(self.config.workers, work_path, dtype) as pool:
            self.pool = pool
            try:
                yield
            finally:
                self.pool = None

    def finished(self, work: WorkDir) -> set[int]:
        return set(work.done)  # a file scanned by executor=ray dedup=true is tokenized again

    def tokenize(self, work: WorkDir, files: list[InputFile]) -> None:
        seen = None
        if self.config.dedup:  # the hashes of the files done before (always the first ones)
            seen = HashSet()
            for hashes in work.hashes():
                seen.add_unique(hashes)
        done = work.done
        progress = tokenize_progress(files, self.finished(work))
        todo = [(index, path) for index, path in enumerate(files) if index not in done]
        tokenize_files(work, todo, self.pool, self.window, self.config.text_field, seen, progress)
        progress.close()

    def map(self, fn: Callable[[T], R], items: Iterable[T]) -> Iterator[R]:
        return ordered_map(self.pool, fn, items, self.window)


def check_executor(config: PrepareConfig) -> None:
    """``executor=ray`` without Ray installed: one line naming the install, before any work."""
    if config.executor.name != "ray":
        return
    try:
        import ray  # noqa: F401
    except ImportError:
        raise UserError(RAY_MISSING) from None


@contextlib.contextmanager
def open_executor(config: PrepareConfig) -> Iterator[PrepareExecutor]:
    """The configured executor; for Ray, connected (or a local Ray started) for the ``with`` block."""
    if config.executor.name != "ray":
        yield LocalExecutor(config)
        return
    from data.prepare_ray import RayExecutor, ray_session

    with ray_session(config.executor.address, config.workers) as cpus:
        yield RayExecutor(config, cpus)
