"""The input corpus, streamed: ``.txt`` / ``.jsonl`` (plain, ``.gz`` or ``.zst``), Parquet and Arrow files,
local or in a bucket (which files ``input=`` names: ``data/inputs.py``).

Nothing here holds more than one document (or, for a long one, one piece of it) in memory:
files are read a block at a time (Parquet and Arrow a record batch at a time,
``data/parquet_input.py``). A ``.txt`` file is one document; a ``.jsonl`` line, or a table's row,
is one document (its ``text_field``). A document longer than :data:`PIECE_CHARS` is cut into pieces,
only at a space or newline between two word characters (``\\w \\w``): that is where byte-level
BPE (GPT-2's pre-tokenizer regex), tiktoken's and sentencepiece-style pre-tokenizers split
anyway, so tokenizing the pieces one after another gives the tokens of the whole document for
``char``, ``byte`` and ``bpe``. A document without such a place stays in one piece.

Text is decoded as gpt-prepare always did: strict UTF-8, universal newlines for ``.txt``.
"""

from __future__ import annotations

import codecs
import io
import json
import re
from collections.abc import Callable, Iterable, Iterator
from typing import Any, BinaryIO

from conf.errors import UserError
from data.inputs import InputFile, compression_of, kind_of, open_binary, size_of
from data.parquet_input import table_texts

BLOCK = 1 << 20  # bytes read at a time
PIECE_CHARS = 1 << 20  # a longer document is cut into pieces of about this many characters
CHUNK_CHARS = 1 << 20  # pieces are sent to a tokenizing worker in chunks of about this many characters
CUT = re.compile(r"(?<=\w)[ \n](?=\w)")

Piece = tuple[str, bool]  # (text, whether it ends its document)


class Source:
    """One input file open for reading, decompressed; ``consumed`` counts its on-disk bytes read."""

    def __init__(self, path: InputFile, on_read: Callable[[int], None] | None = None) -> None:
        self.path, self.on_read, self.consumed = path, on_read, 0
        self.compression = compression_of(path)
        self.raw: BinaryIO = open_binary(path)  # closed in close()
        self.stream: Any = self.raw
        if self.compression == "gz":
            import gzip

            self.stream = gzip.GzipFile(fileobj=self.raw, mode="rb")
        elif self.compression == "zst":
            import zstandard

            self.stream = zstandard.ZstdDecompressor().stream_reader(self.raw, read_across_frames=True, closefd=False)

    def blocks(self) -> Iterator[bytes]:
        while True:
            try:
                block = self.stream.read(BLOCK)
            except UserError:  # an object in a bucket that could not be read: named already
                raise
            except Exception as exc:  # noqa: BLE001 - gzip/zlib/zstd errors: a user's damaged file, in one line
                raise UserError(f"{self.path}: not a valid .{self.compression or 'txt'} file ({exc})") from exc
            position = self.raw.tell()
            if self.on_read is not None and position > self.consumed:
                self.on_read(position - self.consumed)
            self.consumed = position
            if not block:
                return
            yield block

    def close(self) -> None:
        if self.stream is not self.raw:
            self.stream.close()
        self.raw.close()


def split_text(text: str, final: bool = True, search_from: int = 0) -> tuple[list[str], str, int]:
    """Cut ``text`` into pieces of at least :data:`PIECE_CHARS` at the first allowed place after each.

    Returns (pieces, rest, where to search ``rest`` from next time). With ``final`` the rest is the
    last piece; otherwise it awaits more text, and ``search_from`` (from the previous call) spares
    re-scanning a long stretch without a place to cut.
    """
    pieces, start = [], 0
    while len(text) - start > PIECE_CHARS:
        match = CUT.search(text, max(start + PIECE_CHARS, search_from))
        if match is None:
            break
        pieces.append(text[start : match.start()])
        start = match.start()
    rest = text[start:]
    if final and rest:
        pieces.append(rest)
        rest = ""
    # the last character may be a space whose right-hand neighbour has not been read yet
    return pieces, rest, max(len(rest) - 1, 0) if len(rest) > PIECE_CHARS else 0


def doc_pieces(text: str) -> list[Piece]:
    """One document's pieces, the last one marked as ending it."""
    if len(text) <= PIECE_CHARS:
        return [(text, True)]
    pieces, _, _ = split_text(text)
    return [(p, i == len(pieces) - 1) for i, p in enumerate(pieces)]


