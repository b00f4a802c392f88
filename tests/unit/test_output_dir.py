"""What a killed command leaves beside ``out`` is removed by its next run, and nothing else is.

In-process and fast: left-over dirs are made by hand with the names ``owned_output`` gives them
(``.OUT.tmp-COMMAND-HOST-PID-HEX``); a dead pid is one of a child that has exited and been reaped.
The end-to-end check with a real ``kill -9`` is in tests/integration/test_output_safety.py.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path

import pytest

from conf.errors import UserError
from data.output_dir import (
    LEGACY_LITTER_AGE_S,
    MARKER_FORMAT,
    _host,
    check_output_dir,
    marker_name,
    owned_output,
    remove_litter,
)

COMMAND = "gpt-prepare"


def _dead_pid() -> int:
    """The pid of a child that has exited and been waited for: no process has it (until reused)."""
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


@pytest.fixture
def dead_pid() -> int:
    return _dead_pid()


def _litter(
    parent: Path, kind: str = "tmp", *, out: str = "ts", command: str = COMMAND, host: str = "", pid: int = 0
) -> Path:
    """A left-over dir named as ``owned_output`` names them, holding one file."""
    path = parent / f".{out}.{kind}-{command}-{host or _host()}-{pid}-0123abcd"
    path.mkdir()
    (path / "shard-000000.tar").write_bytes(b"300 MB, once")
    return path


def _mark(directory: Path, files: list[str], command: str = COMMAND) -> None:
    record = {"format": MARKER_FORMAT, "command": command, "files": files}
    (directory / marker_name(command)).write_text(json.dumps(record))


def test_dead_makers_tmp_dir_is_removed_with_one_note(
    tmp_path: Path, dead_pid: int, capsys: pytest.CaptureFixture[str]
) -> None:
    left = _litter(tmp_path, pid=dead_pid)
    remove_litter(tmp_path / "ts", COMMAND)
    assert not left.exists()
    assert capsys.readouterr().out == f"note: removed {left} left by a killed {COMMAND} (pid {dead_pid})\n"


def test_only_this_commands_litter_for_this_out_from_a_dead_pid_on_this_host_goes(
    tmp_path: Path, dead_pid: int, capsys: pytest.CaptureFixture[str]
) -> None:
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        kept = [
            _litter(tmp_path, pid=os.getpid()),  # a live run: this very process
            _litter(tmp_path, "old", pid=sleeper.pid),  # a live child
            _litter(tmp_path, command="gpt-export", pid=dead_pid),
            _litter(tmp_path, out="ts2", pid=dead_pid),
            _litter(tmp_path, out="t", pid=dead_pid),
            _litter(tmp_path, host="another-host", pid=dead_pid),
        ]
        target = tmp_path / "elsewhere"
        target.mkdir()
        (target / "thesis.tex").write_text("mine")
        link = tmp_path / f".ts.tmp-{COMMAND}-{_host()}-{dead_pid}-0123abcd"
        link.symlink_to(target, target_is_directory=True)  # a link with our name is not ours
        remove_litter(tmp_path / "ts", COMMAND)
    finally:
        sleeper.kill()
        sleeper.wait()
    assert all((p / "shard-000000.tar").is_file() for p in kept)
    assert link.is_symlink() and (target / "thesis.tex").read_text() == "mine"
    assert capsys.readouterr().out == ""


def test_legacy_names_go_only_once_a_day_old(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    young, old = (tmp_path / f".ts.tmp-{COMMAND}-{tag}" for tag in ("0123abcd", "89abcdef"))
    for path in (young, old):
        path.mkdir()
        (path / "part").write_bytes(b"x")
    past = time.time() - LEGACY_LITTER_AGE_S - 60
    for path in (old / "part", old):
        os.utime(path, (past, past))
    remove_litter(tmp_path / "ts", COMMAND)
    assert young.is_dir() and not old.exists()
    assert "left by an earlier gpt-prepare over 24 h ago" in capsys.readouterr().out


def test_old_output_aside_goes_only_when_its_marker_lists_it(
    tmp_path: Path, dead_pid: int, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "ts").mkdir()  # the swap finished: out holds the new output
    ours = _litter(tmp_path, "old", pid=dead_pid)
    _mark(ours, ["shard-000000.tar"])
    remove_litter(tmp_path / "ts", COMMAND)
    assert not ours.exists()
    assert capsys.readouterr().out == f"note: removed {ours} left by a killed {COMMAND} (pid {dead_pid})\n"

    unmarked = _litter(tmp_path, "old", pid=dead_pid)  # e.g. an output from before markers existed
    unlisted = _litter(tmp_path, "old", pid=_dead_pid())
    _mark(unlisted, [])  # its marker does not list the shard
    remove_litter(tmp_path / "ts", COMMAND)
    notes = capsys.readouterr().out.splitlines()
    assert (unmarked / "shard-000000.tar").is_file() and (unlisted / "shard-000000.tar").is_file()
    assert sorted(notes) == sorted(
        [
            f"note: kept {unmarked} left by a killed {COMMAND} (pid {dead_pid}): it holds no {COMMAND} marker, "
            "so look inside and remove it",
            f"note: kept {unlisted} left by a killed {COMMAND} (pid {unlisted.name.split('-')[-2]}): "
            f"it holds files its {COMMAND} marker does not list",
        ]
    )


def test_old_output_aside_is_restored_when_out_is_missing(
    tmp_path: Path, dead_pid: int, capsys: pytest.CaptureFixture[str]
) -> None:
    """Killed between moving out aside and moving the new output in: the old output is all there is."""
    aside = _litter(tmp_path, "old", pid=dead_pid)
    _mark(aside, ["shard-000000.tar"])
    remove_litter(tmp_path / "ts", COMMAND)
    assert (tmp_path / "ts" / "shard-000000.tar").is_file() and not aside.exists()
    assert "note: restored" in capsys.readouterr().out


def test_litter_is_removed_even_when_the_check_refuses(tmp_path: Path, dead_pid: int) -> None:
    out = tmp_path / "ts"
    out.mkdir()
    (out / "thesis.tex").write_text("mine")
    left = _litter(tmp_path, pid=dead_pid)
    with pytest.raises(UserError, match="did not write"), owned_output(out, COMMAND, True):
        pass
    assert not left.exists() and (out / "thesis.tex").read_text() == "mine"
    left = _litter(tmp_path, pid=dead_pid)
    with pytest.raises(UserError, match="did not write"):
        check_output_dir(out, COMMAND, True)  # what the commands call first, before any work
    assert not left.exists()


def test_temp_dirs_are_named_with_host_and_pid(tmp_path: Path) -> None:
    out = tmp_path / "ts"
    with owned_output(out, COMMAND, False) as tmp:
        (tmp / "a.txt").write_text("new")
        assert re.fullmatch(rf"\.ts\.tmp-{COMMAND}-{re.escape(_host())}-{os.getpid()}-[0-9a-f]{{8}}", tmp.name)
        remove_litter(out, COMMAND)  # a concurrent rerun: our own live temp dir stays
        assert (tmp / "a.txt").is_file()
    assert (out / "a.txt").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ts"]
