"""gpt-prepare from Parquet files and Hugging Face dataset directories (data/parquet_input.py,
data/inputs.py): the same documents give byte-identical shards to the same text as JSONL."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from conf.errors import UserError
from data.prepare import prepare
from tests.conftest import TINYSHAKESPEARE, prepare_cfg

SETTINGS = {"tokenizer": "bpe", "vocab_size": 300, "seq_len": 16, "shard_size": 64}


def documents() -> list[str]:
    """Shuffled tinyshakespeare passages, one longer than the pieces a document is cut into, an empty one
    (skipped by every format), and one with \\r\\n and non-ASCII text (kept as is by every format)."""
    lines = TINYSHAKESPEARE.read_text()[:60_000].split("\n")
    rng = random.Random(0)
    docs = ["\n".join(rng.choice(lines) for _ in range(rng.randint(1, 40))) for _ in range(90)]
    return [*docs[:40], " ".join(lines[:400]), "", "Ünïcode\r\nline — ok", *docs[40:]]


def outputs(out: Path) -> dict[str, bytes]:
    """Every file of an output but its manifest's record of the input names (and the marker listing them)."""
    files = {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.name != ".gpt-prepare.json"}
    manifest = json.loads(files.pop("manifest.json"))
    manifest["source"].pop("inputs")
    return {**files, "manifest": json.dumps(manifest, sort_keys=True).encode()}


@pytest.fixture
def small_pieces(monkeypatch: pytest.MonkeyPatch) -> None:
    """Documents cut into pieces and chunks a hundredth of the real size: long documents span chunks."""
    import data.corpus

    monkeypatch.setattr(data.corpus, "PIECE_CHARS", 300)
    monkeypatch.setattr(data.corpus, "CHUNK_CHARS", 2000)


def test_parquet_and_hf_datasets_give_the_shards_of_the_same_jsonl(tmp_path: Path, small_pieces: None) -> None:
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = documents()
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"id": i, "text": d}) + "\n" for i, d in enumerate(docs)))
    hub = tmp_path / "hub"
    (hub / "data").mkdir(parents=True)
    (hub / "README.md").write_text("---\nconfigs: [{config_name: default, data_files: data/*.parquet}]\n---\n")
    half = len(docs) // 2
    for number, part in enumerate((docs[:half], docs[half:])):  # small row groups: read one batch at a time
        table = pa.table({"id": list(range(len(part))), "text": part})
        pq.write_table(table, hub / "data" / f"train-{number:05d}-of-00002.parquet", row_group_size=7)
    saved = tmp_path / "saved"
    datasets.disable_progress_bars()
    datasets.Dataset.from_dict({"text": docs, "id": list(range(len(docs)))}).save_to_disk(str(saved), num_shards=3)

    expected = None
    for name, spec in (
        ("jsonl", tmp_path / "docs.jsonl"),
        ("hub", hub),
        ("glob", hub / "data" / "*.parquet"),
        ("file", hub / "data" / "train-00000-of-00002.parquet"),
        ("saved", saved),
    ):
        out = tmp_path / f"out-{name}"
        prepare(prepare_cfg(input=str(spec), out=str(out), **SETTINGS))
        got = outputs(out)
        if name == "file":  # one of the two files: its own, shorter stream
            assert json.loads(got["manifest"])["source"]["num_documents"] == half - 1
            continue
        if expected is None:
            expected = got
            assert len(got) > 4 and json.loads(got["manifest"])["source"]["num_documents"] == len(docs) - 1
        assert got == expected, name
    inputs = json.loads((tmp_path / "out-saved" / "manifest.json").read_text())["source"]["inputs"]
    assert [Path(p).name for p in inputs] == [f"data-0000{i}-of-00003.arrow" for i in range(3)]  # state.json's order


def test_hf_layouts_with_several_splits_are_refused_naming_them(tmp_path: Path) -> None:
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    datasets.disable_progress_bars()
    one = datasets.Dataset.from_dict({"text": ["some words here"] * 10})
    datasets.DatasetDict({"train": one, "test": one}).save_to_disk(str(tmp_path / "dict"))
    refusal = r"^input=.*/dict: a Hugging Face DatasetDict with splits train, test; .*dict/train$"
    with pytest.raises(UserError, match=refusal):
        prepare(prepare_cfg(input=str(tmp_path / "dict"), out=str(tmp_path / "o")))
    prepare(prepare_cfg(input=str(tmp_path / "dict" / "train"), out=str(tmp_path / "o"), tokenizer="byte", seq_len=8))
    (tmp_path / "hub" / "data").mkdir(parents=True)
    for split in ("train", "test"):
        pq.write_table(pa.table({"text": ["a b c"] * 3}), tmp_path / "hub" / "data" / f"{split}-00000-of-00001.parquet")
    refusal = r"dataset with splits test, train; name one, e\.g\. input='.*/hub/\*\*/test-\*"
    with pytest.raises(UserError, match=refusal):
        prepare(prepare_cfg(input=str(tmp_path / "hub"), out=str(tmp_path / "o2")))
    assert not (tmp_path / "o2").exists()


@pytest.mark.parametrize(
    ("columns", "message"),
    [
        ({"body": ["x"]}, r"x\.parquet: no column 'text' \(columns: body\); set text_field="),
        ({"text": ["a", None]}, r"x\.parquet: row 1: 'text' is null, not a string"),
        ({"text": [1, 2]}, r"x\.parquet: column 'text' is int64, not a string"),
        (None, r"x\.parquet: not a valid \.parquet file"),
    ],
    ids=["no-column", "null", "not-a-string", "not-parquet"],
)
def test_bad_parquet_is_one_line_naming_the_file(tmp_path: Path, columns: dict | None, message: str) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "x.parquet"
    if columns is None:
        path.write_bytes(b"not parquet at all\n" * 10)
    else:
        pq.write_table(pa.table(columns), path)
    with pytest.raises(UserError, match=message):
        prepare(prepare_cfg(input=str(path), out=str(tmp_path / "out")))
    assert not (tmp_path / "out").exists()


def test_parquet_is_read_a_batch_at_a_time(tmp_path: Path) -> None:
    """Not the whole file: while the first document is read, Arrow holds about one row group's column."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from data.corpus import file_pieces

    path = tmp_path / "big.parquet"
    rows = [f"document {i} " + "word " * 200 for i in range(20_000)]  # 20 MB of text, 10 row groups
    pq.write_table(pa.table({"text": rows, "other": rows}), path, row_group_size=2_000, compression="none")
    del rows
    read: list[int] = []
    before = pa.total_allocated_bytes()
    pieces = file_pieces(path, "text", read.append)
    assert next(pieces)[0].startswith("document 0 word")
    assert pa.total_allocated_bytes() - before < path.stat().st_size / 8  # 40 MB on disk
    assert 0 < sum(read) < path.stat().st_size / 8  # progress: the share of the rows read
    assert sum(1 for _ in pieces) == 20_000 - 1 and sum(read) == path.stat().st_size
