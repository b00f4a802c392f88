"""No command deletes or overwrites a file it did not write; bad arguments are one-line errors.

Mostly in-process (``prepare(cfg)``, the policy functions); three console-script runs check
what a user sees: one ``error:`` line, exit 2, no traceback, their file intact; one kills
gpt-prepare with SIGKILL mid-write and checks that the rerun removes the temp dir it left.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conf.cli import compose
from conf.errors import UserError
from data.output_dir import check_output_dir, check_run_dir, listing, marker_name, owned_output
from data.prepare import prepare
from data.shards import load_manifest
from tests.conftest import REPO, TINYSHAKESPEARE, prepare_cfg, run_cli

THESIS = b"\\documentclass{article} % a year of work\n"


@pytest.fixture
def text(tmp_path: Path) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text(TINYSHAKESPEARE.read_text()[:8000])
    return path


def _prepare(text: Path, out: Path, **overrides: object) -> Path:
    return prepare(prepare_cfg(**{"input": str(text), "out": str(out), "shard_size": 32, **overrides}))


def _no_temp_dirs(parent: Path) -> bool:
    return not [p for p in parent.iterdir() if p.name.startswith(".") and (".tmp-" in p.name or ".old-" in p.name)]


def _one_error_line(result) -> str:  # noqa: ANN001
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert lines[0].startswith("error: ")
    return lines[0]


def test_foreign_file_is_refused_and_kept_even_with_overwrite(tmp_path: Path, text: Path) -> None:
    out = tmp_path / "d"
    out.mkdir()
    (out / "thesis.tex").write_bytes(THESIS)
    for overwrite in (False, True):
        with pytest.raises(UserError, match=r"out=.*/d: holds files gpt-prepare did not write \(thesis.tex\)"):
            _prepare(text, out, overwrite=overwrite)
    assert listing(out) == ["thesis.tex"] and (out / "thesis.tex").read_bytes() == THESIS
    assert _no_temp_dirs(tmp_path)


def test_empty_dir_is_fine_and_gets_a_marker(tmp_path: Path, text: Path) -> None:
    out = tmp_path / "empty"
    out.mkdir()
    _prepare(text, out)
    marker = json.loads((out / marker_name("gpt-prepare")).read_text())
    assert marker["command"] == "gpt-prepare"
    assert sorted(marker["files"] + [marker_name("gpt-prepare")]) == listing(out)
    assert "manifest.json" in marker["files"] and "tokenizer.json" in marker["files"]


def test_rerun_needs_overwrite_which_replaces_only_its_own_files(tmp_path: Path, text: Path) -> None:
    out = tmp_path / "ts"
    _prepare(text, out, shard_size=8)  # many shards
    many = listing(out)
    with pytest.raises(UserError, match="already holds a gpt-prepare output; pass overwrite=true"):
        _prepare(text, out, seq_len=32)
    assert listing(out) == many
    _prepare(text, out, seq_len=32, overwrite=True)  # fewer, larger shards: the old extra ones must go
    assert load_manifest(out).seq_len == 32
    listed = json.loads((out / marker_name("gpt-prepare")).read_text())["files"]
    assert listing(out) == sorted([marker_name("gpt-prepare"), *listed])
    assert len(listing(out)) < len(many) and _no_temp_dirs(tmp_path)

    (out / "notes.md").write_text("mine")
    with pytest.raises(UserError, match=r"did not write \(notes.md\) beside its output; overwrite=true replaces only"):
        _prepare(text, out, overwrite=True)
    assert (out / "notes.md").read_text() == "mine" and (out / "manifest.json").is_file()


def test_old_shard_set_without_marker_counts_as_owned(tmp_path: Path, text: Path) -> None:
    out = tmp_path / "old"
    _prepare(text, out)
    (out / marker_name("gpt-prepare")).unlink()  # as written before markers existed
    with pytest.raises(UserError, match="overwrite=true"):
        _prepare(text, out)
    _prepare(text, out, overwrite=True)
    assert (out / marker_name("gpt-prepare")).is_file()

    (out / marker_name("gpt-prepare")).unlink()
    (out / "extra.tar").write_bytes(b"not listed in the manifest")
    with pytest.raises(UserError, match=r"\(extra.tar\)"):
        _prepare(text, out, overwrite=True)
    assert (out / "extra.tar").is_file()


def test_failed_overwrite_leaves_the_old_output(tmp_path: Path, text: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "ts"
    _prepare(text, out)
    before = {name: (out / name).read_bytes() for name in listing(out)}

    def boom(*_: object) -> None:
        raise RuntimeError("disk full")

    monkeypatch.setattr("data.prepare.write_manifest", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        _prepare(text, out, seq_len=32, overwrite=True)
    assert {name: (out / name).read_bytes() for name in listing(out)} == before
    assert _no_temp_dirs(tmp_path)


def test_input_inside_out_is_named(tmp_path: Path, text: Path) -> None:
    for overwrite in (False, True):
        with pytest.raises(UserError, match=r"holds the input .*corpus.txt; write the output to a new directory"):
            _prepare(text, tmp_path, overwrite=overwrite)
    assert text.is_file()


def test_cli_prepare_refusal_is_one_line_and_keeps_the_file(tmp_path: Path, text: Path) -> None:
    out = tmp_path / "d"
    out.mkdir()
    (out / "thesis.tex").write_bytes(THESIS)
    line = _one_error_line(run_cli("data.prepare", f"input={text}", f"out={out}"))
    expected = "holds files gpt-prepare did not write (thesis.tex); choose a new or empty directory"
    assert line == f"error: out={out}: {expected}"
    assert (out / "thesis.tex").read_bytes() == THESIS and listing(out) == ["thesis.tex"]


@pytest.mark.slow
def test_rerun_after_kill_9_removes_the_temp_dir_it_left(tmp_path: Path) -> None:
    """SIGKILL runs no cleanup: the temp dir stays until the same command on the same out= runs again."""
    out = tmp_path / "ts"
    args = ("data.prepare", f"input={TINYSHAKESPEARE}", f"out={out}", "shard_size=8")  # ~2,000 shards: ~1 s of writing
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    run = subprocess.Popen([sys.executable, "-m", *args], cwd=REPO, env=env, stdout=subprocess.DEVNULL)
    try:
        while not (left := list(tmp_path.glob(".ts.tmp-gpt-prepare-*"))) and run.poll() is None:
            time.sleep(0.002)
        run.kill()
    finally:
        run.wait()
    assert left and left[0].is_dir() and f"-{run.pid}-" in left[0].name
    assert not out.exists()

    result = run_cli(*args)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"note: removed {left[0]} left by a killed gpt-prepare (pid {run.pid})" in result.stdout
    assert _no_temp_dirs(tmp_path) and load_manifest(out).seq_len == 64
    listed = json.loads((out / marker_name("gpt-prepare")).read_text())["files"]
    assert listing(out) == sorted([marker_name("gpt-prepare"), *listed])


def test_export_policy(tmp_path: Path) -> None:
    from pretrain.export import legacy_export

    policy = {"command": "gpt-export", "legacy": legacy_export}
    out = tmp_path / "hf"
    out.mkdir()
    (out / "config.json").write_text("{}")  # a transformers dir someone else wrote: no gpt_pretrain.json
    with pytest.raises(UserError, match=r"did not write \(config.json\)"):
        check_output_dir(out, overwrite=True, **policy)
    (out / "gpt_pretrain.json").write_text("{}")  # an export from before markers existed
    assert check_output_dir(out, overwrite=True, **policy) == {"config.json", "gpt_pretrain.json"}

    with owned_output(out, overwrite=True, **policy) as tmp:
        (tmp / "model.safetensors").write_bytes(b"new")
    assert listing(out) == [".gpt-export.json", "model.safetensors"]
    with pytest.raises(UserError, match="pass overwrite=true"):
        check_output_dir(out, overwrite=False, **policy)
    # another command's output is not this one's, and the message says whose it is
    with pytest.raises(UserError, match=r"gpt-prepare did not write .* \(a gpt-export output\)"):
        check_output_dir(out, "gpt-prepare", True)


def test_cli_export_into_a_dir_with_a_foreign_file(tmp_path: Path) -> None:
    """Refused before the checkpoint is looked at: a missing one does not matter."""
    out = tmp_path / "hf"
    out.mkdir()
    (out / "thesis.tex").write_bytes(THESIS)
    line = _one_error_line(run_cli("pretrain.export", f"checkpoint={tmp_path}/none", f"out={out}"))
    assert "gpt-export did not write (thesis.tex)" in line
    assert (out / "thesis.tex").read_bytes() == THESIS and listing(out) == ["thesis.tex"]


def test_check_run_dir(tmp_path: Path) -> None:
    own = ("config.yaml", "checkpoints", "samples_rank*.jsonl", ".hydra")
    check_run_dir(tmp_path / "new", own)
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "samples_rank0.jsonl").write_text("")
    check_run_dir(run, own)
    (run / "thesis.tex").write_bytes(THESIS)
    (run / "data.csv").write_text("")
    (run / "z.txt").write_text("")
    with pytest.raises(
        UserError, match=r"run.dir=.*/run: holds files a run does not write \(data.csv, thesis.tex and 1 "
    ):
        check_run_dir(run, own)
    (tmp_path / "file").write_text("")
    with pytest.raises(UserError, match="not a directory"):
        check_run_dir(tmp_path / "file", own)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("num_fewshot=[0,-1]", "num_fewshot=-1: each k must be an integer >= 0"),
        (None, r"holds files gpt-eval does not"),
    ],
)
def test_eval_refuses_before_any_work(tmp_path: Path, override: str | None, message: str) -> None:
    from pretrain.evaluate import run_lm_eval

    run = tmp_path / "r"
    run.mkdir()
    if override is None:
        (run / "thesis.tex").write_bytes(THESIS)
    cfg = compose([f"checkpoint={tmp_path}/none", f"run.dir={run}", *([override] if override else [])], "eval")
    with pytest.raises(UserError, match=message):
        run_lm_eval(cfg)
    assert not (run / "tasks").exists()


def test_generate_checks_its_arguments_before_the_checkpoint(tmp_path: Path) -> None:
    from conf.tool_schemas import GenerateRoot, typed

    line = _one_error_line(run_cli("pretrain.generate", f"checkpoint={tmp_path}/none", "max_new_tokens=-5"))
    assert line == "error: max_new_tokens=-5: must be >= 1"
    for override, message in (("temperature=-1", "temperature=-1"), ("top_k=-3", "top_k=-3")):
        with pytest.raises(UserError, match=message):
            typed(compose(["checkpoint=x", override], "generate"), GenerateRoot)
    with pytest.raises(UserError, match="seed=x: expected an integer"):  # a config built in Python: the same check
        typed({"checkpoint": "x", "seed": "x"}, GenerateRoot)
    config = typed(compose(["checkpoint=x", "top_k=0", "temperature=0"], "generate"), GenerateRoot)
    assert (config.max_new_tokens, config.temperature, config.top_k, config.seed) == (200, 0.0, 0, 0)
