"""gpt-prepare's work directory: what makes an interrupted run resumable.

``.OUT.gpt-prepare-work`` beside ``out`` (or ``work_dir=``; for an ``s3://`` out, a local cache dir)
holds the tokenizer (trained once), one part per finished input file (``part-NNNNNN.bin``: its
documents' tokens, each followed by end-of-text, in order; ``part-NNNNNN.hashes``: the kept
documents' hashes when ``dedup=true``) and ``progress.json``, which lists the finished parts. A
part is written as ``*.partial`` and renamed before the record names it, so a part the record
lists is complete, and a restarted run skips exactly those files. Shards and the manifest are
made from the parts only once every file is done, into ``owned_output``'s temp dir
(``data/output_dir.py``, or ``data/s3_output.py``): ``out`` never holds a partial output.

``executor=ray dedup=true`` (``data/prepare_ray.py``) keeps one more stage per file: a scanned file's
tokens with every document (``part-NNNNNN.raw``), its documents' hashes (``.dochash``) and where
each ends (``.docend``), listed under ``scanned`` in the record; the global dedup then turns it into
the same ``part-NNNNNN.bin`` the local pool writes, and parts are recorded done in file order, so
the finished parts of a dedup run are always the first files (which the local pool resumes from).

A restart resumes only with the settings the parts were made with (tokenizer, text field, dedup,
the same input files, the finished ones unchanged), else it refuses in one line; ``resume=false``
discards the work dir first. Settings applied when shards are cut (``seq_len``, ``val_fraction``,
``shard_size``) may change. The directory is removed once ``out`` is complete; only names this
module writes are ever removed from it.
"""

from __future__ import annotations

import contextlib
import fcntl
import fnmatch
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from conf.errors import UserError
from data.inputs import InputFile, record_name, stat_now
from data.s3 import S3Store
from data.tokenizer import TOKENIZER_FILE, Tokenizer, load_tokenizer

WORK_FORMAT = "gpt-prepare-work/1"
RECORD = "progress.json"
LOCK = "lock"
SCAN_KINDS = ("raw", "dochash", "docend")  # a scanned file's stage (executor=ray dedup=true)
OWN_NAMES = (
    RECORD, f".{RECORD}.tmp", LOCK, TOKENIZER_FILE, "part-*.bin", "part-*.hashes", "part-*.partial",
    *(f"part-*.{kind}" for kind in SCAN_KINDS), "dedup-*.drops", "dedup-*.drops.partial",
)  # fmt: skip


def work_dir_of(out: Path) -> Path:
    return out.parent / f".{out.name}.gpt-prepare-work"


