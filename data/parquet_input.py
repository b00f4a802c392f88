"""Parquet files and Arrow IPC files (``Dataset.save_to_disk``) as gpt-prepare inputs, with pyarrow.

One row is one document: the string column ``text_field``. Only that column is read, one record
batch at a time (a batch lies within one Parquet row group), so memory is a batch of one column
whatever the file's size; a file in a bucket is read by ranged GETs (:class:`data.s3.S3Reader`),
the Parquet footer first. An empty string is skipped as in JSONL; a null, a missing column or a
column that is not a string is refused in one line naming the file (and the row).

The documents are the same strings a JSONL file of the same rows holds, so the tokens, and the
shards, are byte-identical to preparing that JSONL.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from conf.errors import UserError
from data.inputs import InputFile, kind_of, open_binary, size_of

BATCH_ROWS = 1024  # rows per record batch read from Parquet
ARROW_FILE_MAGIC = b"ARROW1"  # Arrow's random-access file format; save_to_disk writes the stream format


def _check_column(path: InputFile, schema: Any, field: str) -> None:
    import pyarrow as pa

    if field not in schema.names:
        shown = ", ".join(schema.names[:8]) + (" …" if len(schema.names) > 8 else "")
        raise UserError(f"{path}: no column {field!r} (columns: {shown}); set text_field=")
    kind = schema.field(field).type
    if pa.types.is_dictionary(kind):
        kind = kind.value_type
    stringy = pa.types.is_string(kind) or pa.types.is_large_string(kind)
    if not (stringy or getattr(pa.types, "is_string_view", lambda _: False)(kind)):
        raise UserError(f"{path}: column {field!r} is {kind}, not a string")


def _batch_texts(path: InputFile, column: Any, field: str, first_row: int) -> list[str]:
    if column.null_count:
        row = first_row + column.is_null().to_pylist().index(True)
        raise UserError(f"{path}: row {row}: {field!r} is null, not a string")
    return column.to_pylist()


def table_texts(path: InputFile, text_field: str, on_read: Callable[[int], None] | None = None) -> Iterator[str]:
    """The ``text_field`` of each row of a ``.parquet`` or ``.arrow`` file, in order. ``on_read`` gets
    the file's bytes in proportion to the rows read (Parquet reads are not in file order)."""
    import pyarrow as pa

    kind, size = kind_of(path), size_of(path)
    handle = open_binary(path)
    try:
        try:
            if kind == "parquet":
                import pyarrow.parquet as pq

                table = pq.ParquetFile(handle)
                schema, rows = table.schema_arrow, table.metadata.num_rows
                batches = table.iter_batches(batch_size=BATCH_ROWS, columns=[text_field], use_threads=False)
            elif handle.peek(len(ARROW_FILE_MAGIC))[: len(ARROW_FILE_MAGIC)] == ARROW_FILE_MAGIC:  # type: ignore[attr-defined]
                reader = pa.ipc.open_file(handle)
                schema, rows = reader.schema, 0  # progress by position: batches are read in file order
                batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
            else:
                reader = pa.ipc.open_stream(handle)
                schema, rows, batches = reader.schema, 0, iter(reader)
        except pa.ArrowException as exc:
            raise UserError(f"{path}: not a valid .{kind} file ({exc})") from exc
        _check_column(path, schema, text_field)
        done = reported = 0
        while True:
            try:
                batch = next(batches, None)
            except pa.ArrowException as exc:
                raise UserError(f"{path}: not a valid .{kind} file ({exc})") from exc
            if batch is None:
                break
            texts = _batch_texts(path, batch.column(batch.schema.get_field_index(text_field)), text_field, done)
            done += batch.num_rows
            if on_read is not None:
                position = size * done // rows if rows else handle.tell()
                if position > reported:
                    on_read(position - reported)
                    reported = position
            yield from texts
        if on_read is not None and size > reported:
            on_read(size - reported)
    finally:
        handle.close()
