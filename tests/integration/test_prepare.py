import json
from pathlib import Path

import numpy as np
import pytest

from conf.errors import UserError
from data.prepare import prepare
from data.shards import load_manifest, read_shard
from data.tokenizer import load_tokenizer
from tests.conftest import TINYSHAKESPEARE, prepare_cfg, run_cli


def test_manifest_counts_add_up_to_the_windows_of_the_text(char_shards: Path) -> None:
    manifest = load_manifest(char_shards)
    tok = load_tokenizer(char_shards)
    n_tokens = len(TINYSHAKESPEARE.read_text()) + 1  # one document + end-of-text
    n_val = int(n_tokens * 0.1)
    expected = (n_tokens - n_val - 1) // 64 + (n_val - 1) // 64
    assert manifest.num_samples("train") + manifest.num_samples("val") == expected
    assert manifest.raw["source"]["num_tokens"] == n_tokens
    assert tok.vocab_size == manifest.vocab_size == 67  # 65 chars + end-of-text + unk
    # windows overlap by one token and reproduce the text in order
    first = read_shard(manifest.shards("train")[0], manifest.dtype, manifest.seq_len)
    assert np.array_equal(first[0, -1:], first[1, :1])
    assert tok.decode(first[0].tolist()) == TINYSHAKESPEARE.read_text()[:65]


def test_jsonl_directory_and_glob_inputs(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.jsonl").write_text("\n".join(json.dumps({"text": "hello world " * 20}) for _ in range(5)))
    (src / "b.txt").write_text("plain text document " * 30)
    for spec in (str(src), str(src / "*.jsonl")):
        out = tmp_path / f"out{len(spec)}"
        prepare(prepare_cfg(input=spec, out=str(out), tokenizer="byte", seq_len=16, shard_size=7))
        manifest = load_manifest(out)
        n_docs = manifest.raw["source"]["num_documents"]
        assert n_docs == (6 if spec == str(src) else 5)
        assert all(s.num_samples <= 7 for s in manifest.shards("train"))


def _bad(tmp_path: Path, name: str, content: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(content)
    return path


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("empty.txt", b"", "empty"),
        ("latin1.txt", "café".encode("latin-1") * 100, "not UTF-8"),
        ("bad.jsonl", b'{"text": "ok"}\n{broken\n', "bad.jsonl:2: invalid JSON"),
        ("field.jsonl", b'{"body": "no text field"}\n', "no string field 'text'"),
    ],
)
def test_bad_inputs_name_the_file_and_write_nothing(tmp_path: Path, name: str, content: bytes, message: str) -> None:
    path = _bad(tmp_path, name, content)
    out = tmp_path / "out"
    with pytest.raises(UserError, match=message):
        prepare(prepare_cfg(input=str(path), out=str(out)))
    assert not out.exists()
    assert not list(tmp_path.glob(".*tmp*"))


def test_missing_input_and_existing_output(tmp_path: Path, char_shards: Path) -> None:
    with pytest.raises(UserError, match="no such file"):
        prepare(prepare_cfg(input=str(tmp_path / "nope.txt"), out=str(tmp_path / "o")))
    with pytest.raises(UserError, match="overwrite=true"):
        prepare(prepare_cfg(input=str(TINYSHAKESPEARE), out=str(char_shards)))


def test_cli_one_line_error_and_exit_code(tmp_path: Path) -> None:
    result = run_cli("data.prepare", f"input={tmp_path}/missing.txt", f"out={tmp_path}/o")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "missing.txt" in lines[0], result.stderr


# --- gpt-prepare at scale: compressed inputs, workers, dedup, resume, a lazy reader, progress lines


