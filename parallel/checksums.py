"""Checkpoint checksums: computed by the writers as they write, verified before a load.

A bit flip or a truncated file in a checkpoint otherwise loads silently (same-size rot)
or fails deep inside torch with an error that names no file. Every file of a step gets
its size and an xxh3-64 digest (xxhash: checksum-class speed, well above disk bandwidth):

- the large files (megatron-core ``.distcp`` shards, DeepSpeed model / optimizer states)
  are hashed *while they are written*, by whichever process writes them (forked writers,
  the async writer process), which leaves a small sidecar ``<file>.xxh3`` beside each;
- at commit, rank 0 folds the sidecars into ``checksums.json`` and hashes the few small
  files that have none (metadata, RNG states, the train state, the tokenizer).

Verification reads every listed file once (split over the ranks) and compares.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import xxhash

from data.safe_paths import is_safe_name

MANIFEST = "checksums.json"
SIDECAR = ".xxh3"
ALGORITHM = "xxh3_64"
_CHUNK = 1 << 20


class HashingFile:
    """A binary file opened for writing that hashes what goes through ``write``.

    Writers here only append (torch's zip writer and DCP's item writer write sequentially
    and ask ``tell``); a ``seek`` marks the digest unusable and the file is hashed again
    from disk at close, so a writer that rewrites a header can never produce a wrong sum.
    """

    def __init__(self, path: str | os.PathLike, raw: Any):
        self.path = os.fspath(path)
        self._raw = raw
        self._hash = xxhash.xxh3_64()
        self._size = 0
        self._sequential = True

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        written = self._raw.write(view)
        written = len(view) if written is None else written
        self._hash.update(view[:written])
        self._size += written
        return written

    def seek(self, *args: Any) -> int:
        self._sequential = False
        return self._raw.seek(*args)

    def close(self) -> None:
        if self._raw.closed:
            return
        self._raw.close()
        digest = self._hash.hexdigest() if self._sequential else file_digest(self.path)
        size = self._size if self._sequential else os.path.getsize(self.path)
        Path(self.path + SIDECAR).write_text(json.dumps({"size": size, ALGORITHM: digest}))

    def __getattr__(self, name: str) -> Any:  # tell, flush, fileno, writable, ...
        return getattr(self._raw, name)

    def __enter__(self) -> HashingFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def hashing_open(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
    """``open`` that returns a :class:`HashingFile` for binary writes to a path."""
    raw = open(file, mode, *args, **kwargs)  # noqa: SIM115 - owned by the wrapper
    if "w" in mode and "b" in mode and isinstance(file, str | os.PathLike):
        return HashingFile(file, raw)
    return raw


def hash_megatron_writes() -> None:
    """Make megatron-core's shard writer (``FileSystemWriterAsync.write_preloaded_data``,
    which opens each ``.distcp`` file with the builtin ``open``) write through
    :func:`hashing_open`. Idempotent; must run in every process that writes shards."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if "open" in inspect.unwrap(filesystem_async.FileSystemWriterAsync.write_preloaded_data).__code__.co_names:
        filesystem_async.open = hashing_open  # type: ignore[attr-defined]
    else:  # a megatron-core upgrade changed how shards are opened: say so instead of writing unhashed
        raise RuntimeError("megatron-core's FileSystemWriterAsync no longer opens files with open(): update checksums")


def hashing_torch_save(save: Callable[..., Any]) -> Callable[[Any, str], None]:
    """A DeepSpeed ``checkpoint_engine.save(state_dict, path)`` that hashes as it writes."""
    import torch

    def save_hashed(state_dict: Any, path: str) -> None:
        with hashing_open(path, "wb") as stream:
            torch.save(state_dict, stream)

    save_hashed.__wrapped__ = save  # type: ignore[attr-defined]
    return save_hashed


def file_digest(path: str | os.PathLike) -> str:
    """Read through one reused buffer (a fresh ``bytes`` per chunk halves the throughput)."""
    digest = xxhash.xxh3_64()
    buffer = bytearray(_CHUNK)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as stream:
        while count := stream.readinto(buffer):
            digest.update(view[:count])
    return digest.hexdigest()


def _files(directory: Path) -> Iterator[Path]:
    for path in sorted(directory.rglob("*")):
        if path.is_file() and path.name not in (MANIFEST, f".{MANIFEST}.tmp") and not path.name.endswith(SIDECAR):
            yield path


def write_manifest(directory: Path) -> dict[str, dict[str, Any]]:
    """Fold the writers' sidecars into ``checksums.json`` (hashing files that have none)."""
    files: dict[str, dict[str, Any]] = {}
    for path in _files(directory):
        sidecar = Path(str(path) + SIDECAR)
        entry = json.loads(sidecar.read_text()) if sidecar.is_file() else None
        if entry is None or entry["size"] != path.stat().st_size:
            entry = {"size": path.stat().st_size, ALGORITHM: file_digest(path)}
        files[path.relative_to(directory).as_posix()] = entry
        sidecar.unlink(missing_ok=True)
    tmp = directory / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps({"algorithm": ALGORITHM, "files": files}, indent=0))
    with open(tmp, "rb") as stream:
        os.fsync(stream.fileno())
    os.replace(tmp, directory / MANIFEST)
    return files


def read_manifest(directory: Path) -> dict[str, dict[str, Any]] | None:
    """The step's checksum list, or None for a step written before checksums existed."""
    path = directory / MANIFEST
    if not path.is_file():
        return None
    try:
        files = dict(json.loads(path.read_text())["files"])
    except (ValueError, KeyError, TypeError) as exc:
        raise CorruptCheckpoint(f"{path}: unreadable ({exc})") from None
    unsafe = next((name for name in files if not is_safe_name(name, subdirs=True)), None)
    if unsafe is not None:  # names become paths we read: a crafted "../x" must stay out
        raise CorruptCheckpoint(f"{path}: names a file outside the step ({unsafe!r})")
    return files


class CorruptCheckpoint(Exception):
    """A step directory that fails verification (one line: which file, what is wrong)."""


def verify_files(directory: Path, names: list[str], files: dict[str, dict[str, Any]]) -> list[str]:
    """Problems with ``names`` (subset of the manifest): missing, wrong size, wrong digest."""
    problems = []
    for name in names:
        path, expected = directory / name, files[name]
        with contextlib.suppress(OSError):
            size = path.stat().st_size
            if size != expected["size"]:
                problems.append(f"{name}: {size} bytes, {expected['size']} written")
            elif file_digest(path) != expected[ALGORITHM]:
                problems.append(f"{name}: checksum mismatch")
            continue
        problems.append(f"{name}: missing or unreadable")
    return problems


def verify(directory: Path, rank: int = 0, world_size: int = 1, only: tuple[str, ...] = ()) -> list[str] | None:
    """This rank's share of the verification of ``directory`` (every ``world_size``-th file);
    ``only`` restricts it to those names. None when the step has no checksums."""
    files = read_manifest(directory)
    if files is None:
        return None
    names = [n for n in sorted(files) if not only or n in only]
    return verify_files(directory, names[rank::world_size], files)
