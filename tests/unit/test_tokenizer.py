import hashlib
import json
from pathlib import Path

import pytest

from conf.errors import UserError
from data.tokenizer import EOT, load_tokenizer, train_tokenizer

TEXTS = ["To be, or not to be: that is the question.", "Héllo wörld — ünïcode ✓"]


@pytest.mark.parametrize("kind", ["char", "byte", "bpe"])
def test_roundtrip_and_reload(kind: str, tmp_path: Path) -> None:
    tok = train_tokenizer(kind, lambda: iter(TEXTS * 20), vocab_size=300)
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids and max(ids) < tok.vocab_size
        assert tok.decode(ids) == text
    assert tok.eot_id < tok.vocab_size and tok.eot_id not in tok.encode(TEXTS[0])
    tok.save(tmp_path)
    again = load_tokenizer(tmp_path)
    assert again.vocab_size == tok.vocab_size and again.eot_id == tok.eot_id
    assert again.encode(TEXTS[1]) == tok.encode(TEXTS[1])


def test_char_unknown_maps_to_unk() -> None:
    tok = train_tokenizer("char", lambda: iter(["abc"]), 0)
    assert tok.encode("abz") == [0, 1, tok.unk_id]


def test_bpe_vocab_size_is_configurable() -> None:
    tok = train_tokenizer("bpe", lambda: iter(TEXTS * 50), vocab_size=280)
    assert tok.vocab_size <= 280
    assert tok.token_to_id(EOT) == tok.eot_id


def test_unknown_kind_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="tokenizer='wordpiece'"):
        train_tokenizer("wordpiece", lambda: iter(TEXTS), 100)
    with pytest.raises(UserError, match="tokenizer.json"):
        load_tokenizer(tmp_path)


@pytest.mark.parametrize("kind", ["char", "byte"])
def test_tokenizer_json_is_a_tokenizers_file_that_encodes_as_ours(kind: str, tmp_path: Path) -> None:
    """What every other tool reads under that name: the `tokenizers` library format, the same ids
    (an unknown character too), and our loader still sees a char / byte tokenizer in it."""
    from tokenizers import Tokenizer as HFTokenizer

    tok = train_tokenizer(kind, lambda: iter(TEXTS[:1]), 0)
    tok.save(tmp_path)
    backend = HFTokenizer.from_file(str(tmp_path / "tokenizer.json"))
    for text in [*TEXTS, "<unk> and ünknown ✓", ""]:
        assert backend.encode(text).ids == tok.encode(text), text
    again = load_tokenizer(tmp_path)
    assert again.kind == kind and again.encode(TEXTS[1]) == tok.encode(TEXTS[1])
    assert (again.eot_id, again.unk_id) == (tok.eot_id, tok.unk_id)


@pytest.mark.parametrize("kind", ["char", "byte"])
def test_export_tokenizer_round_trips_through_autotokenizer(kind: str, tmp_path: Path) -> None:
    """gpt-export's tokenizer files: ``AutoTokenizer.from_pretrained`` encodes exactly as ours and
    decodes back to the text; end-of-text is its eos."""
    from transformers import AutoTokenizer

    from pretrain.export import save_tokenizer

    tok = train_tokenizer(kind, lambda: iter(TEXTS), 0)
    save_tokenizer(tok, tmp_path)
    hf = AutoTokenizer.from_pretrained(tmp_path)
    spacing = ["  two spaces , then a comma .\n\ttab"] if kind == "byte" else []  # char: its vocabulary's texts
    for text in [*TEXTS, *spacing, ""]:
        ids = tok.encode(text)
        assert hf.encode(text) == ids and hf.decode(ids) == text, text
    assert hf.eos_token_id == tok.eot_id and hf.convert_ids_to_tokens(tok.eot_id) == EOT


def test_files_written_before_the_tokenizers_format_still_load(tmp_path: Path) -> None:
    """Shard sets and checkpoints of earlier versions hold this project's own JSON as tokenizer.json."""
    (tmp_path / "tokenizer.json").write_text(json.dumps({"kind": "char", "chars": sorted(set(TEXTS[0]))}))
    old = load_tokenizer(tmp_path)
    new = train_tokenizer("char", lambda: iter(TEXTS[:1]), 0)
    assert old.kind == "char" and old.encode(TEXTS[1]) == new.encode(TEXTS[1])
    (tmp_path / "tokenizer.json").write_text(json.dumps({"kind": "byte"}))
    assert load_tokenizer(tmp_path).encode(TEXTS[1]) == list(TEXTS[1].encode("utf-8"))


def test_prepare_with_a_tokenizer_file_reports_the_unknown_characters(tmp_path: Path, capsys) -> None:  # noqa: ANN001
    """gpt-prepare tokenizer=file: on a corpus with characters its vocabulary lacks: one warning line
    with the count and examples (a char tokenizer trained on the corpus itself has none: no line)."""
    from data.prepare import prepare
    from tests.conftest import prepare_cfg

    (tmp_path / "old.txt").write_text("the quick brown fox jumps over the lazy dog\n" * 40)
    (tmp_path / "new.txt").write_text("the quick brown fox — über straße ✓\n" * 40)
    prepare(prepare_cfg(input=str(tmp_path / "old.txt"), out=str(tmp_path / "old"), seq_len=8))
    assert "unknown token" not in capsys.readouterr().err
    given = f"file:{tmp_path / 'old'}"
    prepare(prepare_cfg(input=str(tmp_path / "new.txt"), out=str(tmp_path / "new"), tokenizer=given, seq_len=8))
    lines = [line for line in capsys.readouterr().err.splitlines() if "unknown token" in line]
    unknown = 40 * sum(1 for c in "— über straße ✓" if c not in "the quick brown fox jumps over the lazy dog\n")
    total = 40 * len("the quick brown fox — über straße ✓\n") + 1  # and the end-of-text token
    assert lines == [
        f"warning: {unknown:,} of {total:,} characters ({unknown / total:.2%}) are not in the tokenizer's "
        "vocabulary and became its unknown token (e.g. 'ß', 'ü', '—', '✓')"
    ]


def test_a_char_tokenizer_in_either_file_format_is_the_same_tokenizer(tmp_path: Path) -> None:
    """A shard set re-prepared with ``tokenizer=file:`` of an older one (old JSON) resumes and mixes."""
    from data.tokenizer import CharTokenizer, equivalent_digests
    from pretrain.trainer.resume_checks import same_tokenizer

    old, new, other = tmp_path / "old", tmp_path / "new", tmp_path / "other"
    for d in (old, new, other):
        d.mkdir()
    (old / "tokenizer.json").write_text(json.dumps({"kind": "char", "chars": ["a", "b"]}, ensure_ascii=False))
    CharTokenizer(["a", "b"]).save(new)
    CharTokenizer(["a", "c"]).save(other)
    ident = {d: {"tokenizer_sha256": "-", "tokenizer_digests": equivalent_digests(d)} for d in (old, new, other)}
    recorded_old = {"tokenizer_sha256": hashlib.sha256((old / "tokenizer.json").read_bytes()).hexdigest()}
    assert same_tokenizer(recorded_old, ident[new]) and same_tokenizer(ident[new], ident[old])
    assert not same_tokenizer(recorded_old, ident[other]) and not same_tokenizer(ident[other], ident[new])
