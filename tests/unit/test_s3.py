"""s3:// shard sets (data/remote.py over data/s3.py): moto's S3 server on 127.0.0.1 with real buckets
and requests, one server for the module; the guarantees of http(s):// (size and sha256 verified,
retries then one line naming the object, the cache, exact resume, mixtures)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from conf.errors import UserError
from data.mixture import MixtureLoader, Source
from data.remote import RemoteOptions
from data.shard_cache import ShardCache
from data.shards import check_files, load_manifest
from data.stream import Layout, TrainLoader
from pretrain.trainer.resume_checks import data_identity
from tests.s3_server import S3Server
from tests.unit.test_remote import tokens, train_steps

FAST = RemoteOptions(backoff_s=0.001)
BUCKET = "unit-shards"


@pytest.fixture(scope="module")
def s3() -> Iterator[S3Server]:
    with S3Server() as server:
        server.bucket(BUCKET)
        yield server


@pytest.fixture(scope="module")
def s3_shards(s3: S3Server, char_shards: Path) -> str:
    return s3.upload(char_shards, f"s3://{BUCKET}/corpus/ts")


def test_s3_reads_what_the_directory_holds(s3_shards: str, char_shards: Path) -> None:
    local = load_manifest(char_shards)
    remote = load_manifest(f"{s3_shards}/", FAST)
    check_files(remote)  # sizes by HEAD
    assert remote.location == s3_shards
    for split in ("train", "val"):
        assert np.array_equal(tokens(remote, split), tokens(local, split))
    assert all(np.array_equal(a, b) for a, b in zip(train_steps(remote), train_steps(local), strict=True))
    ours, theirs = data_identity(remote), data_identity(local)
    assert ours.pop("data_dir") == s3_shards and theirs.pop("data_dir") == str(char_shards)
    assert ours == theirs  # the same shard set: a run may resume from the other copy


def test_errors_and_corrupt_bodies_are_retried_to_identical_data(
    s3: S3Server, s3_shards: str, char_shards: Path
) -> None:
    train, val = f"{BUCKET}/corpus/ts/train-000003.tar", f"{BUCKET}/corpus/ts/val-000001.tar"

    def fault(method: str, path: str, nth: int) -> str | None:
        if method == "GET" and path == train and nth <= 2:
            return "503"
        return "corrupt" if method == "GET" and path == val and nth == 1 else None

    with s3.faults(fault):
        remote = load_manifest(s3_shards, FAST)
        for split in ("train", "val"):
            assert np.array_equal(tokens(remote, split), tokens(load_manifest(char_shards), split))
        assert s3.requests["GET", train] == 3 and s3.requests["GET", val] == 2


@pytest.mark.parametrize(
    ("action", "reason"),
    [("503", "HTTP 503 SlowDown"), ("corrupt", "sha256 mismatch"), ("stored", "sha256 mismatch")],
)
def test_an_object_that_keeps_failing_stops_in_one_line_naming_it(
    s3: S3Server, char_shards: Path, tmp_path: Path, action: str, reason: str
) -> None:
    """503s, bodies corrupted on the way and an object stored damaged (the manifest's sha256 catches
    both): retried, then one line naming the object."""
    for path in char_shards.iterdir():
        blob = path.read_bytes()
        if action == "stored" and path.name == "train-000003.tar":
            blob = blob[:1000] + bytes([blob[1000] ^ 0xFF]) + blob[1001:]
        (tmp_path / path.name).write_bytes(blob)
    url = s3.upload(tmp_path, f"s3://{BUCKET}/{action}")
    bad = f"{url.removeprefix('s3://')}/train-000003.tar"
    fault = None if action == "stored" else action
    with s3.faults(lambda method, path, nth: fault if method == "GET" and path == bad else None):
        remote = load_manifest(url, FAST)
        with pytest.raises(UserError, match=f"^{re.escape(f'shard s3://{bad}: {reason} after 4 attempts')}$"):
            tokens(remote, "train")
        assert s3.requests["GET", bad] == 4  # never a skip


def test_missing_shard_and_missing_shard_set_are_named(s3: S3Server, char_shards: Path, tmp_path: Path) -> None:
    for path in char_shards.iterdir():
        if path.name != "train-000007.tar":
            (tmp_path / path.name).symlink_to(path)
    url = s3.upload(tmp_path, f"s3://{BUCKET}/incomplete")
    with pytest.raises(UserError, match=f"^shard {re.escape(url)}/train-000007.tar: missing$"):
        check_files(load_manifest(url, FAST))
    message = f"data.dir file s3://{BUCKET}/nothing/manifest.json: not found (NoSuchKey); is data.dir a gpt-prepare"
    with pytest.raises(UserError, match=f"^{re.escape(message)}"):
        load_manifest(f"s3://{BUCKET}/nothing", FAST)
    with pytest.raises(UserError, match="NoSuchBucket"):
        load_manifest("s3://no-such-bucket/ts", FAST)


def test_a_mixture_with_an_s3_source_resumes_exactly(
    s3_shards: str, char_shards: Path, small_char_shards: Path
) -> None:
    def loader(web: str, state: dict | None = None) -> MixtureLoader:
        sources = [Source("web", load_manifest(web, FAST), 0.6), Source("books", load_manifest(small_char_shards), 0.4)]
        mixture = MixtureLoader(sources, Layout(8, 8), 7, 12)
        if state is not None:
            mixture.load_state_dict(state)
        return mixture

    def batches(mixture: MixtureLoader, steps: int) -> list[list[tuple[int, int]]]:
        return [
            list(zip(b["source"].tolist(), b["ids"].tolist(), strict=True))
            for b in (next(mixture) for _ in range(steps))
        ]

    local, remote = loader(str(char_shards)), loader(s3_shards)
    assert batches(remote, 12) == batches(local, 12)
    resumed = loader(s3_shards, remote.state_dict())  # a restart on the state a checkpoint records
    assert batches(resumed, 12) == batches(local, 12)


def test_the_cache_serves_a_second_run(s3: S3Server, s3_shards: str, char_shards: Path, tmp_path: Path) -> None:
    options = RemoteOptions(cache_dir=str(tmp_path / "cache"), prefetch=0, backoff_s=0.001)
    with s3.faults(lambda *_: None):
        first = load_manifest(s3_shards, options)
        assert np.array_equal(tokens(first, "val"), tokens(load_manifest(char_shards), "val"))
        gets = sum(n for (method, _), n in s3.requests.items() if method == "GET")
        second = load_manifest(s3_shards, options)
        assert np.array_equal(tokens(second, "val"), tokens(load_manifest(char_shards), "val"))
        again = sum(n for (method, _), n in s3.requests.items() if method == "GET")
    assert again == gets + 2  # manifest and tokenizer; every shard from the cache
    assert ShardCache(tmp_path / "cache", options.cache_bytes).used() == sum(s.size for s in first.shards("val"))


def test_loader_reads_s3_in_dataloader_workers(s3_shards: str, char_shards: Path) -> None:
    """A forked DataLoader worker opens its own connections (a client per process)."""
    remote = TrainLoader(load_manifest(s3_shards, FAST), Layout(12, 6), 7, 12, num_workers=1)
    local = TrainLoader(load_manifest(char_shards), Layout(12, 6), 7, 12)
    for _ in range(6):
        assert np.array_equal(next(remote)["tokens"].numpy(), next(local)["tokens"].numpy())