def _outputs(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


def _corpus(root: Path) -> list[str]:
    """Three input files (.jsonl.gz, .jsonl.zst, .txt.zst) of shuffled tinyshakespeare lines; the documents."""
    import gzip
    import random

    import zstandard

    lines = TINYSHAKESPEARE.read_text()[:100_000].split("\n")
    rng = random.Random(0)
    docs = ["\n".join(rng.choice(lines) for _ in range(rng.randint(1, 60))) for _ in range(120)]
    root.mkdir()
    with gzip.open(root / "a.jsonl.gz", "wt", encoding="utf-8") as f:
        f.writelines(json.dumps({"text": d}) + "\n" for d in docs[:60])
    packed = "".join(json.dumps({"text": d}) + "\n" for d in docs[60:119]).encode()
    (root / "b.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(packed))
    (root / "c.txt.zst").write_bytes(zstandard.ZstdCompressor().compress(docs[119].encode()))
    return docs


@pytest.fixture
def small_pieces(monkeypatch: pytest.MonkeyPatch) -> None:
    """Documents cut into pieces and chunks a hundredth of the real size: long documents span chunks."""
    import data.corpus

    monkeypatch.setattr(data.corpus, "PIECE_CHARS", 300)
    monkeypatch.setattr(data.corpus, "CHUNK_CHARS", 2000)


def test_workers_1_and_2_write_the_same_bytes_from_compressed_inputs(tmp_path: Path, small_pieces: None) -> None:
    docs = _corpus(tmp_path / "src")
    outs = []
    for workers in (1, 2):
        out = tmp_path / f"w{workers}"
        prepare(
            prepare_cfg(
                input=str(tmp_path / "src"),
                out=str(out),
                tokenizer="bpe",
                vocab_size=300,
                seq_len=16,
                shard_size=64,
                workers=workers,
            )
        )
        outs.append(_outputs(out))
    assert outs[0] == outs[1] and len(outs[0]) > 4
    # documents tokenized in pieces give the tokens of the whole documents
    tok = load_tokenizer(tmp_path / "w1")
    manifest = load_manifest(tmp_path / "w1")
    expected = [t for d in docs for t in (*tok.encode(d), tok.eot_id)]
    train = np.concatenate([read_shard(s, manifest.dtype, 16) for s in manifest.shards("train")])
    assert manifest.raw["source"]["num_tokens"] == len(expected)
    assert np.array_equal(np.concatenate([train[0], train[1:, 1:].ravel()]), expected[: 16 * len(train) + 1])


def test_dedup_removes_normalised_exact_duplicates(tmp_path: Path, small_pieces: None) -> None:
    from data.prepare_dedup import HashSet

    seen = HashSet()
    assert seen.first_seen(np.array([5, 3, 5, 9], np.uint64)).tolist() == [True, True, False, True]
    assert seen.first_seen(np.array([9, 1, 3], np.uint64)).tolist() == [False, True, False] and len(seen) == 4

    long = " ".join(f"word{i}" for i in range(400))  # cut into pieces, spanning chunks
    texts = [
        "Hello  World",
        "hello world",
        "Cafe\u0301 au lait",
        "café au lait",
        "other",
        long,
        long.upper(),
        "hello world!",
        "\thello\nworld ",
    ]
    src = tmp_path / "docs.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    prepare(prepare_cfg(input=str(src), out=str(tmp_path / "out"), tokenizer="byte", seq_len=8, dedup=True))
    source = load_manifest(tmp_path / "out").raw["source"]
    assert (source["num_documents"], source["num_duplicates"]) == (5, 4)
    kept = [texts[i] for i in (0, 2, 4, 5, 7)]
    assert source["num_tokens"] == sum(len(t.encode()) + 1 for t in kept)


def test_an_interrupted_prepare_resumes_without_redoing_finished_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import data.prepare_tokenize
    from data.prepare_work import WorkDir

    _corpus(tmp_path / "src")
    cfg = {"input": str(tmp_path / "src"), "tokenizer": "char", "seq_len": 16, "dedup": True}
    prepare(prepare_cfg(out=str(tmp_path / "whole"), **cfg))

    finish = WorkDir.finish_part

    def then_ctrl_c(self: WorkDir, *args: object) -> None:
        finish(self, *args)
        raise KeyboardInterrupt  # right after the first input file is done

    out = tmp_path / "out"
    monkeypatch.setattr(WorkDir, "finish_part", then_ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        prepare(prepare_cfg(out=str(out), **cfg))
    monkeypatch.setattr(WorkDir, "finish_part", finish)
    work = tmp_path / ".out.gpt-prepare-work"
    assert not out.exists() and sorted(p.name for p in work.glob("part-*.bin")) == ["part-000000.bin"]
    with pytest.raises(UserError, match=r"an interrupted gpt-prepare used dedup=True \(now False\).*resume=false"):
        prepare(prepare_cfg(out=str(out), **{**cfg, "dedup": False}))

    read, pieces = [], data.prepare_tokenize.file_pieces
    monkeypatch.setattr(
        data.prepare_tokenize, "file_pieces", lambda path, *a: read.append(path.name) or pieces(path, *a)
    )
    prepare(prepare_cfg(out=str(out), **cfg))
    assert read == ["b.jsonl.zst", "c.txt.zst"]  # a.jsonl.gz is not tokenized again
    assert _outputs(out) == _outputs(tmp_path / "whole") and not work.exists()


def test_the_reader_is_lazy(tmp_path: Path) -> None:
    from data import corpus

    path = tmp_path / "big.txt"
    path.write_text("some words here\n" * 400_000)  # 6.4 MB, one document
    read: list[int] = []
    pieces = corpus.file_pieces(path, "text", read.append)
    text, ends = next(pieces)
    assert not ends and corpus.PIECE_CHARS <= len(text) < corpus.PIECE_CHARS + 20
    assert sum(read) <= 3 * corpus.BLOCK < path.stat().st_size  # a few blocks read, not the file
    assert "".join([text, *(t for t, _ in pieces)]) == path.read_text()


def test_progress_is_one_line_a_minute_off_a_terminal() -> None:
    import io

    from data.prepare_progress import Progress

    now = [0.0]
    log = io.StringIO()
    progress = Progress(100_000_000, "tokenize", stream=log, clock=lambda: now[0])
    for _ in range(4):
        now[0] += 30.0
        progress.update(10_000_000)
    lines = log.getvalue().splitlines()
    assert lines == [
        "tokenize: 20.0 of 100.0 MB (20%), 0.33 MB/s, ETA 0:04:00",
        "tokenize: 40.0 of 100.0 MB (40%), 0.33 MB/s, ETA 0:03:00",
    ]


def test_fast_shards_are_byte_identical_to_write_shard(tmp_path: Path) -> None:
    from data.prepare_shards import write_shard_fast
    from data.shards import write_shard

    rng = np.random.default_rng(0)
    for seq_len, count, first, dtype in ((64, 300, 0, np.uint16), (7, 3, 12345, np.uint32)):
        windows = rng.integers(0, 60000, size=(count, seq_len + 1)).astype(dtype)
        slow = write_shard(tmp_path / "slow.tar", windows, first)
        fast = write_shard_fast(tmp_path / "fast.tar", windows, first)
        assert (tmp_path / "slow.tar").read_bytes() == (tmp_path / "fast.tar").read_bytes()
        assert (slow.sha256, slow.size, slow.num_samples) == (fast.sha256, fast.size, fast.num_samples)
