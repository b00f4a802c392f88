"""Owned output directories: a command deletes or overwrites only files it wrote itself.

Why: ``out=`` and ``run.dir=`` are typed by hand, and a typo or a reused name (``out=.``,
``out=~/thesis``, ``out=`` the corpus directory) must never cost a user their files. So:

- a command that writes a directory leaves a marker in it (``.gpt-prepare.json``,
  ``.gpt-export.json``) naming the command and listing the files it wrote;
- a directory that does not exist, or is empty, is always fine;
- a directory holding anything the marker (or, for outputs written before markers existed,
  a recognisable layout) does not account for is refused with a one-line :class:`UserError`
  naming those files, before any work, whatever ``overwrite`` says;
- this command's own output is refused unless ``overwrite=true``, which then removes exactly
  the files the marker lists and nothing else;
- the new output is written into a hidden temporary directory beside ``out`` and swapped in
  at the end, so a failure (or Ctrl-C) leaves ``out`` as it was;
- that temp dir, and the old output moved aside during the swap, carry their maker's host and pid
  in their names (``.OUT.tmp-gpt-prepare-HOST-PID-HEX``): a run killed with ``kill -9`` cannot
  remove them itself, so the next run of the same command on the same ``out`` removes those whose
  maker is gone (:func:`remove_litter`), and no others.

Run directories of training and evaluation are checked by name instead
(:func:`check_run_dir`): a run resumes in its own directory, so those files are expected there.

This module is the lowest layer (``data/``): it imports nothing from ``pretrain/`` or ``parallel/``.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import os
import re
import shutil
import socket
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from conf.errors import UserError

MARKER_FORMAT = "gpt-owned-output/1"

# What gpt-pretrain / gpt-finetune write into run.dir (names or glob patterns), for check_run_dir.
RUN_DIR_NAMES = (
    "config.yaml",
    "metrics.jsonl",
    "checkpoints",
    "loss.png",
    "eval.png",
    "moe.png",  # a MoE run's router metrics (pretrain/trainer/moe_plot.py)
    "results.json",
    "wandb",
    "wandb_id",
    "samples_rank*.jsonl",
    "restarted-*",
    ".hydra",
    "conf",  # gpt-import's model preset (RUN_DIR/conf/model/<name>.yaml)
    ".gpt-import.json",  # gpt-import's marker: its run dir continues as a pretraining run
    ".lease.json*",  # the one writer's lease (parallel/run_lease.py) and its temp files
)

# Temp dirs named without host and pid (by earlier versions) are removed only once this old: a
# run of such a version may still be writing into a younger one, and its name cannot tell.
LEGACY_LITTER_AGE_S = 24 * 3600

# A callable that recognises a command's output written before markers existed: the names it
# owns in that directory, or None when the directory is not such an output.
LegacyOwner = Callable[[Path], "set[str] | None"]


def marker_name(command: str) -> str:
    return f".{command}.json"


def _names(paths: list[str], shown: int = 2) -> str:
    """The first one or two names (hidden ones last), and how many more: messages stay one short line."""
    paths = sorted(paths, key=lambda p: (p.startswith("."), p))
    more = f" and {len(paths) - shown} more" if len(paths) > shown else ""
    return ", ".join(paths[:shown]) + more


def refuse_unowned(
    where: str, command: str, present: list[str], owned: set[str] | None, noun: str, fresh: str, writer: str = ""
) -> None:
    """The owned-output rule's refusals, for a directory (``noun`` files) and a bucket prefix (objects): a place
    without ``command``'s marker (``owned`` None), or with other entries beside its output, is not written."""
    if owned is None:
        raise UserError(f"{where}: holds {noun} {command} did not write ({_names(present)}){writer}; choose {fresh}")
    foreign = [p for p in present if p not in owned]
    if foreign:
        raise UserError(
            f"{where}: holds {noun} {command} did not write ({_names(foreign)}) beside its output; "
            f"overwrite=true replaces only {command}'s own {noun}, so move those or choose {fresh}"
        )


