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
