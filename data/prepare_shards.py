"""Shards written the way ``data.shards.write_shard`` writes them, byte for byte, without webdataset.

Why: webdataset imports torch (seconds and hundreds of MB in every worker process), and its
``TarWriter`` spends about 50 µs in Python per window, which at ``seq_len=64`` is longer than
tokenizing. All members of a shard have the same size and layout (one plain ustar header,
the window's bytes padded to 512), so the headers are one template from the standard library's
``tarfile`` with the name and checksum filled in by numpy.
"""

from __future__ import annotations

import hashlib
import tarfile
from pathlib import Path

import numpy as np

from data.shards import SAMPLE_FIELD, TAR_BLOCK, ShardInfo

RECORD = 20 * TAR_BLOCK  # tarfile pads an archive to a multiple of its record size
KEY_DIGITS = 10
CHECKSUM = slice(148, 156)


def _template(name: str, size: int) -> np.ndarray:
    """The header ``webdataset.TarWriter(mtime=0)`` writes for one member (tarfile's default format)."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uname, info.gname = size, 0, 0o444, "bigdata", "bigdata"
    header = info.tobuf(tarfile.DEFAULT_FORMAT, "utf-8", "surrogateescape")
    assert len(header) == TAR_BLOCK, "a long name would need an extension header"
    return np.frombuffer(header, dtype=np.uint8)


def shard_bytes(windows: np.ndarray, first_index: int) -> bytes:
    """The tar archive of ``windows`` ([n, seq_len+1]), member ``i`` named ``<first_index+i>.tokens.bin``."""
    count = len(windows)
    if count == 0 or first_index + count > 10**KEY_DIGITS:
        raise ValueError("shard_bytes: no windows, or keys longer than 10 digits")
    payload = windows.shape[1] * windows.dtype.itemsize
    stride = TAR_BLOCK + -(-payload // TAR_BLOCK) * TAR_BLOCK
    suffix = f".{SAMPLE_FIELD}"
    template = _template(f"{first_index:0{KEY_DIGITS}d}{suffix}", payload)
    names = np.char.add(np.char.zfill(np.arange(first_index, first_index + count).astype(str), KEY_DIGITS), suffix)
    name_bytes = np.frombuffer(names.astype(f"S{KEY_DIGITS + len(suffix)}").tobytes(), np.uint8).reshape(count, -1)
    records = np.zeros((count, stride), dtype=np.uint8)
    records[:, :TAR_BLOCK] = template
    records[:, : name_bytes.shape[1]] = name_bytes
    # the checksum: the header's byte sum with its own field read as eight spaces, "%06o\0 "
    sums = records[:, :TAR_BLOCK].sum(axis=1, dtype=np.int64) - records[:, CHECKSUM].sum(axis=1, dtype=np.int64)
    sums += 8 * ord(" ")
    shifts = np.arange(15, -1, -3)
    records[:, 148:154] = ord("0") + (sums[:, None] >> shifts) % 8
    records[:, 154:156] = (0, ord(" "))
    records[:, TAR_BLOCK : TAR_BLOCK + payload] = np.ascontiguousarray(windows).view(np.uint8).reshape(count, payload)
    size = count * stride + 2 * TAR_BLOCK
    return records.tobytes() + bytes(2 * TAR_BLOCK + (-size) % RECORD)


def write_shard_fast(path: Path, windows: np.ndarray, first_index: int) -> ShardInfo:
    blob = shard_bytes(windows, first_index)
    path.write_bytes(blob)
    return ShardInfo(path, len(windows), hashlib.sha256(blob).hexdigest(), len(blob))
