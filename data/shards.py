"""The on-disk shard set: ``manifest.json`` plus webdataset ``.tar`` shards.

Each sample is one window of ``seq_len + 1`` tokens stored as raw little-endian
integers (``tokens.bin``) so that decoding is a ``numpy.frombuffer`` and not a
pickle/npy parse; the dtype lives in the manifest. The manifest is written last
and atomically: a directory without one is not a shard set.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from conf.errors import UserError
from data.read_ahead import read_ahead
from data.remote import Remote, RemoteOptions, is_remote
from data.safe_paths import is_safe_name, is_sha256
from data.tokenizer import TOKENIZER_FILE

MANIFEST = "manifest.json"
FORMAT = "gpt-shards/1"
SAMPLE_FIELD = "tokens.bin"


@dataclass(frozen=True)
class ShardInfo:
    path: Path  # the local file; for a remote shard set, the file's name in it
    num_samples: int
    sha256: str
    size: int = -1  # bytes; -1 when unknown
    remote: Remote | None = None  # set for an http(s):// or pipe: shard set (data/remote.py)

    @property
    def where(self) -> str:
        """The file or URL that messages name."""
        return str(self.path) if self.remote is None else self.remote.url(self.path.as_posix())


@dataclass(frozen=True)
class Manifest:
    """What a reader needs to know about a shard set, validated on load.

    ``directory`` holds ``manifest.json`` and ``tokenizer.json`` locally: the shard set itself, or
    for a URL a private copy of those two files; ``location`` is what the user named (dir or URL).
    """

    directory: Path
    tokenizer: str
    vocab_size: int
    eot_id: int
    seq_len: int
    dtype: str
    splits: dict[str, list[ShardInfo]]
    raw: dict[str, Any]
    location: str = ""

    def shards(self, split: str) -> list[ShardInfo]:
        if split not in self.splits or not self.splits[split]:
            where = self.location if is_remote(self.location) else self.directory / MANIFEST
            raise UserError(f"{where}: split {split!r} has no shards")
        return self.splits[split]

    def num_samples(self, split: str) -> int:
        return sum(s.num_samples for s in self.shards(split))


def load_manifest(directory: str | Path, remote: RemoteOptions | None = None) -> Manifest:
    """The manifest of a shard set: a directory, or an ``http(s)://`` / ``pipe:`` URL read with
    ``remote``'s retries, cache and read-ahead (:mod:`data.remote`)."""
    store = None
    location = str(directory)
    if is_remote(directory):
        store = Remote(str(directory), remote)
        location = store.location
        directory = store.download_metadata((MANIFEST, TOKENIZER_FILE))
    directory = Path(directory)
    path = directory / MANIFEST
    where = store.url(MANIFEST) if store else path  # what messages name
    if not directory.is_dir():
        raise UserError(f"data.dir={directory}: no such directory (run gpt-prepare first)")
    if not path.is_file():
        raise UserError(f"{path}: missing; {directory} is not a complete shard set (run gpt-prepare)")
    try:
        raw = json.loads(path.read_text())
        if raw.get("format") != FORMAT:
            raise UserError(f"{where}: format {raw.get('format')!r}, expected {FORMAT!r}")
        for split in raw["splits"].values():
            for s in split["shards"]:
                if not is_safe_name(s["file"]):
                    raise UserError(f"{where}: shard name {s['file']!r} is not a plain file name; refusing it")
                if not is_sha256(s["sha256"]):
                    raise UserError(f"{where}: shard {s['file']}: sha256 {s['sha256']!r} is not 64 hex digits")
        splits = {
            name: [
                ShardInfo(
                    Path(s["file"]) if store else directory / s["file"],
                    int(s["num_samples"]),
                    s["sha256"],
                    int(s.get("bytes", -1)),
                    store,
                )
                for s in split["shards"]
            ]
            for name, split in raw["splits"].items()
        }
        return Manifest(
            directory=directory,
            tokenizer=raw["tokenizer"],
            vocab_size=int(raw["vocab_size"]),
            eot_id=int(raw["eot_id"]),
            seq_len=int(raw["seq_len"]),
            dtype=raw["dtype"],
            splits=splits,
            raw=raw,
            location=location,
        )
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise UserError(f"{where}: malformed manifest ({exc!r})") from exc


def check_files(manifest: Manifest) -> None:
    """Cheap up-front check (a stat per shard): every shard exists with its recorded size.

    Catches missing and truncated shards before training starts; bit-level
    corruption is caught by the sha256 check when a shard is read. Remote shards: one concurrent
    round of HEAD requests over HTTP; a ``pipe:`` command cannot stat, its shards are checked when read.
    """
    shards = [shard for split in manifest.splits.values() for shard in split]
    remote = shards[0].remote if shards else None
    if remote is not None:
        sizes = remote.sizes([s.path.as_posix() for s in shards]) or [-1] * len(shards)
        for shard, size in zip(shards, sizes, strict=True):
            if min(size, shard.size) >= 0 and size != shard.size:
                raise UserError(f"shard {shard.where}: {size} bytes, manifest says {shard.size} (truncated?)")
        return
    for split in manifest.splits.values():
        for shard in split:
            if not shard.path.is_file():
                raise UserError(f"shard {shard.path}: missing")
            size = shard.path.stat().st_size
            if shard.size >= 0 and size != shard.size:
                raise UserError(f"shard {shard.path}: {size} bytes, manifest says {shard.size} (truncated?)")


