"""The work of one distributed task (``executor=ray``, ``data/prepare_ray.py``), without Ray itself.

Every function here reads and writes the work dir (``data/prepare_work.py``) and returns a small
record, so that a task is a pure function of its arguments and the files it reads: a retried task
(its worker killed) writes the same bytes again. The tokens come from the same code as the local
pool's (``encode_chunk``, ``FilePart``), which is what makes the two executors' output identical.

Global exact dedup is a map/reduce over hash ranges:

1. :func:`tokenize_part` scans a file: all its documents' tokens (``.raw``), each document's hash
   (``.dochash``, the local pool's hash of it) and where its tokens end (``.docend``);
2. :func:`partition_hashes` splits the (hash, position) rows of a batch of files by hash range, the
   position being ``file << 40 | document``;
3. :func:`reduce_range` sorts one range's rows by (hash, position): the first of each hash is kept,
   every later one is a duplicate (``dedup-RRRRR.drops``, sorted positions) — exactly the documents
   the local pool drops, which keeps the first copy in file and document order;
4. :func:`filter_part` cuts a scanned file's duplicates out of its tokens: the local pool's part.

A finished file (its part done by an earlier run) takes part with its kept documents' hashes: those
are the distinct hashes of the file not seen before it, so the set of hashes before any position is
the same, and since finished files are always the first ones (``prepare_work``) none of theirs drop.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path
from typing import Any

import numpy as np

import data.corpus
from conf.errors import UserError
from data.corpus import chunks, file_pieces
from data.inputs import InputFile
from data.prepare_pool import _STATE, encode_chunk, init_worker
from data.prepare_tokenize import FilePart
from data.prepare_work import WorkDir

POSITION_BITS = 40  # documents per file < 2**40, files < 2**24
COPY_TOKENS = 1 << 24  # a kept run of tokens is copied this many at a time (bounded memory)
Setup = tuple[str, str, tuple[int, int]]  # (work dir, token dtype, (PIECE_CHARS, CHUNK_CHARS))


class KeepAll:
    """A ``HashSet`` stand-in that keeps every document: a scan records all of them, the reduce decides."""

    def first_seen(self, values: np.ndarray) -> np.ndarray:
        return np.ones(len(values), dtype=bool)


def setup_worker(setup: Setup) -> WorkDir:
    """Load the tokenizer from the work dir once per worker process; the work dir as a task sees it.

    The work dir must be the driver's: on a cluster, a filesystem every node mounts (one line naming
    the node otherwise). Pieces and chunks are cut as the driver's ``data.corpus`` says (the tests
    shrink them), so a driver and its workers never cut a document differently."""
    work_path, dtype, (piece_chars, chunk_chars) = setup
    data.corpus.PIECE_CHARS, data.corpus.CHUNK_CHARS = piece_chars, chunk_chars
    if _STATE.get("key") != (work_path, dtype):
        if not Path(work_path).is_dir():
            raise UserError(
                f"work_dir={work_path}: not found on node {socket.gethostname()}; on a cluster, out= (or "
                "work_dir=) must be on a filesystem that every node mounts"
            )
        os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per task: the tasks are the parallelism
        init_worker(work_path, dtype, in_worker=False)
    return WorkDir(Path(work_path), {}, -1)


def tokenize_part(setup: Setup, index: int, path: InputFile, text_field: str, scan: bool, delay_s: float) -> dict:
    """Tokenize one input file into ``part-NNNNNN.bin.partial`` (``scan``: with every document, plus
    its hashes and document ends, for the global dedup); returns the part's record entry.

    ``delay_s`` (a test hook, 0 in production) pauses after the first chunk, so a test can kill the
    worker mid-file."""
    work = setup_worker(setup)
    tokenizer = _STATE["tokenizer"]
    try:
        part = FilePart(work, index, path, scan)
    except OSError as exc:
        raise UserError(f"{path}: cannot read on node {socket.gethostname()} ({exc.strerror})") from exc
    ends_file = open(work.path / f"{work.part(index, 'docend').name}.partial", "wb") if scan else None  # noqa: SIM115
    offset, keep_all = 0, KeepAll()
    pieces = file_pieces(path, text_field)
    try:
        for number, (texts, ends) in enumerate(chunks(pieces)):
            result = encode_chunk((texts, ends, scan))
            part.count_unknown(result[0], texts, tokenizer)
            part.add(result, keep_all if scan else None)  # type: ignore[arg-type]
            if ends_file is not None:
                lengths, ends_array = result[1], result[2]
                ends_file.write((offset + np.cumsum(lengths)[ends_array]).astype("<u8").tobytes())
                offset += int(lengths.sum())
            if number == 0 and delay_s > 0:
                time.sleep(delay_s)
    finally:
        pieces.close()
        part.writer.close()
        if ends_file is not None:
            ends_file.close()
    return part.entry()


def partition_hashes(setup: Setup, files: list[tuple[int, str]], ranges: int) -> list[np.ndarray]:
    """The (hash, position) rows of ``files`` (``(index, kind)``: ``dochash`` of a scanned file,
    ``hashes`` of a finished one), one ``[2, n]`` uint64 array per hash range (``hash % ranges``)."""
    work = setup_worker(setup)
    hashes, positions = [], []
    for index, kind in files:
        values = np.fromfile(work.part(index, kind), dtype="<u8")
        hashes.append(values)
        positions.append(np.uint64(index << POSITION_BITS) | np.arange(len(values), dtype=np.uint64))
    rows = np.stack([np.concatenate(hashes), np.concatenate(positions)]) if hashes else np.zeros((2, 0), np.uint64)
    bucket = rows[0] % np.uint64(ranges)
    order = np.argsort(bucket, kind="stable")
    counts = np.bincount(bucket.astype(np.int64), minlength=ranges)
    return np.split(rows[:, order], np.cumsum(counts)[:-1], axis=1)


def drops_path(work: WorkDir, number: int) -> Path:
    return work.path / f"dedup-{number:05d}.drops"


def reduce_range(setup: Setup, number: int, *parts: np.ndarray) -> int:
    """One hash range: every row whose hash came at an earlier position is a duplicate. Writes their
    positions, sorted, to ``dedup-RRRRR.drops``; returns how many."""
    work = setup_worker(setup)
    rows = np.concatenate(parts, axis=1) if parts else np.zeros((2, 0), np.uint64)
    order = np.lexsort((rows[1], rows[0]))  # by hash, then position
    hashes, positions = rows[0][order], rows[1][order]
    later = np.zeros(len(hashes), dtype=bool)
    later[1:] = hashes[1:] == hashes[:-1]
    drops = np.sort(positions[later]).astype("<u8")
    final = drops_path(work, number)
    partial = final.with_name(final.name + ".partial")
    drops.tofile(partial)
    os.replace(partial, final)
    return len(drops)


def dropped_documents(work: WorkDir, index: int, ranges: int) -> np.ndarray:
    """The duplicate documents of file ``index``, by number within the file, from every range's drops."""
    lo, hi = np.uint64(index << POSITION_BITS), np.uint64((index + 1) << POSITION_BITS)
    found = []
    for number in range(ranges):
        path = drops_path(work, number)
        if path.stat().st_size == 0:
            continue
        drops = np.memmap(path, dtype="<u8", mode="r")
        a, b = np.searchsorted(drops, lo), np.searchsorted(drops, hi)
        found.append(np.array(drops[a:b]) - lo)
        del drops
    return np.sort(np.concatenate(found)).astype(np.int64) if found else np.zeros(0, np.int64)


