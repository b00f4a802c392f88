"""``gpt-prepare out=s3://bucket/prefix``: the owned-output rule of ``data/output_dir.py``, in a bucket.

The rule is the same — a command replaces or deletes only objects it wrote itself — and so is the
marker (``.gpt-prepare.json``, listing the names written). A bucket has no directories and no
rename, so the local temp-dir-and-swap becomes an order of writes:

- **Before any work** (:meth:`S3Output.check`): the prefix must be empty, or hold only what a marker
  of ours lists (or, written before markers, a shard set: manifest, tokenizer and the shards the
  manifest lists). Anything else there is refused in one line naming it, whatever ``overwrite``
  says. A complete earlier output (its ``manifest.json`` there) needs ``overwrite=true``; an
  interrupted one (a marker and no manifest) is ours and unfinished, and is replaced without it.
- **Writing** (:meth:`S3Output.writing`): 1. the marker, listing the old names and the new ones,
  so that a run killed at any point leaves only objects a marker accounts for; 2. the old
  ``manifest.json`` deleted, so that no reader takes half-replaced shards for a shard set; 3. the
  tokenizer and the shards, each uploaded as soon as it is written locally (then removed from the
  local staging dir: local disk holds a few shards, not the output); 4. old objects the new output
  does not have, deleted; 5. the marker, listing the new output; 6. ``manifest.json``, last.

A reader therefore sees either no ``manifest.json`` or a complete shard set. Two runs writing one
prefix from two machines at once are not detected (one machine: the work dir's lock).
"""

from __future__ import annotations

import contextlib
import json
import shutil
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from conf.errors import UserError
from data.inputs import InputFile
from data.output_dir import MARKER_FORMAT, marker_name, refuse_unowned
from data.s3 import SCHEME, S3Object, S3Store, split_url
from data.shards import MANIFEST, shard_set_names
from data.tokenizer import TOKENIZER_FILE

UPLOADS = 8  # concurrent uploads


class S3Output:
    """The ``out=s3://…`` prefix of one command: the check before work, and the ordered write."""

    def __init__(self, url: str, command: str, overwrite: bool, store: S3Store, key: str = "out") -> None:
        self.bucket, self.prefix = split_url(url, key)
        self.url = f"{SCHEME}{self.bucket}/{self.prefix}".rstrip("/")
        self.command, self.overwrite, self.store, self.key = command, overwrite, store, key
        self.marker = marker_name(command)

    def object_key(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name

    def _present(self) -> dict[str, S3Object]:
        start = f"{self.prefix}/" if self.prefix else ""
        return {o.key[len(start) :]: o for o in self.store.list(self.bucket, start)}

    def _owned(self, present: dict[str, S3Object]) -> set[str] | None:
        """What this command may replace: its marker's list, or a legacy shard set's names."""
        if self.marker in present:
            try:
                record = json.loads(self.store.read_text(present[self.marker]))
                if record.get("format") == MARKER_FORMAT and record.get("command") == self.command:
                    return {str(f) for f in record["files"]} | {self.marker}
            except (ValueError, KeyError, TypeError, AttributeError):
                pass
            raise UserError(f"{self.url}/{self.marker}: unreadable marker; choose a new or empty prefix")
        if MANIFEST in present and TOKENIZER_FILE in present:
            return shard_set_names(self.store.read_text(present[MANIFEST]))
        return None

    def check(self, inputs: Sequence[InputFile] = (), note: bool = True) -> set[str]:
        """Refuse, in one line, a prefix this command may not write; return the names it would replace."""
        inside = f"{self.prefix}/" if self.prefix else ""
        for path in inputs:
            if isinstance(path, S3Object) and path.bucket == self.bucket and path.key.startswith(inside):
                raise UserError(f"{self.key}={self.url}: holds the input {path}; write to a new prefix outside it")
        present = self._present()
        if not present:
            return set()
        where = f"{self.key}={self.url}"
        refuse_unowned(where, self.command, list(present), self._owned(present), "objects", "a new or empty prefix")
        if MANIFEST in present and not self.overwrite:
            raise UserError(f"{where}: already holds a {self.command} output; pass overwrite=true to replace it")
        if MANIFEST not in present and note:
            print(f"note: {where}: replacing the objects of an interrupted {self.command}", flush=True)
        return set(present)

    @contextlib.contextmanager
    def writing(self, staging: Path, inputs: Sequence[InputFile] = ()) -> Iterator[S3Writer]:
        """Yield a writer whose local ``path`` the output is written into; on success, the ordered
        write of the module docstring. A failure leaves no ``manifest.json`` (and a marker listing
        every object there), which the same command then replaces."""
        old = self.check(inputs, note=False)  # again: the prefix may have changed during a long tokenization
        shutil.rmtree(staging, ignore_errors=True)  # a killed run's
        staging.mkdir(parents=True)
        writer = S3Writer(self, staging, old)
        try:
            yield writer
            writer.finish()
        except BaseException:
            writer.abandon()
            raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)


