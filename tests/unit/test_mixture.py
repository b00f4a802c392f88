"""data.sources: the interleave's bound, the dp-independent mixed order, resumes that change weights
or sources (every sample id counted), one-source states, and the one-line refusals."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from conf.cli import compose
from conf.errors import UserError
from data.interleave import Interleave, integer_weights
from data.mixture import MixtureLoader, MixtureOrder, Segment, Source
from data.shards import load_manifest
from data.stream import GlobalOrder, Layout, TrainLoader
from parallel.train_state import TrainState
from pretrain.trainer.resume_checks import data_identity
from pretrain.trainer.source_changes import DataResume
from tests.conftest import opened_sources, run_of

K = 12
SEED = 7


def mixture_cfg(*sources: tuple[Path, float, str], allow_new: bool = False):  # noqa: ANN201
    listed = ",".join(f"{{dir:{d},weight:{w},name:{n}}}" for d, w, n in sources)
    return compose([f"data.sources=[{listed}]", "run.dir=/nonexistent", f"data.allow_new={allow_new}"])


def run(sources: list[Source], dp: int, steps: int, state: dict | None = None, workers: int = 0) -> tuple:
    """(source, id) of every global position over ``steps`` global batches of 8, gathered from dp
    simulated ranks; the state after, and rank 0's loader."""
    loaders = [MixtureLoader(sources, Layout(8, 8 // dp // 2 or 1, r, dp), SEED, K, workers) for r in range(dp)]
    for loader in loaders:
        if state is not None:
            loader.load_state_dict(state)
    seen = []
    for _ in range(steps):
        batch: dict[int, tuple[int, int]] = {}
        for rank, loader in enumerate(loaders):
            got = [next(loader) for _ in range(loader.layout.micro_batches_per_step)]
            pairs = [p for b in got for p in zip(b["source"].tolist(), b["ids"].tolist(), strict=True)]
            batch.update({j * dp + rank: pair for j, pair in enumerate(pairs)})  # rank r: positions r, r+dp, ...
        seen += [batch[p] for p in range(8)]
    return seen, loaders[0].state_dict(), loaders[0]


def own_order(manifest, count: int) -> list[int]:  # noqa: ANN001
    """The first ``count`` ids of a source's own order (data/stream.py's, epoch after epoch)."""
    out: list[int] = []
    epoch = 0
    while len(out) < count:
        order = GlobalOrder(manifest, "train", SEED, epoch, K)
        shuffled = np.concatenate([order.first_ids[k] + order.inner_permutation(k) for k in order.shard_order])
        x = np.arange(order.length)
        out += shuffled[(x % K) * order.stream_len + x // K].tolist()
        epoch += 1
    return out[:count]


def two(char_shards: Path, small: Path, weights: tuple[float, float] = (0.7, 0.3)) -> list[Source]:
    return [
        Source("web", load_manifest(char_shards), weights[0]),
        Source("books", load_manifest(small), weights[1]),
    ]


def test_interleave_keeps_every_count_within_one_of_its_share() -> None:
    rng = np.random.default_rng(0)
    for _ in range(300):
        weights = rng.integers(0, 40, size=rng.integers(1, 8))
        if not weights.sum():
            continue
        interleave = Interleave(weights)
        slots = np.arange(interleave.period + 1)  # the sequence repeats: one period holds every lag
        lag = np.abs(interleave.prefix * interleave.period - weights[:, None] * slots) / interleave.period
        assert lag.max() < 1, weights
    assert integer_weights([0.7, 0.3]) == [7, 3] and integer_weights([2, 1, 0]) == [2, 1, 0]
    assert sum(integer_weights([1 / 3, 1 / 7, 0.5])) <= 1 << 16


def test_every_prefix_is_within_one_row_of_the_weights_and_reads_each_source_in_order() -> None:
    """|samples_i(n) - w_i n| < K for every prefix n, and source i's cursors are 0, 1, 2, ..."""
    rng = np.random.default_rng(1)
    for _ in range(40):
        k = int(rng.integers(2, 6))
        ints = integer_weights(rng.integers(1, 20, size=k).astype(float).tolist())
        streams = int(rng.choice([1, 2, 4, 12]))
        names = [f"s{i}" for i in range(k)]
        segment = Segment(0, dict(zip(names, ints, strict=True)), dict.fromkeys(names, 0))
        order = MixtureOrder(names, [streams * 1000] * k, streams, segment)
        n = 2 * streams * sum(ints) + 7
        source, cursor = order.locate(np.arange(n))
        counts = np.cumsum(source[:, None] == np.arange(k)[None, :], axis=0)
        ideal = np.arange(1, n + 1)[:, None] * (np.asarray(ints) / sum(ints))[None, :]
        assert np.abs(counts - ideal).max() < streams, (ints, streams)
        for i in range(k):
            assert (cursor[source == i] == np.arange(counts[-1, i])).all()
        assert (order.cursors(n) == counts[-1]).all()


def test_the_mixed_order_does_not_depend_on_dp_or_workers(char_shards: Path, small_char_shards: Path) -> None:
    sources = two(char_shards, small_char_shards)
    reference, _, _ = run(sources, 1, 40)
    assert run(sources, 2, 40)[0] == reference
    assert run(sources, 4, 40, workers=2)[0] == reference
    head, state, _ = run(sources, 2, 15)  # resumed at another dp, in the middle of both sources' epochs
    assert head + run(sources, 1, 25, state=state)[0] == reference


def test_weight_changes_at_resumes_repeat_and_skip_nothing(char_shards: Path, small_char_shards: Path) -> None:
    """Every (source, id) of a whole simulated run: each source's ids are exactly its own order."""
    seen, state, rows = [], None, []
    for dp, weights, steps in ((2, (0.7, 0.3), 31), (1, (0.2, 0.8), 45), (4, (0.5, 0.5), 30)):
        got, state, loader = run(two(char_shards, small_char_shards, weights), dp, steps, state=state)
        seen += got
        rows.append(loader.changed)
        assert loader.position - len(got) == loader.segment.row * K  # a segment starts at a row
        books = np.cumsum([s == 1 for s, _ in got])
        assert np.abs(books - weights[1] * np.arange(1, len(got) + 1)).max() < K  # the new weights at once
    assert rows[0] is None and rows[1] == ({"books": 0.3, "web": 0.7}, {"web": 0.2, "books": 0.8})
    for index, directory in enumerate((char_shards, small_char_shards)):
        ids = [i for s, i in seen if s == index]
        assert ids == own_order(load_manifest(directory), len(ids))
    assert len([1 for s, _ in seen if s == 1]) > 2 * 108  # books went through its epochs


def test_a_source_of_weight_0_pauses_and_goes_on_where_it_paused(char_shards: Path, small_char_shards: Path) -> None:
    seen, books, changed, state = [], [], [], None
    for weights, steps in (((0.7, 0.3), 10), ((1.0, 0.0), 12), ((0.5, 0.5), 10)):
        got, state, loader = run(two(char_shards, small_char_shards, weights), 2, steps, state=state)
        seen.append(got)
        books.append(state["sources"]["books"])
        changed.append(loader.changed)
    assert changed[1] == ({"books": 0.3, "web": 0.7}, {"web": 1.0, "books": 0.0})
    assert len(seen[1]) == 96 and {s for s, _ in seen[1]} == {0}  # web only while books' weight is 0
    place = [(b["epoch"], b["position"]) for b in books]
    assert place[1] == place[0] < place[2]  # books' place kept through the pause, then read on from it
    for index, directory in enumerate((char_shards, small_char_shards)):
        ids = [i for got in seen for s, i in got if s == index]
        assert ids == own_order(load_manifest(directory), len(ids))  # no sample repeated or skipped
    assert abs(sum(s == 1 for s, _ in seen[2]) - 40) < K  # half of the last 80 samples again (within a row)


def test_val_loss_is_the_weighted_mean_of_the_sources_of_weight_above_0() -> None:
    from data.mixture import normalised
    from pretrain.trainer.source_changes import per_source_validation

    losses = {"web": 2.0, "books": 4.0, "code": 10.0}  # "raw" has no validation split
    weights = normalised({"web": 2, "books": 1, "code": 0, "raw": 1})  # 0.5, 0.25, 0, 0.25
    out = per_source_validation(losses, weights)
    want = (0.5 * 2.0 + 0.25 * 4.0) / 0.75  # code (paused) and raw (no split) left out
    assert out.keys() == {"val_loss/web", "val_loss/books", "val_loss/code", "val_loss", "val_ppl"}
    assert out["val_loss"] == pytest.approx(want) and out["val_ppl"] == pytest.approx(np.exp(want))
    assert (out["val_loss/web"], out["val_loss/books"], out["val_loss/code"]) == (2.0, 4.0, 10.0)
    assert per_source_validation({"code": 10.0}, weights) == {"val_loss/code": 10.0}  # no mean of weight 0


def test_one_source_runs_continue_in_a_mixture_and_back(char_shards: Path, small_char_shards: Path) -> None:
    web = load_manifest(char_shards)
    single = TrainLoader(web, Layout(8, 4), SEED, K)
    for _ in range(20):
        next(single)  # 10 steps
    before = TrainState(step=10, config={}, vocab_size=67, data=single.state_dict(), data_identity=data_identity(web))
    cfg = mixture_cfg((char_shards, 0.5, "web"), (small_char_shards, 0.5, "books"))
    sources, identity = opened_sources(cfg)
    with pytest.raises(UserError, match=r"books \(.*\) is not a source of the run .* data.allow_new=true to add it"):
        DataResume(run_of(cfg), before, identity)
    cfg.data.allow_new = True
    resume = DataResume(run_of(cfg), before, identity)
    assert resume.pairs == {"web": "ts"} and resume.events[0]["added"] == ["books"]
    seen, state, _ = run(sources, 2, 20, state=resume.loader_state(before.data, mixture=True))
    ids = [i for s, i in seen if s == 0]
    assert ids == own_order(web, 80 + len(ids))[80:]  # web goes on where the one-source run stopped
    after = TrainState(step=30, config={}, vocab_size=67, data=state, data_identity=identity)
    back = DataResume(run_of(cfg), after, data_identity(web))  # data.dir again (books dropped: allow_new)
    single = TrainLoader(web, Layout(8, 8), SEED, K)
    single.load_state_dict(back.loader_state(state, mixture=False))
    assert next(single)["ids"].tolist() == own_order(web, 80 + len(ids) + 8)[-8:]


def test_sources_must_share_a_tokenizer(char_shards: Path, tmp_path: Path) -> None:
    from data.prepare import prepare
    from tests.conftest import TINYSHAKESPEARE, opened_sources, prepare_cfg

    text = tmp_path / "t.txt"
    text.write_text(TINYSHAKESPEARE.read_text()[:5000])
    other = prepare(prepare_cfg(input=str(text), out=str(tmp_path / "byte"), tokenizer="byte", seq_len=64))
    with pytest.raises(UserError, match=r"data.sources: byte \(.*byte\) and web \(.*\) have another tokenizer"):
        opened_sources(mixture_cfg((char_shards, 1, "web"), (other, 1, "byte")))


def test_each_rank_reads_only_its_streams_shards(
    char_shards: Path, small_char_shards: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rows of K keep reads local: at dp=2 the ranks read disjoint shards of the large source
    (each of its 12 streams starts in its own shard), and every shard once."""
    import data.mixture as mixture

    reads: list[tuple[int, Path]] = []
    original = mixture.read_shard
    monkeypatch.setattr(mixture, "read_shard", lambda info, *a: reads.append((rank, info.path)) or original(info, *a))
    for rank in (0, 1):
        loader = MixtureLoader(two(char_shards, small_char_shards), Layout(8, 4, rank, 2), SEED, K)
        for _ in range(60):
            next(loader)
    web = {r: {path for who, path in reads if who == r and path.parent == char_shards} for r in (0, 1)}
    assert len(web[0]) == len(web[1]) == 6 and not web[0] & web[1], web
    assert len(reads) == len(set(reads)) == 6 + 6 + 2  # every shard once per rank (books: one shard)
