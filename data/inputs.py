"""What ``gpt-prepare input=`` names: the input files, local or in a bucket, in a fixed order.

``input=`` is a file, a directory (its input files, recursively), a glob, or a Hugging Face dataset
directory — on the local disk or as ``s3://bucket/prefix``. A local file is a ``Path``; an object is
an :class:`~data.s3.S3Object`, which has the few attributes of a ``Path`` that the readers use
(``name``, ``suffix``, ``str()``), so the readers see one kind of file.

Hugging Face layouts:
- ``Dataset.save_to_disk``: ``state.json`` lists the ``.arrow`` files (Arrow IPC streams) in order;
  those are the input. A ``DatasetDict`` (``dataset_dict.json``, a directory per split) is refused
  in one line naming its splits: pretraining on ``train`` and ``test`` together is never meant.
- The hub's layout (``data/<split>-00000-of-00002.parquet``): its Parquet files; a directory that
  holds more than one split's files is refused the same way (a glob takes them all).
"""

from __future__ import annotations

import glob
import json
import re
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO

from conf.errors import UserError
from data.s3 import S3Object, S3Store, is_s3, split_url

InputFile = Path | S3Object
TEXT_SUFFIXES = (".txt", ".jsonl")
TABLE_SUFFIXES = (".parquet", ".arrow")  # read with pyarrow (data/parquet_input.py)
COMPRESSIONS = ("gz", "zst")
HUB_SHARD = re.compile(r"(?:^|/)([A-Za-z0-9_.]+?)-\d{5}-of-\d{5}(?:-[0-9a-f]+)?\.parquet$")
KINDS = "no .txt/.jsonl (.gz/.zst), .parquet or .arrow files"


def compression_of(path: InputFile) -> str:
    """``gz``, ``zst`` or ``''`` (by the name's last suffix)."""
    suffix = path.suffix.lstrip(".")
    return suffix if suffix in COMPRESSIONS else ""


def kind_of(path: InputFile) -> str:
    """How a file is read: ``jsonl``, ``parquet``, ``arrow`` or ``txt`` (anything else is one document)."""
    name = path.name[: -len(path.suffix)] if compression_of(path) else path.name
    if name.endswith(".jsonl"):
        return "jsonl"
    if not compression_of(path) and path.suffix in TABLE_SUFFIXES:
        return path.suffix[1:]
    return "txt"


def is_input_name(name: str) -> bool:
    """A name a directory input picks up: ``.txt`` / ``.jsonl`` (also ``.gz`` / ``.zst``), ``.parquet``, ``.arrow``."""
    text = any(name.endswith(s + c) for s in TEXT_SUFFIXES for c in ("", ".gz", ".zst"))
    return text or name.endswith(TABLE_SUFFIXES)


def resolve_inputs(spec: str, store: S3Store | None = None) -> list[InputFile]:
    """A file, a directory, a glob or a Hugging Face dataset directory (local or ``s3://``) → its
    input files, in the order their documents are read."""
    if not spec:
        raise UserError("input=: empty; give a file, a directory or a glob")
    files = _s3_inputs(spec, store or S3Store()) if is_s3(spec) else _local_inputs(spec)
    if not files:
        raise UserError(f"input={spec}: no such file, or {KINDS} match")
    return files


def _local_inputs(spec: str) -> list[InputFile]:
    path = Path(spec).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        entries = {p.relative_to(path).as_posix(): p for p in path.rglob("*") if p.is_file()}
        return _directory(spec, entries, lambda name: (path / name).read_text())
    return sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())


def _s3_inputs(spec: str, store: S3Store) -> list[InputFile]:
    bucket, key = split_url(spec)
    magic = re.search(r"[*?[]", key)
    if magic:
        pattern = glob_regex(key)
        listed = store.list(bucket, key[: magic.start()])
        return sorted((o for o in listed if pattern.fullmatch(o.key)), key=lambda o: PurePosixPath(o.key))
    if key and not spec.endswith("/"):
        single = store.head(bucket, key)
        if single is not None:
            return [single]
    prefix = f"{key}/" if key else ""
    entries = {o.key[len(prefix) :]: o for o in store.list(bucket, prefix) if not o.key.endswith("/")}
    return _directory(spec, entries, lambda name: store.read_text(entries[name]))


