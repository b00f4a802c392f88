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