class S3Writer:
    """The local staging dir of one output and the uploads out of it (steps 1-6 of the module docstring)."""

    def __init__(self, target: S3Output, path: Path, old: set[str]) -> None:
        self.target, self.path, self.old = target, path, old
        self.listed: set[str] = set()  # what the marker in the bucket lists
        self.uploaded: set[str] = set()
        self.pending: deque[tuple[str, Future]] = deque()
        self.pool = ThreadPoolExecutor(UPLOADS, thread_name_prefix="s3-upload")

    def _put_marker(self, names: set[str]) -> None:
        files = sorted(names - {self.target.marker})
        record = {"format": MARKER_FORMAT, "command": self.target.command, "files": files}
        blob = (json.dumps(record, indent=1) + "\n").encode()
        self.target.store.put_bytes(self.target.bucket, self.target.object_key(self.target.marker), blob)

    def expect(self, names: list[str]) -> None:
        """Steps 1-2, once the names of the new output are known (before any of them is uploaded)."""
        new = set(names) | {MANIFEST}
        if new <= self.listed:
            return
        self.listed |= self.old | new
        self._put_marker(self.listed)
        if MANIFEST in self.old:
            self.target.store.delete(self.target.bucket, [self.target.object_key(MANIFEST)])
            self.old.discard(MANIFEST)

    def publish(self, path: Path) -> None:
        """Upload a finished file of the staging dir in the background (then delete the local copy);
        at most ``2 × UPLOADS`` are in flight."""
        self.expect([path.name])

        def upload() -> None:
            self.target.store.put_file(self.target.bucket, self.target.object_key(path.name), path)
            path.unlink()

        self.pending.append((path.name, self.pool.submit(upload)))
        while len(self.pending) > 2 * UPLOADS:
            self._settle_one()

    def _settle_one(self) -> None:
        name, future = self.pending.popleft()
        future.result()
        self.uploaded.add(name)

    def finish(self) -> None:
        """Steps 3-6: the rest of the staging dir, stale old objects deleted, the marker, the manifest."""
        for path in sorted(self.path.iterdir()):
            if path.name not in (MANIFEST, *(name for name, _ in self.pending)):
                self.publish(path)
        while self.pending:
            self._settle_one()
        self.pool.shutdown()
        manifest = self.path / MANIFEST
        if not manifest.is_file():
            raise RuntimeError("S3Writer.finish: no manifest.json was written")
        target, store = self.target, self.target.store
        stale = self.old - self.uploaded - {MANIFEST, target.marker}
        if stale:
            store.delete(target.bucket, [target.object_key(n) for n in stale])
        self._put_marker(self.uploaded | {MANIFEST})
        store.put_file(target.bucket, target.object_key(MANIFEST), manifest)

    def abandon(self) -> None:
        """After a failure: let uploads in flight end (their objects are listed in the marker)."""
        for _, future in self.pending:
            future.cancel()
        self.pool.shutdown(wait=True)
        if self.listed:
            print(
                f"note: {self.target.key}={self.target.url}: a partial output is left, without manifest.json "
                f"(no reader takes it for a shard set); the same command replaces it",
                flush=True,
            )
