"""One input file → one part of the token stream (``data/prepare_work.py``), tokenized by the pool.

The parent reads and chunks the documents, the workers tokenize (and hash) the chunks, the parent
takes the results in order, drops duplicates and appends the tokens to the part file: memory is a
few chunks, whatever the size of the file.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from concurrent.futures import Executor
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np
from tqdm import tqdm

from conf.errors import UserError
from data.corpus import chunks, file_pieces
from data.inputs import InputFile, stat_of
from data.prepare_dedup import HashSet, combine
from data.prepare_pool import encode_chunk, ordered_map_keyed
from data.prepare_progress import Progress
from data.prepare_work import WorkDir
from data.tokenizer import Tokenizer

UNKNOWN_EXAMPLES = 5  # characters shown in the unknown-token report
SMALL_UNKNOWN_SHARE = 1e-4  # above this share of the tokens, text lost to the unknown token is a warning


@dataclass
class OpenDocument:
    """A document whose pieces came in earlier chunks: where its tokens start, its pieces' hashes."""

    start: int
    hashes: list[np.ndarray] = field(default_factory=list)


class PartWriter:
    """Appends tokens to ``part-NNNNNN.bin.partial`` (and kept hashes to ``.hashes.partial``)."""

    def __init__(self, work: WorkDir, index: int, dedup: bool) -> None:
        self.tokens = 0
        self.bin = self._open(work.path / f"{work.part(index).name}.partial")
        self.hashes = self._open(work.path / f"{work.part(index, 'hashes').name}.partial") if dedup else None

    @staticmethod
    def _open(path: Path) -> BinaryIO:
        try:
            return open(path, "wb")  # noqa: SIM115 - closed in close()
        except OSError as exc:
            raise UserError(f"{path}: cannot write ({exc.strerror})") from exc

    def write(self, tokens: np.ndarray) -> None:
        self.bin.write(tokens.tobytes())
        self.tokens += len(tokens)

    def truncate(self, tokens: int, itemsize: int) -> None:
        """Drop everything after the first ``tokens`` tokens (a long document found to be a duplicate)."""
        self.bin.seek(tokens * itemsize)
        self.bin.truncate()
        self.tokens = tokens

    def close(self) -> None:
        for handle in (self.bin, self.hashes):
            if handle is not None and not handle.closed:
                handle.flush()
                handle.close()


class FilePart:
    """The part being written for one input file, and its counts."""

    def __init__(self, work: WorkDir, index: int, path: InputFile, dedup: bool) -> None:
        self.index, self.stat = index, stat_of(path)
        self.writer = PartWriter(work, index, dedup)
        self.documents = self.duplicates = 0
        self.open_doc: OpenDocument | None = None
        self.unknown, self.unknown_examples = 0, []  # the unknown token's count, a few characters that became it

    def count_unknown(self, tokens: np.ndarray, texts: list[str], tokenizer: Tokenizer) -> None:
        """A tokenizer given by ``file:`` may lack characters of this corpus: they all become its
        unknown token, which gpt-prepare reports (:func:`report_unknown`) rather than let pass silently."""
        if tokenizer.unk_id is None:
            return
        found = int(np.count_nonzero(tokens == tokenizer.unk_id))
        self.unknown += found
        if found and len(self.unknown_examples) < UNKNOWN_EXAMPLES:
            more = tokenizer.unknown_examples(texts, UNKNOWN_EXAMPLES)
            self.unknown_examples = sorted(set(self.unknown_examples) | set(more))[:UNKNOWN_EXAMPLES]

    def add(self, result: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray], seen: HashSet | None) -> None:
        tokens, lengths, ends, hashes = result
        if seen is None:
            self.writer.write(tokens)
            self.documents += int(ends.sum())
            return
        kept, dropped, self.open_doc = _dedup_chunk(self.writer, tokens, lengths, ends, hashes, seen, self.open_doc)
        self.documents += kept
        self.duplicates += dropped

    def entry(self) -> dict:
        return {
            "stat": self.stat,
            "tokens": self.writer.tokens,
            "documents": self.documents,
            "duplicates": self.duplicates,
            "unknown": self.unknown,
            "unknown_examples": self.unknown_examples,
        }