class WorkDir:
    """The record of one (possibly interrupted) gpt-prepare run; see the module docstring."""

    def __init__(self, path: Path, record: dict[str, Any], lock: int) -> None:
        self.path, self.record, self._lock = path, record, lock

    @classmethod
    def open(
        cls,
        out: Path | str,
        settings: dict[str, Any],
        inputs: list[InputFile],
        resume: bool,
        path: Path | None = None,
        store: S3Store | None = None,
    ) -> WorkDir:
        """Create the work dir for ``out`` (at ``path``, else beside ``out``), or take up the one an
        interrupted run left (refusing in one line when its settings or finished inputs differ);
        ``store`` re-checks finished inputs in a bucket."""
        path = path or work_dir_of(Path(out))
        names = [record_name(p) for p in inputs]
        fresh = {"format": WORK_FORMAT, "settings": settings, "inputs": names, "tokenizer": False, "done": []}
        existed = path.exists()
        if existed:
            record = _read_record(path)
            if record is None:
                raise UserError(f"{path}: exists and is not a gpt-prepare work directory; move it away")
        try:
            path.mkdir(parents=True, exist_ok=True)
            lock = os.open(path / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise UserError(f"out={out}: cannot write its work dir {path} ({exc.strerror})") from exc
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(lock)
            raise UserError(f"out={out}: another gpt-prepare is writing it now ({path} is locked)") from None
        work = cls(path, fresh, lock)
        try:
            if existed and record is not None and resume and worth_keeping(record):
                work._check_resumable(record, settings, names, out, store)
                work.record = record
            elif existed:
                work._remove_parts()
            work._save()
        except BaseException:
            work.close()
            raise
        return work

    def _check_resumable(
        self, record: dict, settings: dict, names: list[str], out: Path | str, store: S3Store | None
    ) -> None:
        hint = f"rerun with those settings to resume it, or pass resume=false to start over ({self.path})"
        for key, value in settings.items():
            old = record["settings"].get(key)
            if old != value:
                raise UserError(f"out={out}: an interrupted gpt-prepare used {key}={old} (now {value}); {hint}")
        if record["inputs"] != names:
            differ = next((a for a, b in zip(record["inputs"], names, strict=False) if a != b), None)
            which = differ or f"{len(record['inputs'])} files, now {len(names)}"
            raise UserError(f"out={out}: an interrupted gpt-prepare read other input files ({which}); {hint}")
        for done in record["done"] + record.get("scanned", []):
            name = record["inputs"][done["index"]]
            if stat_now(name, store) != done["stat"]:
                raise UserError(f"{name}: changed since an interrupted gpt-prepare tokenized it; {hint}")

    @property
    def done(self) -> dict[int, dict[str, Any]]:
        return {d["index"]: d for d in self.record["done"]}

    @property
    def scanned(self) -> dict[int, dict[str, Any]]:
        """Files scanned for a distributed dedup, not yet done (``executor=ray dedup=true``)."""
        return {d["index"]: d for d in self.record.get("scanned", [])}

    def part(self, index: int, kind: str = "bin") -> Path:
        return self.path / f"part-{index:06d}.{kind}"

    def tokenizer(self) -> Tokenizer | None:
        return load_tokenizer(self.path) if self.record["tokenizer"] else None

    def save_tokenizer(self, tokenizer: Tokenizer) -> None:
        tokenizer.save(self.path)
        self.record["tokenizer"] = True
        self._save()

    def finish_part(self, index: int, entry: dict[str, Any]) -> None:
        """Rename the part's ``.partial`` files into place, then record it as done (and drop its scan)."""
        self._rename_partials(index, {"bin": "bin", "hashes": "hashes"})
        self.record["done"] = [d for d in self.record["done"] if d["index"] != index] + [{"index": index, **entry}]
        scanned = self.record.get("scanned", [])
        self.record["scanned"] = [d for d in scanned if d["index"] != index]
        self._save()
        for kind in SCAN_KINDS:
            with contextlib.suppress(FileNotFoundError):
                self.part(index, kind).unlink()

    def finish_scan(self, index: int, entry: dict[str, Any]) -> None:
        """Rename a scanned file's ``.partial`` files (written as a part's would be, plus where each
        document ends) into their scan names, then record it as scanned."""
        self._rename_partials(index, {"bin": "raw", "hashes": "dochash", "docend": "docend"})
        scanned = [d for d in self.record.get("scanned", []) if d["index"] != index]
        self.record["scanned"] = scanned + [{"index": index, **entry}]
        self._save()

    def _rename_partials(self, index: int, kinds: dict[str, str]) -> None:
        for written, final in kinds.items():
            partial = self.path / f"{self.part(index, written).name}.partial"
            if partial.exists():
                os.replace(partial, self.part(index, final))

    def hashes(self) -> list[np.ndarray]:
        """The kept documents' hashes of every finished part (to rebuild the dedup set on resume)."""
        return [np.fromfile(self.part(i, "hashes"), dtype="<u8") for i in sorted(self.done)]

    def _save(self) -> None:
        tmp = self.path / f".{RECORD}.tmp"
        tmp.write_text(json.dumps(self.record, indent=1))
        os.replace(tmp, self.path / RECORD)

    def _remove_parts(self) -> None:
        for entry in self.path.iterdir():
            if entry.name != LOCK and any(fnmatch.fnmatchcase(entry.name, p) for p in OWN_NAMES):
                entry.unlink()

    def remove(self) -> None:
        """Delete the work dir: only the names this module writes; anything else stays (and so the dir)."""
        self._remove_parts()
        with contextlib.suppress(OSError):
            (self.path / LOCK).unlink()
        self.close()
        try:
            self.path.rmdir()
        except OSError:
            print(f"note: {self.path} kept: it holds files gpt-prepare did not write", flush=True)

    def close(self) -> None:
        if self._lock >= 0:
            os.close(self._lock)
            self._lock = -1


def worth_keeping(record: dict[str, Any]) -> bool:
    """Whether a work dir holds work worth resuming: a finished (or scanned) input file, or a trained
    BPE tokenizer."""
    if record["done"] or record.get("scanned"):
        return True
    return bool(record["tokenizer"]) and record["settings"].get("tokenizer") == "bpe"


def _read_record(path: Path) -> dict[str, Any] | None:
    try:
        record = json.loads((path / RECORD).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("format") != WORK_FORMAT:
        return None
    if not all(isinstance(record.get(k), t) for k, t in (("settings", dict), ("inputs", list), ("done", list))):
        return None
    return record