def listing(directory: Path) -> list[str]:
    """Every file, link and empty directory under ``directory``, as sorted relative POSIX paths."""
    found: list[str] = []
    for root, dirs, files in os.walk(directory):
        base = Path(root)
        entries = files + [d for d in dirs if (base / d).is_symlink()]  # os.walk does not descend into links
        if not entries and not dirs and base != directory:
            entries = [""]  # an empty directory counts as an entry of its own
        found += [(base / e).relative_to(directory).as_posix() for e in entries]
    return sorted(found)


def _owned(out: Path, command: str, legacy: LegacyOwner | None) -> set[str] | None:
    """What ``command`` may replace in ``out``: its marker's list, or a legacy layout's names."""
    marker = out / marker_name(command)
    if marker.is_file():
        try:
            record = json.loads(marker.read_text())
            files = {str(f) for f in record["files"]} if record.get("command") == command else None
        except (OSError, ValueError, KeyError, TypeError):
            files = None
        if files is None:
            raise UserError(f"{marker}: unreadable marker; move the directory away or choose a new or empty one")
        return files | {marker.name}
    return legacy(out) if legacy else None


def _writer_of(out: Path) -> str:
    """`` (a gpt-export output)`` when another command's marker explains the files; else empty."""
    for marker in sorted(out.glob(".gpt-*.json")):
        with contextlib.suppress(OSError, ValueError, AttributeError, KeyError, TypeError):
            record = json.loads(marker.read_text())
            if record.get("format") == MARKER_FORMAT:
                return f" (a {record['command']} output)"
    return ""


def check_output_dir(
    out: str | Path,
    command: str,
    overwrite: bool,
    *,
    key: str = "out",
    inputs: Iterable[str | Path] = (),
    legacy: LegacyOwner | None = None,
    tidy: bool = True,
) -> set[str]:
    """Refuse, in one line, an ``out`` that ``command`` may not write; return the names it would replace.

    ``inputs`` are the files the command reads: one inside ``out`` gets its own message, since
    replacing ``out`` would replace the input. With ``tidy`` it first removes what a killed run of
    ``command`` left beside ``out`` (:func:`remove_litter`): the commands call this check first,
    and the litter is theirs to remove even when the check then refuses.
    """
    if tidy:
        remove_litter(out, command)
    out = Path(out).expanduser()
    if not out.exists():
        ancestor = out.parent
        while not ancestor.exists() and ancestor != ancestor.parent:
            ancestor = ancestor.parent
        if not ancestor.is_dir():
            raise UserError(f"{key}={out}: {ancestor} is not a directory")
        return set()
    if not out.is_dir():
        raise UserError(f"{key}={out}: exists and is not a directory; choose a new or empty directory")
    resolved = out.resolve()
    for path in inputs:
        if Path(path).resolve() == resolved or resolved in Path(path).resolve().parents:
            raise UserError(f"{key}={out}: holds the input {path}; write the output to a new directory outside it")
    present = listing(out)
    if not present:
        return set()
    owned = _owned(out, command, legacy)
    where, fresh = f"{key}={out}", "a new or empty directory"
    refuse_unowned(where, command, present, owned, "files", fresh, _writer_of(out) if owned is None else "")
    if not overwrite:
        raise UserError(f"{key}={out}: already holds a {command} output; pass overwrite=true to replace it")
    return set(present)  # all of them owned; never a listed name that is not actually there