def tokenize_files(
    work: WorkDir,
    todo: list[tuple[int, InputFile]],
    executor: Executor | None,
    window: int,
    text_field: str,
    seen: HashSet | None,
    progress: Progress,
) -> None:
    """Tokenize the ``(index, path)`` input files into their parts, recording each as done when it
    is: one stream of chunks through the pool, so that workers do not wait at file boundaries."""
    dedup = seen is not None
    paths = dict(todo)
    tokenizer = work.tokenizer()

    def tasks() -> Iterator[tuple[tuple[int, list[str]], tuple[list[str], list[bool], bool] | None]]:
        for index, path in todo:
            pieces = file_pieces(path, text_field, progress.update)
            try:
                for texts, ends in chunks(pieces):
                    yield (index, texts), (texts, ends, dedup)  # the key keeps the texts: unknown examples
            finally:
                pieces.close()
            yield (index, []), None  # the end of this file

    part: FilePart | None = None
    try:
        for (index, texts), result in ordered_map_keyed(executor, encode_chunk, tasks(), window):
            if part is None:
                part = FilePart(work, index, paths[index], dedup)
            if result is not None:
                part.count_unknown(result[0], texts, tokenizer)
                part.add(result, seen)
                continue
            part.writer.close()
            work.finish_part(index, part.entry())
            part = None
    finally:
        if part is not None:
            part.writer.close()
    report_unknown(list(work.done.values()), tokenizer)


def report_unknown(entries: list[dict], tokenizer: Tokenizer) -> None:
    """One line (every input file, resumed ones too) when text became the unknown token: a ``warning:``
    above a small share, else a ``note:``."""
    unknown = sum(entry.get("unknown", 0) for entry in entries)  # a part recorded before counting: 0
    if not unknown:
        return
    total = max(sum(entry["tokens"] for entry in entries), 1)
    examples = sorted({c for entry in entries for c in entry.get("unknown_examples", [])})[:UNKNOWN_EXAMPLES]
    what = "characters" if tokenizer.kind == "char" else "tokens"
    shown = f" (e.g. {', '.join(repr(c) for c in examples)})" if examples else ""
    level = "warning" if unknown / total > SMALL_UNKNOWN_SHARE else "note"
    tqdm.write(
        f"{level}: {unknown:,} of {total:,} {what} ({unknown / total:.2%}) are not in the tokenizer's vocabulary "
        f"and became its unknown token{shown}",
        file=sys.stderr,
    )


def _dedup_chunk(
    writer: PartWriter,
    tokens: np.ndarray,
    lengths: np.ndarray,
    ends: np.ndarray,
    hashes: np.ndarray,
    seen: HashSet,
    open_doc: OpenDocument | None,
) -> tuple[int, int, OpenDocument | None]:
    """Write a chunk's tokens without its duplicate documents; returns (kept, dropped, the open document).

    A chunk holds whole documents, and possibly the end of one that began in an earlier chunk
    (``open_doc``, already written: truncated away if it is a duplicate) and the start of one that
    goes on in the next (written now, decided later)."""
    last_ends = np.flatnonzero(ends)
    if len(last_ends) == 0:  # the whole chunk continues one long document
        if open_doc is None:
            open_doc = OpenDocument(writer.tokens)
        open_doc.hashes.append(hashes)
        writer.write(tokens)
        return 0, 0, open_doc
    firsts = np.concatenate([[0], last_ends[:-1] + 1])
    pieces = last_ends - firsts + 1
    doc_hashes = hashes[last_ends].copy()
    for k in sorted(set(np.flatnonzero(pieces > 1).tolist()) | ({0} if open_doc is not None else set())):
        earlier = open_doc.hashes if k == 0 and open_doc is not None else []
        doc_hashes[k] = combine(np.concatenate([*earlier, hashes[firsts[k] : last_ends[k] + 1]]))
    keep = seen.first_seen(doc_hashes)
    if open_doc is not None and not keep[0]:
        writer.truncate(open_doc.start, tokens.itemsize)
    closed = int(last_ends[-1]) + 1
    piece_keep = np.repeat(keep, pieces)
    complete = int(lengths[:closed].sum())
    writer.write(tokens[:complete][np.repeat(piece_keep, lengths[:closed])])
    if writer.hashes is not None:
        writer.hashes.write(doc_hashes[keep].astype("<u8").tobytes())
    next_doc = None
    if closed < len(ends):  # the chunk ends inside a document
        next_doc = OpenDocument(writer.tokens, [hashes[closed:]])
        writer.write(tokens[complete:])
    return int(keep.sum()), int((~keep).sum()), next_doc