def filter_part(setup: Setup, index: int, ranges: int, scanned: dict[str, Any]) -> dict:
    """A scanned file's part without its duplicates (``part-NNNNNN.bin.partial`` and the kept
    hashes' ``.hashes.partial``, as the local pool writes them); returns the part's record entry."""
    work = setup_worker(setup)
    dtype = _STATE["dtype"]
    ends = np.fromfile(work.part(index, "docend"), dtype="<u8").astype(np.int64)
    hashes = np.fromfile(work.part(index, "dochash"), dtype="<u8")
    keep = np.ones(len(ends), dtype=bool)
    keep[dropped_documents(work, index, ranges)] = False
    starts = np.concatenate([[0], ends[:-1]]).astype(np.int64)
    edges = np.flatnonzero(np.diff(np.concatenate([[0], keep.view(np.int8), [0]])))  # kept runs of documents
    kept_tokens = 0
    with open(work.path / f"{work.part(index).name}.partial", "wb") as out:
        if len(ends):
            raw = np.memmap(work.part(index, "raw"), dtype=dtype, mode="r")
            for first, stop in zip(edges[::2], edges[1::2], strict=True):
                for a in range(int(starts[first]), int(ends[stop - 1]), COPY_TOKENS):
                    b = min(a + COPY_TOKENS, int(ends[stop - 1]))
                    out.write(np.ascontiguousarray(raw[a:b]).tobytes())
                    kept_tokens += b - a
            del raw
    hashes[keep].astype("<u8").tofile(work.path / f"{work.part(index, 'hashes').name}.partial")
    kept = int(keep.sum())
    scanned = {k: v for k, v in scanned.items() if k != "index"}  # stat, unknown tokens: the scan's
    return {**scanned, "tokens": kept_tokens, "documents": kept, "duplicates": len(keep) - kept}