def shard_set_names(manifest_text: str) -> set[str] | None:
    """The names a gpt-prepare shard set consists of (manifest, tokenizer, the ``.tar`` shards its
    manifest lists), or None when ``manifest_text`` is not such a manifest: how an output written
    before markers existed is still recognised as gpt-prepare's own."""
    try:
        raw = json.loads(manifest_text)
        shards = {str(s["file"]) for split in raw["splits"].values() for s in split["shards"]}
    except (ValueError, KeyError, TypeError, AttributeError):
        return None
    if raw.get("format") != FORMAT or not all(f.endswith(".tar") and "/" not in f for f in shards):
        return None
    return {MANIFEST, TOKENIZER_FILE, *shards}


def write_manifest(directory: Path, payload: dict[str, Any]) -> None:
    """Write ``manifest.json`` atomically (temp file + rename)."""
    payload = {"format": FORMAT, **payload}
    tmp = directory / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(payload, indent=1))
    os.replace(tmp, directory / MANIFEST)


def write_shard(path: Path, windows: np.ndarray, first_index: int) -> ShardInfo:
    """Write one tar shard of ``windows`` ([n, seq_len+1]) and return its manifest entry."""
    import webdataset as wds  # here: it imports torch, which gpt-prepare --help does not need

    with wds.TarWriter(str(path), mtime=0) as writer:  # int mtime: reproducible, no PAX header
        for offset, window in enumerate(windows):
            writer.write({"__key__": f"{first_index + offset:010d}", SAMPLE_FIELD: window.tobytes()})
    blob = path.read_bytes()
    return ShardInfo(path, len(windows), hashlib.sha256(blob).hexdigest(), len(blob))


TAR_BLOCK = 512


def _fixed_stride_windows(blob: bytes, count: int, width: int, dtype: np.dtype) -> np.ndarray | None:
    """All windows of a shard as one array view, or None when the tar is not laid out as
    ``write_shard`` lays it out (then the generic tar reader is used).

    ``write_shard`` writes one plain ustar member per window (no PAX or GNU extension
    headers, since names are short and mtime is an int), so member ``i``'s header starts at
    ``i * stride``. Parsing 1,000 tar headers in Python would dominate the loader's time;
    checking every header's size, type and name suffix with numpy and slicing the payloads
    out is cheap. The sha256 was already checked against the manifest.
    """
    payload = width * dtype.itemsize
    stride = TAR_BLOCK + -(-payload // TAR_BLOCK) * TAR_BLOCK
    if len(blob) < count * stride or count == 0:
        return None
    records = np.frombuffer(blob, np.uint8, count * stride).reshape(count, stride)
    size_field = np.frombuffer(b"%011o\0" % payload, np.uint8)
    suffix = np.frombuffer(SAMPLE_FIELD.encode(), np.uint8)
    names = records[:, :100]
    name_ends = np.argmax(names == 0, axis=1)  # first NUL: the name's length
    if not (
        (records[:, 124:136] == size_field).all()
        and (records[:, 156] == ord("0")).all()
        and (name_ends >= len(suffix)).all()
        and len(set(name_ends.tolist())) == 1
        and (names[:, name_ends[0] - len(suffix) : name_ends[0]] == suffix).all()
    ):
        return None
    return records[:, TAR_BLOCK : TAR_BLOCK + payload].copy().view(dtype).reshape(count, width)


def read_shard(shard: ShardInfo, dtype: str, seq_len: int) -> np.ndarray:
    """Read and verify one shard: returns its windows as an array [num_samples, seq_len+1].

    The sha256 and the sample count are checked against the manifest so that a
    truncated or corrupted shard is reported by name instead of training on garbage.
    """
    if shard.remote is not None:  # verified there, retried when it does not match
        blob = shard.remote.fetch(shard.path.as_posix(), shard.sha256, shard.size)
    else:
        try:
            blob = shard.path.read_bytes()
        except OSError as exc:
            raise UserError(f"shard {shard.path}: cannot read ({exc.strerror})") from exc
        if hashlib.sha256(blob).hexdigest() != shard.sha256:
            raise UserError(f"shard {shard.path}: sha256 mismatch with manifest (corrupt or truncated)")
    width = seq_len + 1
    itemsize = np.dtype(dtype).itemsize
    fast = _fixed_stride_windows(blob, shard.num_samples, width, np.dtype(dtype))
    if fast is not None:
        return fast
    out = np.empty((shard.num_samples, width), dtype=dtype)
    count = 0
    try:
        import webdataset as wds

        for sample in wds.tariterators.tar_file_iterator(io.BytesIO(blob)):
            if not sample["fname"].endswith(SAMPLE_FIELD):
                continue
            data = sample["data"]
            if len(data) != width * itemsize or count >= shard.num_samples:
                raise UserError(f"shard {shard.where}: sample {sample['fname']} has the wrong size")
            out[count] = np.frombuffer(data, dtype=dtype)
            count += 1
    except (tarfile.TarError, OSError) as exc:
        raise UserError(f"shard {shard.where}: unreadable tar ({exc})") from exc
    if count != shard.num_samples:
        raise UserError(f"shard {shard.where}: {count} samples, manifest says {shard.num_samples}")
    return out


def read_shards(
    shards: Sequence[ShardInfo], dtype: str, seq_len: int, read: Callable[..., np.ndarray] | None = None
) -> Iterator[np.ndarray]:
    """``read(shard, dtype, seq_len)`` (:func:`read_shard`) of each shard in order; remote shards are
    read ahead ``data.prefetch`` deep (:mod:`data.read_ahead`)."""
    read = read or read_shard
    remote = next((s.remote for s in shards if s.remote is not None), None)
    depth = 0 if remote is None else remote.options.prefetch
    return read_ahead(shards, lambda shard: read(shard, dtype, seq_len), depth)