def _directory(spec: str, entries: dict[str, InputFile], read: Callable[[str], str]) -> list[InputFile]:
    """The input files of a directory, given every file under it by relative name."""

    def record(name: str) -> Any:
        try:
            return json.loads(read(name))
        except (OSError, ValueError) as exc:
            raise UserError(f"input={spec}: {name} is not readable JSON ({exc})") from exc

    where = spec.rstrip("/")
    if "dataset_dict.json" in entries:
        splits = record("dataset_dict.json").get("splits") or ["train"]
        raise UserError(
            f"input={spec}: a Hugging Face DatasetDict with splits {', '.join(map(str, splits))}; "
            f"name one split's directory, e.g. input={where}/{splits[0]}"
        )
    if "state.json" in entries and any(name.endswith(".arrow") for name in entries):
        try:
            names = [str(f["filename"]) for f in record("state.json")["_data_files"]]
        except (KeyError, TypeError) as exc:
            raise UserError(f"input={spec}: state.json has no _data_files list; not a save_to_disk dataset") from exc
        missing = [n for n in names if n not in entries]
        if missing:
            raise UserError(f"input={spec}: state.json lists {missing[0]}, which is not there")
        return [entries[n] for n in names]
    files = sorted((n for n in entries if is_input_name(PurePosixPath(n).name)), key=PurePosixPath)
    splits = sorted({m[1] for n in files if (m := HUB_SHARD.search(n))})
    if len(splits) > 1:
        raise UserError(
            f"input={spec}: a Hugging Face dataset with splits {', '.join(splits)}; name one, "
            f"e.g. input='{where}/**/{splits[0]}-*.parquet' (or input='{where}/**/*.parquet' for all)"
        )
    return [entries[n] for n in files]


def glob_regex(pattern: str) -> re.Pattern[str]:
    """A glob as ``glob.glob(recursive=True)`` reads it, for object keys: ``*`` and ``?`` stay within
    one path component, ``**/`` spans any number of them, ``[...]`` is a character class."""
    out, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:[^/]*/)*")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] in "*?":
            out.append("[^/]*" if pattern[i] == "*" else "[^/]")
            i += 1
        elif pattern[i] == "[" and (end := pattern.find("]", i + 2)) > 0:
            body = pattern[i + 1 : end]
            out.append("[" + ("^" + body[1:] if body.startswith("!") else body).replace("\\", "\\\\") + "]")
            i = end + 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out))


def open_binary(path: InputFile) -> BinaryIO:
    """The file opened for reading, buffered and seekable (an object is read by ranged GETs)."""
    if isinstance(path, S3Object):
        return path.store.open(path)  # type: ignore[return-value]
    try:
        return open(path, "rb")  # noqa: SIM115 - the caller closes it
    except OSError as exc:
        raise UserError(f"{path}: cannot read ({exc.strerror})") from exc


def size_of(path: InputFile) -> int:
    return path.size if isinstance(path, S3Object) else path.stat().st_size


def record_name(path: InputFile) -> str:
    """The name a resume record keeps: an absolute path, or the object's URL."""
    return path.url if isinstance(path, S3Object) else str(path.resolve())


def stat_of(path: InputFile) -> list[Any]:
    """What tells a changed file: size and mtime locally, size and ETag in a bucket."""
    if isinstance(path, S3Object):
        return [path.size, path.etag]
    stat = path.stat()
    return [stat.st_size, stat.st_mtime_ns]


def stat_now(name: str, store: S3Store | None = None) -> list[Any] | None:
    """:func:`stat_of` the file a resume record names, as it is now (None: it is gone)."""
    if is_s3(name):
        obj = (store or S3Store()).head(*split_url(name))
        return None if obj is None else stat_of(obj)
    path = Path(name)
    return stat_of(path) if path.is_file() else None
