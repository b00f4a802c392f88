import shutil
from pathlib import Path

import pytest

from conf.errors import UserError
from data.shards import load_manifest
from data.stream import GlobalOrder, Layout, TrainLoader, eval_batches

K = 12


def batches(manifest, dp: int, steps: int, global_batch: int = 12, state=None, workers: int = 0):  # noqa: ANN001
    """The set of sample ids of each global batch, gathered over dp simulated ranks."""
    loaders = [
        TrainLoader(manifest, Layout(global_batch, global_batch // dp // 2 or 1, r, dp), 7, K, workers)
        for r in range(dp)
    ]
    for loader in loaders:
        if state:
            loader.load_state_dict(state)
    out = []
    for _ in range(steps):
        ids: list[int] = []
        for loader in loaders:
            for _ in range(loader.layout.micro_batches_per_step):
                batch = next(loader)
                assert batch["tokens"].shape[1] == 65 and batch["tokens"].dtype.is_floating_point is False
                ids += batch["ids"].tolist()
        assert len(ids) == len(set(ids)) == global_batch
        out.append(frozenset(ids))
    return out, loaders[0].state_dict()


def test_global_batches_do_not_depend_on_dp(char_shards: Path) -> None:
    manifest = load_manifest(char_shards)
    reference, _ = batches(manifest, 1, 30)
    for dp in (2, 3, 4):
        assert batches(manifest, dp, 30)[0] == reference


def test_resume_at_another_dp_continues_the_same_order(char_shards: Path) -> None:
    manifest = load_manifest(char_shards)
    reference, _ = batches(manifest, 1, 40)
    head, state = batches(manifest, 2, 25)
    tail, _ = batches(manifest, 1, 15, state=state)
    assert head + tail == reference
    head, state = batches(manifest, 1, 10)
    tail, _ = batches(manifest, 4, 30, state=state)
    assert head + tail == reference


def test_an_epoch_covers_every_usable_sample_once_and_reshuffles(char_shards: Path) -> None:
    manifest = load_manifest(char_shards)
    order = GlobalOrder(manifest, "train", 7, 0, K)
    steps = order.length // 12
    epoch0, state = batches(manifest, 2, steps)
    seen = [i for batch in epoch0 for i in batch]
    assert len(seen) == len(set(seen)) == steps * 12
    assert manifest.num_samples("train") - len(seen) < 12 + K
    assert state["epoch"] == 1 and state["position"] == 0
    epoch1, _ = batches(manifest, 1, 3, state=state)
    assert epoch1 != epoch0[:3]


def test_workers_do_not_change_the_stream(char_shards: Path) -> None:
    manifest = load_manifest(char_shards)
    assert batches(manifest, 2, 12, workers=2)[0] == batches(manifest, 2, 12)[0]


def test_dp_must_divide_num_streams(char_shards: Path) -> None:
    with pytest.raises(UserError, match="num_streams=12 is not divisible"):
        next(iter(TrainLoader(load_manifest(char_shards), Layout(10, 2, 0, 5), 7, K)))


def test_eval_covers_the_split_with_equal_batch_counts(char_shards: Path) -> None:
    manifest = load_manifest(char_shards)
    total = manifest.num_samples("val")
    counts = []
    for dp in (1, 3):
        per_rank = [list(eval_batches(manifest, "val", 64, r, dp)) for r in range(dp)]
        assert len({len(b) for b in per_rank}) == 1  # every rank runs the same number of steps
        counts.append(sum(int(b["mask"][:, 0].sum()) for rank in per_rank for b in rank))
    assert counts == [total, total]


@pytest.mark.parametrize(("damage", "workers"), [("truncate", 0), ("flip", 1)])
def test_corrupt_shard_is_named(char_shards: Path, tmp_path: Path, damage: str, workers: int) -> None:
    """In one line, also from a DataLoader worker (torch re-raises it with the worker's traceback)."""
    copy = tmp_path / "ts"
    shutil.copytree(char_shards, copy)
    shard = sorted(copy.glob("train-*.tar"))[3]
    blob = shard.read_bytes()
    shard.write_bytes(blob[: len(blob) // 2] if damage == "truncate" else blob[:600] + b"X" + blob[601:])
    loader = TrainLoader(load_manifest(copy), Layout(12, 12), 7, K, workers)
    with pytest.raises(UserError, match=shard.name) as caught:
        for _ in range(GlobalOrder(load_manifest(copy), "train", 7, 0, K).length // 12):
            next(loader)
    assert "\n" not in str(caught.value) and "Traceback" not in str(caught.value)


def test_each_dp_rank_reads_only_its_share_of_the_shards(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Streams are contiguous slices of the shuffled shards: a rank reads its half plus boundary shards."""
    import data.stream as stream
    from data.prepare import prepare
    from tests.conftest import TINYSHAKESPEARE, prepare_cfg

    prepare(prepare_cfg(input=str(TINYSHAKESPEARE), out=str(tmp_path / "s"), seq_len=64, shard_size=128))
    manifest = load_manifest(tmp_path / "s")
    every = {s.path.name for s in manifest.shards("train")}
    steps = GlobalOrder(manifest, "train", 7, 0, K).length // 12
    read: dict[int, set[str]] = {0: set(), 1: set()}
    original = stream.read_shard
    for rank in (0, 1):
        monkeypatch.setattr(
            stream, "read_shard", lambda info, *a, r=rank: read[r].add(info.path.name) or original(info, *a)
        )
        loader = TrainLoader(manifest, Layout(12, 6, rank, 2), 7, K)
        for _ in range(steps):  # one whole epoch
            next(loader)
    assert read[0] | read[1] == every
    for rank in (0, 1):  # its K/2 streams, each possibly sharing one shard with each neighbour
        assert len(read[rank]) <= len(every) / 2 + K, (rank, len(read[rank]), len(every))
    assert len(read[0] & read[1]) <= K
