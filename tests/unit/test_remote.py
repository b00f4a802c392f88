"""Remote shard sets (data/remote.py): HTTP from a local server in this process, pipe: through cat."""

import re
from pathlib import Path

import numpy as np
import pytest

from conf.errors import UserError
from data.remote import RemoteOptions
from data.shard_cache import ShardCache
from data.shards import check_files, load_manifest, read_shard
from data.stream import Layout, TrainLoader, eval_batches
from pretrain.trainer.resume_checks import data_identity
from tests.remote_server import ShardServer

FAST = RemoteOptions(backoff_s=0.001)


def tokens(manifest, split: str) -> np.ndarray:  # noqa: ANN001
    return np.concatenate([b["tokens"].numpy() for b in eval_batches(manifest, split, 256)])


def train_steps(manifest, steps: int = 30) -> list[np.ndarray]:  # noqa: ANN001
    loader = TrainLoader(manifest, Layout(12, 6), 7, 12)
    return [next(loader)["tokens"].numpy() for _ in range(steps)]


def test_http_reads_what_the_directory_holds(char_shards: Path) -> None:
    local = load_manifest(char_shards)
    with ShardServer(char_shards.parent) as server:
        remote = load_manifest(f"{server.url}/ts/", FAST)
        check_files(remote)
        assert remote.location == f"{server.url}/ts"
        for split in ("train", "val"):
            assert np.array_equal(tokens(remote, split), tokens(local, split))
        assert all(np.array_equal(a, b) for a, b in zip(train_steps(remote), train_steps(local), strict=True))
    ours, theirs = data_identity(remote), data_identity(local)
    assert ours.pop("data_dir") == f"{server.url}/ts" and theirs.pop("data_dir") == str(char_shards)
    assert ours == theirs  # same tokenizer and shard set: a run may resume from the other copy


def test_dropped_connections_and_5xx_are_retried_to_identical_data(char_shards: Path) -> None:
    def fault(name: str, nth: int) -> str | None:
        if name == "ts/train-000003.tar" and nth <= 2:
            return "drop"  # the connection dies half way through the body, twice
        return "503" if name == "ts/val-000001.tar" and nth == 1 else None

    with ShardServer(char_shards.parent, fault) as server:
        remote = load_manifest(f"{server.url}/ts", FAST)
        for split in ("train", "val"):
            assert np.array_equal(tokens(remote, split), tokens(load_manifest(char_shards), split))
        assert server.requests["ts/train-000003.tar"] == 3 and server.requests["ts/val-000001.tar"] == 2


def test_a_shard_that_stays_corrupt_stops_naming_its_url(char_shards: Path) -> None:
    bad = "ts/train-000003.tar"
    with ShardServer(char_shards.parent, lambda name, nth: "corrupt" if name == bad else None) as server:
        remote = load_manifest(f"{server.url}/ts", FAST)
        message = f"shard {server.url}/{bad}: sha256 mismatch after 4 attempts"
        with pytest.raises(UserError, match=f"^{re.escape(message)}$"):
            tokens(remote, "train")
        assert server.requests[bad] == 4  # never a skip: the shards after it were not used


def test_a_missing_shard_is_named_before_training(char_shards: Path, tmp_path: Path) -> None:
    (tmp_path / "ts").mkdir()
    for path in char_shards.iterdir():
        if path.name != "train-000007.tar":
            (tmp_path / "ts" / path.name).symlink_to(path)
    with ShardServer(tmp_path) as server:
        remote = load_manifest(f"{server.url}/ts", FAST)
        with pytest.raises(UserError, match=f"^shard {re.escape(server.url)}/ts/train-000007.tar: missing$"):
            check_files(remote)


def test_pipe_command_with_cat(char_shards: Path) -> None:
    remote = load_manifest(f"pipe:cat {char_shards}/{{file}}", FAST)
    assert np.array_equal(tokens(remote, "val"), tokens(load_manifest(char_shards), "val"))
    with pytest.raises(UserError, match=r"must contain \{file\}"):
        load_manifest(f"pipe:cat {char_shards}/manifest.json", FAST)
    with pytest.raises(UserError, match="command exited 1 .*No such file.* after 2 attempts"):
        load_manifest("pipe:cat /nonexistent/{file}", RemoteOptions(retries=1, backoff_s=0.001))


def test_cache_stays_within_its_bound_and_is_reused(char_shards: Path, tmp_path: Path) -> None:
    cache_dir = tmp_path / "cache"
    cache_dir.mkdir()
    (cache_dir / "notes.txt").write_text("not the cache's")  # never counted, never evicted
    shards = load_manifest(char_shards).shards("train")
    bound = int(3.5 * shards[0].size)
    options = RemoteOptions(cache_dir=str(cache_dir), cache_bytes=bound, prefetch=0, backoff_s=0.001)  # in order
    with ShardServer(char_shards.parent) as server:
        first = load_manifest(f"{server.url}/ts", options)
        assert np.array_equal(tokens(first, "train"), tokens(load_manifest(char_shards), "train"))
        cache = ShardCache(cache_dir, bound)
        assert 0 < cache.used() <= bound and (cache_dir / "notes.txt").is_file()
        cached = {path.stem for _, _, path in cache.entries()}
        assert cached == {s.sha256 for s in shards[-len(cached) :]}  # the least recently used went first
        gets = sum(server.requests.values())
        second = load_manifest(f"{server.url}/ts", options)  # another run on the same cache
        again = [s for s in second.shards("train") if s.sha256 in cached]
        damaged = cache_dir / f"{again[0].sha256}.shard"
        damaged.write_bytes(damaged.read_bytes()[:-1] + b"!")  # a bad disk: re-fetched, not used
        for shard in again:
            assert np.array_equal(read_shard(shard, "uint16", 64), read_shard(_local(shard, char_shards), "uint16", 64))
        assert sum(server.requests.values()) == gets + 2 + 1  # manifest, tokenizer, the damaged entry
        assert cache.used() <= bound


def _local(shard, directory: Path):  # noqa: ANN001, ANN202
    return next(s for s in load_manifest(directory).shards("train") if s.sha256 == shard.sha256)
