"""Supervised task data for ``gpt-finetune``: JSONL examples and GPT-1's input transformations.

GPT-1 (Radford et al., 2018, fig. 1) feeds every task to the unchanged decoder as token
sequences framed by three tokens added to the vocabulary, and classifies from the final hidden
state of the last (``extract``) token:

- classification: ``start text extract``
- entailment: ``start premise delim hypothesis extract``
- similarity: both orders, ``start a delim b extract`` and ``start b delim a extract``; the two
  final states are summed before the head
- multiple choice: ``start context delim answer_k extract`` for each answer; one score each,
  softmax over the answers

Fields per type: ``text``/``label``; ``premise``/``hypothesis``/``label``;
``text_a``/``text_b``/``label`` (similarity; ``premise``/``hypothesis`` also accepted);
``context``/``choices``/``label`` (label = index of the right choice). Labels of the first
three types form a vocabulary taken from the train split (sorted); a validation or test label
outside it, an empty file, a missing field or a malformed line is a one-line error naming
the file and line.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from conf.errors import UserError
from data.jsonl import iter_jsonl
from data.tokenizer import Tokenizer

TASK_TYPES = ("classification", "entailment", "similarity", "multiple_choice")
FIELDS = {
    "classification": ("text",),
    "entailment": ("premise", "hypothesis"),
    "similarity": ("text_a", "text_b"),
    "multiple_choice": ("context", "choices"),
}


@dataclass(frozen=True)
class SpecialTokens:
    """Ids of GPT-1's added tokens: right after the pretraining tokenizer's vocabulary."""

    start: int
    delim: int
    extract: int

    @classmethod
    def after(cls, vocab_size: int) -> SpecialTokens:
        return cls(vocab_size, vocab_size + 1, vocab_size + 2)


@dataclass
class Example:
    sequences: list[list[int]]  # one per candidate (similarity: 2 orders; multiple choice: k answers)
    label: int


def read_jsonl(path: str | Path, task_type: str) -> list[dict[str, Any]]:
    """Rows of a task file, each with the fields its type needs (one-line errors otherwise)."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise UserError(f"task file {file}: not found")
    fields = FIELDS[task_type]
    if task_type == "similarity":
        fields = ()  # checked below: text_a/text_b or premise/hypothesis
    rows = []
    for number, row in iter_jsonl(file):
        if task_type == "similarity" and "text_a" not in row and "premise" in row:
            row = {**row, "text_a": row["premise"], "text_b": row.get("hypothesis")}
        for field in (*fields, *(("text_a", "text_b") if task_type == "similarity" else ()), "label"):
            if row.get(field) is None:
                raise UserError(f"{file}:{number}: missing field {field!r} (task.type={task_type})")
        if task_type == "multiple_choice" and (not isinstance(row["choices"], list) or len(row["choices"]) < 2):
            raise UserError(f"{file}:{number}: 'choices' must be a list of at least 2 answers")
        rows.append(row)
    if not rows:
        raise UserError(f"task file {file}: no examples (empty file)")
    return rows


def label_vocabulary(rows: list[dict[str, Any]], task_type: str) -> list[str]:
    """Sorted label strings of the train split (multiple choice: answer positions)."""
    if task_type == "multiple_choice":
        return [str(i) for i in range(max(len(r["choices"]) for r in rows))]
    labels = sorted({str(r["label"]) for r in rows})
    if len(labels) < 2:
        raise UserError(f"the train split has only one label ({labels[0]!r}); a classifier needs two or more")
    return labels


def encode_examples(
    rows: list[dict[str, Any]],
    task_type: str,
    labels: list[str],
    tokenizer: Tokenizer,
    special: SpecialTokens,
    max_len: int,
    source: str,
) -> list[Example]:
    """GPT-1 input transformations; over-long inputs lose tokens from the end of their first text."""
    index = {label: i for i, label in enumerate(labels)}
    examples = []
    for number, row in enumerate(rows, start=1):
        label = str(row["label"])
        if task_type == "multiple_choice":
            try:
                label_id = int(row["label"])
            except (TypeError, ValueError):
                label_id = -1
            if not 0 <= label_id < len(row["choices"]):
                raise UserError(f"task file {source}, example {number}: label {row['label']!r} is not a choice index")
        elif label not in index:
            raise UserError(
                f"task file {source}, example {number}: label {label!r} does not occur in the train split "
                f"(labels: {', '.join(labels)})"
            )
        else:
            label_id = index[label]
        encode = tokenizer.encode
        if task_type == "classification":
            sequences = [_frame(encode(str(row["text"])), None, special, max_len)]
        elif task_type == "entailment":
            sequences = [_frame(encode(str(row["premise"])), encode(str(row["hypothesis"])), special, max_len)]
        elif task_type == "similarity":
            a, b = encode(str(row["text_a"])), encode(str(row["text_b"]))
            sequences = [_frame(a, b, special, max_len), _frame(b, a, special, max_len)]
        else:
            context = encode(str(row["context"]))
            sequences = [_frame(context, encode(str(choice)), special, max_len) for choice in row["choices"]]
        examples.append(Example(sequences, label_id))
    return examples


def _frame(first: list[int], second: list[int] | None, special: SpecialTokens, max_len: int) -> list[int]:
    """``start first [delim second] extract`` in at most ``max_len`` tokens."""
    overhead = 2 if second is None else 3
    second = second or []
    budget = max_len - overhead
    if len(second) > budget // 2:  # keep at least half the room for the first text
        second = second[: max(budget - len(first), budget // 2)]
    first = first[: budget - len(second)]
    middle = [] if overhead == 2 else [special.delim, *second]
    return [special.start, *first, *middle, special.extract]


def batch_arrays(examples: list[Example], length: int, pad_id: int) -> dict[str, np.ndarray]:
    """Examples → fixed-shape arrays: tokens [n, k, length], extract positions [n, k], labels [n],
    choice mask [n, k] (multiple choice with fewer answers) and weight [n] (0: padding example)."""
    k = max(len(e.sequences) for e in examples)
    tokens = np.full((len(examples), k, length), pad_id, dtype=np.int64)
    extract = np.zeros((len(examples), k), dtype=np.int64)
    choice_mask = np.zeros((len(examples), k), dtype=np.float32)
    for i, example in enumerate(examples):
        for j, seq in enumerate(example.sequences):
            tokens[i, j, : len(seq)] = seq
            extract[i, j] = len(seq) - 1
            choice_mask[i, j] = 1.0
    labels = np.array([e.label for e in examples], dtype=np.int64)
    return {"tokens": tokens, "extract": extract, "labels": labels, "choice_mask": choice_mask}
