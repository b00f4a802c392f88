"""Names read back from files we do not control (a manifest, a checkpoint's checksum list, a
server's reply) are checked before they become paths: a crafted ``"../../x"`` must never make
our code read, write or delete outside the directory it names a file of."""

from __future__ import annotations

import re
from pathlib import PurePosixPath

SHA256 = re.compile(r"[0-9a-f]{64}")


def is_sha256(value: object) -> bool:
    """A sha256 as we write it: 64 lowercase hex digits (it names cache entries on disk)."""
    return isinstance(value, str) and SHA256.fullmatch(value) is not None


def is_safe_name(value: object, subdirs: bool = False) -> bool:
    """A file name inside its directory: not empty, not absolute, no ``..`` (nor ``.``) part, no
    backslash or NUL; with ``subdirs`` it may have ``/``-separated parts (a checkpoint's sub-dirs)."""
    if not isinstance(value, str) or not value or "\\" in value or "\0" in value:
        return False
    parts = PurePosixPath(value).parts
    if not parts or value.endswith("/") or (not subdirs and len(parts) != 1):
        return False
    if any(part in (".", "..") for part in value.split("/")):  # PurePosixPath drops "." parts
        return False
    return not value.startswith("/") and all(p not in ("", ".", "..") for p in parts) and "//" not in value
