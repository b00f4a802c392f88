"""gpt-prepare's config schema (``conf/prepare.yaml`` is composed on top of it: ``prepare_schema``).

Typed so that ``workers=two`` or a misspelt ``worker=2`` is one line naming the key before any
input is read, on the command line and for a config built in Python alike.
"""

from __future__ import annotations

from dataclasses import dataclass

from omegaconf import MISSING

from conf.errors import UserError


@dataclass
class PrepareConfig:
    """gpt-prepare: raw text / JSONL (plain, .gz, .zst) -> tokenizer + webdataset shards."""

    input: str = MISSING  # a file, a directory or a glob
    out: str = MISSING  # output directory (manifest.json, tokenizer.json, *.tar)
    tokenizer: str = "char"  # char | byte | bpe | tiktoken:<encoding> | file:<tokenizer.json or a dir holding one>
    vocab_size: int = 8192  # bpe only
    tokenizer_sample_bytes: int = 1_000_000_000  # bpe trains on at most this much text, spread over the inputs
    seq_len: int = 64  # tokens per training example (windows hold seq_len+1)
    val_fraction: float = 0.1  # last fraction of the token stream is validation (nanoGPT's split)
    shard_size: int = 1024  # windows per .tar shard
    text_field: str = "text"  # JSONL field holding the document text
    workers: int = 1  # processes that tokenize (and write shards); the output is the same for any number
    dedup: bool = False  # drop exact duplicate documents (after NFC, whitespace collapsing, lowercasing)
    resume: bool = True  # continue an interrupted run's work dir; false discards it and starts over
    overwrite: bool = False  # replace an earlier gpt-prepare output in out (only its own files)

    def check(self) -> None:
        if not 0.0 <= self.val_fraction < 1.0:
            raise UserError(f"val_fraction={self.val_fraction}: must be in [0, 1)")
        for key in ("seq_len", "shard_size", "workers", "tokenizer_sample_bytes", "vocab_size"):
            if getattr(self, key) < 1:
                raise UserError(f"{key}={getattr(self, key)}: must be positive")
        if not self.out:
            raise UserError("out=: give the output directory")
        if not self.input:
            raise UserError("input=: empty; give a file, a directory or a glob")
