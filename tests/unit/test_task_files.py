"""Fine-tuning task files: GPT-1's input transformations and one-line errors for bad files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conf.errors import UserError
from data.tasks import SpecialTokens, encode_examples, label_vocabulary, read_jsonl
from data.tokenizer import load_tokenizer


def test_input_transformations_frame_gpt1_style(char_shards: Path) -> None:
    tokenizer = load_tokenizer(char_shards)
    special = SpecialTokens.after(tokenizer.vocab_size)
    enc = tokenizer.encode

    def frames(task_type: str, row: dict, max_len: int = 64) -> list[list[int]]:
        labels = label_vocabulary([row, {**row, "label": "zz"}], task_type) if task_type != "multiple_choice" else []
        return encode_examples([row], task_type, labels, tokenizer, special, max_len, "t")[0].sequences

    s, d, e = special.start, special.delim, special.extract
    assert frames("classification", {"text": "abc", "label": "x"}) == [[s, *enc("abc"), e]]
    pair = {"premise": "ab", "hypothesis": "cd", "label": "x"}
    assert frames("entailment", pair) == [[s, *enc("ab"), d, *enc("cd"), e]]
    assert frames("similarity", {"text_a": "ab", "text_b": "cd", "label": "x"}) == [
        [s, *enc("ab"), d, *enc("cd"), e],
        [s, *enc("cd"), d, *enc("ab"), e],
    ]
    mc = frames("multiple_choice", {"context": "ab", "choices": ["c", "de"], "label": 1})
    assert mc == [[s, *enc("ab"), d, *enc("c"), e], [s, *enc("ab"), d, *enc("de"), e]]
    long = frames("entailment", {"premise": "a" * 100, "hypothesis": "b" * 100, "label": "x"}, max_len=32)[0]
    assert len(long) == 32 and long[0] == s and long[-1] == e and d in long  # truncated, still framed


@pytest.mark.parametrize(
    ("content", "task_type", "message"),
    [
        ("", "classification", "no examples"),
        ('{"text": "a"}\n', "classification", "missing field 'label'"),
        ('{"premise": "a", "label": 1}\n', "entailment", "missing field 'hypothesis'"),
        ('{"context": "a", "choices": ["b"], "label": 0}\n', "multiple_choice", "at least 2 answers"),
        ("not json\n", "classification", "task.jsonl:1: invalid JSON"),
    ],
)
def test_bad_task_files_are_named(tmp_path: Path, content: str, task_type: str, message: str) -> None:
    path = tmp_path / "task.jsonl"
    path.write_text(content)
    with pytest.raises(UserError, match=message):
        read_jsonl(path, task_type)


def test_jsonl_lines_may_contain_unicode_line_separators(tmp_path: Path) -> None:
    """U+0085 / U+2028 inside a JSON string (rotten_tomatoes has them) is not a line break."""
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps({"text": "ambition\u0085 whole \u2028plots", "label": "rotten"}) + "\n")
    assert read_jsonl(path, "classification")[0]["text"] == "ambition\u0085 whole \u2028plots"