def text_file_pieces(source: Source) -> Iterator[Piece]:
    """A ``.txt`` file as one document, in pieces, read a block at a time."""
    utf8 = codecs.getincrementaldecoder("utf-8")()
    decoder = io.IncrementalNewlineDecoder(utf8, translate=True)
    buffer, fed, search_from = "", 0, 0
    for block in _with_end(source.blocks()):
        pending = len(utf8.getstate()[0])
        try:
            buffer += decoder.decode(block, final=not block)
        except UnicodeDecodeError as exc:
            raise UserError(f"{source.path}: not UTF-8 text (byte {fed - pending + exc.start}: {exc.reason})") from exc
        fed += len(block)
        if block and len(buffer) <= PIECE_CHARS:
            continue
        pieces, buffer, search_from = split_text(buffer, final=not block, search_from=search_from)
        for i, piece in enumerate(pieces):
            yield piece, not block and i == len(pieces) - 1


def _with_end(blocks: Iterator[bytes]) -> Iterator[bytes]:
    """The blocks, then ``b""`` (end of file: the decoder flushes, the last piece ends the document)."""
    yield from blocks
    yield b""


def jsonl_lines(source: Source) -> Iterator[tuple[int, bytes]]:
    """(line number, line) split on ``\\n`` only (U+2028 and friends occur inside real JSON strings)."""
    tail: list[bytes] = []
    lineno = 0
    for block in source.blocks():
        if b"\n" not in block:
            tail.append(block)
            continue
        lines = block.split(b"\n")
        lines[0] = b"".join([*tail, lines[0]])
        tail = [lines.pop()]
        for line in lines:
            lineno += 1
            yield lineno, line
    if tail and tail[0]:
        yield lineno + 1, b"".join(tail)


def jsonl_file_pieces(source: Source, text_field: str) -> Iterator[Piece]:
    """Each line's ``text_field`` as a document; the first bad line is named (``file:line``)."""
    path = source.path
    for lineno, line in jsonl_lines(source):
        if not line.strip():
            continue
        try:
            record = json.loads(line.decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise UserError(f"{path}:{lineno}: not UTF-8 text ({exc.reason})") from exc
        except json.JSONDecodeError as exc:
            raise UserError(f"{path}:{lineno}: invalid JSON ({exc.msg})") from exc
        if not isinstance(record, dict):
            raise UserError(f"{path}:{lineno}: expected a JSON object")
        text = record.get(text_field)
        if not isinstance(text, str):
            raise UserError(f"{path}:{lineno}: no string field {text_field!r}")
        if text:
            yield from doc_pieces(text)


def file_pieces(path: InputFile, text_field: str, on_read: Callable[[int], None] | None = None) -> Iterator[Piece]:
    """The pieces of one input file's documents, in order; the file is closed when the generator is."""
    kind = kind_of(path)
    if kind in ("parquet", "arrow"):
        for text in table_texts(path, text_field, on_read):
            if text:
                yield from doc_pieces(text)
        return
    source = Source(path, on_read)
    try:
        yield from jsonl_file_pieces(source, text_field) if kind == "jsonl" else text_file_pieces(source)
    finally:
        source.close()


def corpus_pieces(files: Iterable[InputFile], text_field: str) -> Iterator[Piece]:
    for path in files:
        yield from file_pieces(path, text_field)


def sample_texts(files: list[InputFile], text_field: str, budget: int) -> Iterator[str]:
    """At most about ``budget`` UTF-8 bytes of text for training a tokenizer: from each file its first
    share, shares in proportion to the files' sizes on disk (everything, when the corpus is smaller)."""
    sizes = [size_of(p) for p in files]
    total = sum(sizes) or 1
    for path, size in zip(files, sizes, strict=True):
        share, taken = budget * size / total, 0
        pieces = file_pieces(path, text_field)
        try:
            for text, _ in pieces:
                yield text
                taken += len(text.encode("utf-8"))
                if taken >= share:
                    break
        finally:
            pieces.close()


def first_text(files: list[InputFile], text_field: str) -> bool:
    """Whether any document holds more than whitespace (stops at the first that does)."""
    return any(text.strip() for text, _ in corpus_pieces(files, text_field))


def chunks(pieces: Iterable[Piece]) -> Iterator[tuple[list[str], list[bool]]]:
    """Pieces grouped into chunks of about :data:`CHUNK_CHARS` characters (one task for a worker)."""
    texts: list[str] = []
    ends: list[bool] = []
    size = 0
    for text, end in pieces:
        texts.append(text)
        ends.append(end)
        size += len(text)
        if size >= CHUNK_CHARS:
            yield texts, ends
            texts, ends, size = [], [], 0
    if texts:
        yield texts, ends
