"""gpt-prepare from and to s3:// and training from s3://, against moto's S3 server on 127.0.0.1 (real
buckets and requests, one server for the module): the outputs and losses of the local copies, the
owned-output rule in a bucket, and failing servers retried, then one line naming the object."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import zstandard

from conf.errors import UserError
from data.prepare import prepare
from data.s3_output import S3Writer
from data.shards import load_manifest
from tests.conftest import REPO, TINYSHAKESPEARE, one_line_error, prepare_cfg, run_cli
from tests.distributed import last_step, losses
from tests.integration.test_prepare_formats import outputs
from tests.s3_server import S3Server
from tests.unit.test_remote import tokens

BUCKET = "corpora"
SETTINGS = {"tokenizer": "char", "seq_len": 16, "shard_size": 200}
MARKER = ".gpt-prepare.json"


@pytest.fixture(scope="module")
def s3() -> Iterator[S3Server]:
    with S3Server() as server:
        server.bucket(BUCKET)
        yield server


@pytest.fixture(autouse=True)
def cache_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The work dir of an s3:// out goes under $XDG_CACHE_HOME: here, not the user's."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache"


def corpus(root: Path) -> Path:
    """A .jsonl.zst, a Parquet file and a .txt: every kind of input, in one directory."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    lines = TINYSHAKESPEARE.read_text()[:40_000].split("\n")
    rng = random.Random(1)
    docs = ["\n".join(rng.choice(lines) for _ in range(rng.randint(1, 30))) for _ in range(60)]
    root.mkdir()
    packed = "".join(json.dumps({"text": d}) + "\n" for d in docs[:30]).encode()
    (root / "a.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(packed))
    pq.write_table(pa.table({"text": docs[30:59]}), root / "b.parquet", row_group_size=5)
    (root / "c.txt").write_text(docs[59])
    return root


def downloaded(s3: S3Server, url: str, into: Path) -> Path:
    """The objects under ``url`` as files of ``into``, to compare with a local output."""
    bucket, _, prefix = url.removeprefix("s3://").partition("/")
    into.mkdir()
    for name in s3.keys(url):
        body = s3.client.get_object(Bucket=bucket, Key=f"{prefix}/{name}")["Body"].read()
        (into / name).write_bytes(body)
    return into


def test_s3_input_and_output_give_the_local_output(s3: S3Server, tmp_path: Path, cache_home: Path) -> None:
    src = corpus(tmp_path / "src")
    (src / "README.md").write_text("not an input")
    raw = s3.upload(src, f"s3://{BUCKET}/raw")
    prepare(prepare_cfg(input=str(src), out=str(tmp_path / "local"), **SETTINGS))
    out = f"s3://{BUCKET}/shards/ts"
    assert prepare(prepare_cfg(input=raw, out=out, workers=2, **SETTINGS)) == out
    got = downloaded(s3, out, tmp_path / "got")
    assert outputs(got) == outputs(tmp_path / "local")
    inputs = json.loads((got / "manifest.json").read_text())["source"]["inputs"]
    assert inputs == [f"{raw}/a.jsonl.zst", f"{raw}/b.parquet", f"{raw}/c.txt"]
    assert sorted(json.loads((got / MARKER).read_text())["files"]) == sorted(
        p.name for p in got.iterdir() if p.name != MARKER
    )
    assert not any(cache_home.rglob("part-*"))  # the work dir is gone
    remote, local = load_manifest(out), load_manifest(tmp_path / "local")  # what training reads
    assert np.array_equal(tokens(remote, "train"), tokens(local, "train"))
    # a glob over objects reads what the same glob reads locally
    prepare(prepare_cfg(input=f"{raw}/*.[pt]*", out=f"s3://{BUCKET}/shards/glob", **SETTINGS))
    prepare(prepare_cfg(input=str(src / "*.[pt]*"), out=str(tmp_path / "glob"), **SETTINGS))
    assert outputs(downloaded(s3, f"s3://{BUCKET}/shards/glob", tmp_path / "g")) == outputs(tmp_path / "glob")


def test_an_s3_out_replaces_only_its_own_objects(s3: S3Server, tmp_path: Path) -> None:
    src = corpus(tmp_path / "src")
    out = f"s3://{BUCKET}/own/ts"
    prepare(prepare_cfg(input=str(src), out=out, **SETTINGS))
    first = s3.keys(out)
    with pytest.raises(UserError, match=f"^out={out}: already holds a gpt-prepare output; pass overwrite=true"):
        prepare(prepare_cfg(input=str(src), out=out, **SETTINGS))
    s3.client.put_object(Bucket=BUCKET, Key="own/ts/notes.txt", Body=b"mine")
    with pytest.raises(UserError, match=r"holds objects gpt-prepare did not write \(notes\.txt\) beside its output"):
        prepare(prepare_cfg(input=str(src), out=out, overwrite=True, **SETTINGS))
    assert s3.keys(out) == sorted([*first, "notes.txt"])
    s3.client.delete_object(Bucket=BUCKET, Key="own/ts/notes.txt")
    for shard_size in (50, 400):  # more shards, then fewer: the old ones it no longer has are deleted
        prepare(prepare_cfg(input=str(src), out=out, overwrite=True, **{**SETTINGS, "shard_size": shard_size}))
        manifest = load_manifest(out)
        shards = {s.path.name for split in manifest.splits.values() for s in split}
        assert set(s3.keys(out)) == {*shards, "manifest.json", "tokenizer.json", MARKER}
    s3.client.delete_object(Bucket=BUCKET, Key=f"own/ts/{MARKER}")  # a shard set written before markers
    prepare(prepare_cfg(input=str(src), out=out, overwrite=True, **SETTINGS))
    s3.client.put_object(Bucket=BUCKET, Key="theirs/x.txt", Body=b"theirs")
    with pytest.raises(
        UserError, match=r"^out=s3://corpora/theirs: holds objects gpt-prepare did not write \(x\.txt\)"
    ):
        prepare(prepare_cfg(input=str(src), out=f"s3://{BUCKET}/theirs", overwrite=True, **SETTINGS))
    raw = s3.upload(src, f"s3://{BUCKET}/theirs/raw")
    with pytest.raises(UserError, match=r"^out=s3://corpora/theirs: holds the input s3://corpora/theirs/raw/a\.jsonl"):
        prepare(prepare_cfg(input=raw, out=f"s3://{BUCKET}/theirs", **SETTINGS))
    assert s3.keys(f"s3://{BUCKET}/theirs") == ["raw/a.jsonl.zst", "raw/b.parquet", "raw/c.txt", "x.txt"]


def test_an_interrupted_s3_write_leaves_no_manifest_and_is_replaced(
    s3: S3Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = corpus(tmp_path / "src")
    out = f"s3://{BUCKET}/cut/ts"
    publish, calls = S3Writer.publish, []

    def killed_after_three(self: S3Writer, path: Path) -> None:
        calls.append(path.name)
        if len(calls) > 3:
            raise KeyboardInterrupt
        publish(self, path)

    monkeypatch.setattr(S3Writer, "publish", killed_after_three)
    with pytest.raises(KeyboardInterrupt):
        prepare(prepare_cfg(input=str(src), out=out, **SETTINGS))
    monkeypatch.setattr(S3Writer, "publish", publish)
    keys = s3.keys(out)
    assert "manifest.json" not in keys and "tokenizer.json" in keys and len(keys) == 4  # marker, tokenizer, 2 shards
    marker = json.loads(s3.client.get_object(Bucket=BUCKET, Key=f"cut/ts/{MARKER}")["Body"].read())
    assert set(keys) - {MARKER} <= set(marker["files"])  # every object there is accounted for
    prepare(prepare_cfg(input=str(src), out=out, **SETTINGS))  # ours and unfinished: no overwrite=true needed
    prepare(prepare_cfg(input=str(src), out=str(tmp_path / "local"), **SETTINGS))
    assert outputs(downloaded(s3, out, tmp_path / "got")) == outputs(tmp_path / "local")


def test_a_failing_server_is_retried_then_one_line_names_the_object(s3: S3Server, tmp_path: Path) -> None:
    src = corpus(tmp_path / "src")
    raw = s3.upload(src, f"s3://{BUCKET}/flaky")
    bad = f"{BUCKET}/flaky/a.jsonl.zst"
    with s3.faults(lambda method, path, nth: "503" if method == "GET" and path == bad else None):
        result = run_cli("data.prepare", f"input={raw}", f"out={tmp_path / 'o'}", "retries=1", env=s3.subprocess_env())
        assert s3.requests["GET", bad] == 2
    assert one_line_error(result, 2) == f"error: s3://{bad}: HTTP 503 SlowDown after 2 attempts"
    shard = f"{BUCKET}/flaky-out/train-000001.tar"
    with s3.faults(lambda method, path, nth: "503" if method == "PUT" and path == shard else None):
        out = f"s3://{BUCKET}/flaky-out"
        message = f"^s3://{shard}: HTTP 503 SlowDown after 2 attempts \\(3 of 3 input files done and kept in "
        with pytest.raises(UserError, match=message):  # the work is kept: the same command resumes
            prepare(prepare_cfg(input=str(src), out=out, retries=1, **SETTINGS))
        assert s3.requests["PUT", shard] == 2 and "manifest.json" not in s3.keys(out)


@pytest.mark.slow
def test_training_from_s3_gives_the_losses_of_the_local_copy(s3: S3Server, char_shards: Path, tmp_path: Path) -> None:
    """The local run, and the same run from s3:// killed (-9) after its step-8 checkpoint and rerun in
    place: every step's loss equal, the steps after the checkpoint trained again from the bucket."""
    url = s3.upload(char_shards, f"s3://{BUCKET}/train/ts")
    args = [
        "model=tiny",
        "train.micro_batch=4",
        "train.global_batch=8",
        "train.max_steps=24",
        "train.save_every=8",
        "train.eval_every=0",
        "train.eval_batches=1",
        "train.sample_tokens=0",
        "logging.wandb=disabled",
        "logging.progress_bar=false",
    ]
    local, remote = tmp_path / "local", tmp_path / "s3"
    with s3.faults(lambda *_: None):  # counts the requests
        result = run_cli("pretrain.train", f"data.dir={char_shards}", f"run.dir={local}", *args)
        assert result.returncode == 0, result.stderr[-3000:]
        assert not s3.requests
        cmd = [sys.executable, "-m", "pretrain.train", f"data.dir={url}", f"run.dir={remote}", *args]
        killed = subprocess.Popen(
            cmd, cwd=REPO, env=s3.subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        try:
            latest, deadline = remote / "checkpoints" / "latest", time.monotonic() + 240
            while not (latest.is_file() and latest.read_text().strip() == "step_8" and last_step(remote) >= 10):
                assert killed.poll() is None and time.monotonic() < deadline, "the s3 run ended before step 10"
                time.sleep(0.02)
        finally:
            killed.kill()
            killed.wait(timeout=30)
        assert any(method == "GET" and path.endswith(".tar") for method, path in s3.requests)  # shards came over S3
        rerun = run_cli("pretrain.train", f"data.dir={url}", f"run.dir={remote}", *args, env=s3.subprocess_env())
        assert rerun.returncode == 0, rerun.stderr[-3000:]
        assert "resumed from" in rerun.stdout
    want, got = losses(local), losses(remote)
    assert sorted(got) == list(range(1, 25)) and got == want