def _remove_listed(directory: Path, names: set[str]) -> bool:
    """Remove exactly ``names`` (files, links, empty dirs) under ``directory``, then the dirs left empty.

    Returns whether ``directory`` is gone. A name below a link is skipped: the link leads out of
    ``directory``, to files that are not the ones listed.
    """
    parents: set[Path] = {directory}
    for name in sorted(names, key=lambda n: -n.count("/")):
        path = directory / name
        inside = [p for p in path.parents if directory in p.parents]
        if ".." in Path(name).parts or Path(name).is_absolute() or any(p.is_symlink() for p in inside):
            continue
        parents.update(inside)
        if path.is_symlink() or path.is_file():
            path.unlink()
        elif path.is_dir():
            with contextlib.suppress(OSError):
                path.rmdir()  # listed as an empty dir; anything since put in it stays
    for parent in sorted(parents, key=lambda p: -len(p.parts)):
        with contextlib.suppress(OSError):
            parent.rmdir()  # only when empty: whatever we did not list stays
    return not directory.exists()


def _host() -> str:
    """This machine's name as it goes into a temp dir's name: only ``[A-Za-z0-9_.-]``, so it parses back."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", socket.gethostname()) or "localhost"


def _aside(out: Path, kind: str, command: str) -> Path:
    """A fresh ``.OUT.KIND-COMMAND-HOST-PID-HEX`` beside ``out``: who made it is in its name, so a
    later run can tell a killed maker's left-over from a running one's (:func:`remove_litter`)."""
    return out.parent / f".{out.name}.{kind}-{command}-{_host()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs on this host; a pid we may not signal is someone's live process."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True  # another user's process; a pid too large to check is not ours to judge dead
    return True


def _newest_mtime(directory: Path) -> float:
    """The latest mtime in the tree (links not followed): a run still writing touches some file in it."""
    newest = directory.lstat().st_mtime
    for root, dirs, files in os.walk(directory):
        for name in dirs + files:
            with contextlib.suppress(OSError):
                newest = max(newest, os.lstat(os.path.join(root, name)).st_mtime)
    return newest


def _marker_files(directory: Path, command: str) -> set[str] | None:
    """The names ``command``'s marker in ``directory`` lists (with the marker), or None when there is
    no readable marker of ``command``: then nothing says which files in it ``command`` wrote."""
    marker = directory / marker_name(command)
    if marker.is_symlink():
        return None
    try:
        record = json.loads(marker.read_text())
        if record["format"] == MARKER_FORMAT and record["command"] == command:
            return {str(f) for f in record["files"]} | {marker.name}
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return None


def _clear_away(path: Path, kind: str, out: Path, command: str, why: str) -> None:
    """Remove one left-over ``path`` (of ``kind`` tmp or old); ``why`` says who left it."""
    if kind == "tmp":  # only ever written by the command into its own fresh, hidden directory
        try:
            shutil.rmtree(path)
        except OSError as exc:
            print(f"note: {path}, {why}, could not be removed ({exc.strerror})", flush=True)
            return
        print(f"note: removed {path} {why}", flush=True)
    elif not os.path.lexists(out):  # killed mid-swap: this is out's previous output, and out is gone
        try:
            path.rename(out)
        except OSError as exc:
            print(f"note: kept {path} {why}: out's previous output, not moved back ({exc.strerror})", flush=True)
            return
        print(f"note: restored {out} from {path} {why} (mid-swap)", flush=True)
    elif (names := _marker_files(path, command)) is None:
        print(f"note: kept {path} {why}: it holds no {command} marker, so look inside and remove it", flush=True)
    elif _remove_listed(path, names):
        print(f"note: removed {path} {why}", flush=True)
    else:
        print(f"note: kept {path} {why}: it holds files its {command} marker does not list", flush=True)


def remove_litter(out: str | Path, command: str) -> None:
    """Remove the temp dirs and moved-aside old outputs that killed runs of ``command`` left beside ``out``.

    Why: a run killed with ``kill -9`` runs no cleanup, and its hidden temp dir (hundreds of MB)
    would stay forever. Only ``command``'s own names for this ``out`` are considered, and of those
    only real directories (a link with such a name is not ours) made on this host by a pid that is
    no longer alive; names without host and pid (earlier versions) only once untouched for
    :data:`LEGACY_LITTER_AGE_S`. Another command's, another out's, another host's, a live run's:
    left alone.
    """
    out = Path(out).expanduser().resolve()  # as owned_output names them: beside the real directory
    try:
        entries = sorted(os.scandir(out.parent), key=lambda e: e.name)
    except OSError:
        return  # no parent yet: nothing can have been left there
    host = re.escape(_host())
    for entry in entries:
        for kind in ("tmp", "old"):
            prefix = re.escape(f".{out.name}.{kind}-{command}-")
            made = re.fullmatch(prefix + host + r"-([1-9][0-9]{0,9})-[0-9a-f]{8}", entry.name)
            legacy = re.fullmatch(prefix + r"[0-9a-f]{8}", entry.name)
            if not (made or legacy) or not entry.is_dir(follow_symlinks=False):
                continue
            path = Path(entry.path)
            if made and not _alive(int(made[1])):
                _clear_away(path, kind, out, command, f"left by a killed {command} (pid {made[1]})")
            elif legacy and time.time() - _newest_mtime(path) > LEGACY_LITTER_AGE_S:
                _clear_away(path, kind, out, command, f"left by an earlier {command} over 24 h ago")


@contextlib.contextmanager
def owned_output(
    out: str | Path,
    command: str,
    overwrite: bool,
    *,
    key: str = "out",
    inputs: Iterable[str | Path] = (),
    legacy: LegacyOwner | None = None,
) -> Iterator[Path]:
    """Yield a hidden temp dir beside ``out`` to write into; on success mark it and swap it in.

    ``out`` is checked again just before the swap (it may have changed during a long write).
    The old output, if any, is renamed aside first and only its listed files are then removed,
    so ``out`` always holds either the old or the new output in full.
    """
    out = Path(out).expanduser().resolve()  # out=. or a symlink: the temp dir goes beside the real directory
    inputs = list(inputs)
    check_output_dir(out, command, overwrite, key=key, inputs=inputs, legacy=legacy)  # removes killed runs' litter
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = _aside(out, "tmp", command)
        tmp.mkdir()  # a fresh name (not mkdtemp's mode 0700): out gets the user's usual permissions
    except OSError as exc:
        raise UserError(f"{key}={out}: cannot write there ({exc.strerror})") from exc
    try:
        yield tmp
        owned = check_output_dir(out, command, overwrite, key=key, inputs=inputs, legacy=legacy, tidy=False)
        record = {"format": MARKER_FORMAT, "command": command, "files": listing(tmp)}
        (tmp / marker_name(command)).write_text(json.dumps(record, indent=1) + "\n")
        if not out.exists():
            tmp.rename(out)
            return
        old = _aside(out, "old", command)
        out.rename(old)
        try:
            tmp.rename(out)
        except OSError:
            old.rename(out)
            raise
        if not _remove_listed(old, owned):
            print(f"note: {old} kept: it holds files that appeared while writing", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # our own temp dir, left only when the write failed


def check_run_dir(path: str | Path, own_names: Iterable[str], *, key: str = "run.dir", command: str = "a run") -> None:
    """Refuse, in one line, a run dir that holds entries other than those a run writes.

    ``own_names`` are names or glob patterns of top-level entries (``checkpoints``,
    ``samples_rank*.jsonl``); anything else there is someone else's, and a run writing
    ``config.yaml`` or ``results.json`` beside it could overwrite it.
    """
    path = Path(path).expanduser()
    if not path.exists():
        return
    if not path.is_dir():
        raise UserError(f"{key}={path}: exists and is not a directory")
    patterns = list(own_names)
    foreign = sorted(e.name for e in path.iterdir() if not any(fnmatch.fnmatchcase(e.name, p) for p in patterns))
    if foreign:
        raise UserError(
            f"{key}={path}: holds files {command} does not write ({_names(foreign)}); choose a new or empty directory"
        )
