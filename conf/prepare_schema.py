"""gpt-prepare's config schema (``conf/prepare.yaml`` is composed on top of it: ``prepare_schema``).

Typed so that ``workers=two`` or a misspelt ``worker=2`` is one line naming the key before any
input is read, on the command line and for a config built in Python alike.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from omegaconf import MISSING

from conf.errors import UserError

EXECUTORS = ("local", "ray")


@dataclass
class ExecutorConfig:
    """Where gpt-prepare's tasks run: ``executor=ray`` picks the preset ``conf/executor/ray.yaml``
    (a Hydra group, so that ``executor=ray`` and ``executor.address=...`` both work)."""

    name: str = "local"  # local: a process pool of workers= on this machine; ray: Ray tasks (pip install -e .[ray])
    # ray only. null: a local Ray of workers= CPUs, started for the job and stopped after it;
    # auto, HOST:6379 or ray://HOST:10001: a running cluster, all of its CPUs (see launch/ray_prepare.sbatch)
    address: str | None = None


@dataclass
class PrepareConfig:
    """gpt-prepare: raw text / JSONL (plain, .gz, .zst) / Parquet / HF datasets -> tokenizer + webdataset shards."""

    input: str = MISSING  # a file, a directory, a glob or a Hugging Face dataset dir; local or s3://bucket/prefix
    out: str = MISSING  # output directory or s3://bucket/prefix (manifest.json, tokenizer.json, *.tar)
    tokenizer: str = "char"  # char | byte | bpe | tiktoken:<encoding> | file:<tokenizer.json or a dir holding one>
    vocab_size: int = 8192  # bpe only
    tokenizer_sample_bytes: int = 1_000_000_000  # bpe trains on at most this much text, spread over the inputs
    seq_len: int = 64  # tokens per training example (windows hold seq_len+1)
    val_fraction: float = 0.1  # last fraction of the token stream is validation (nanoGPT's split)
    shard_size: int = 1024  # windows per .tar shard
    text_field: str = "text"  # JSONL field / Parquet or Arrow column holding the document text
    workers: int = 1  # processes that tokenize and write shards (executor=ray: a local Ray's CPUs); same output for any
    dedup: bool = False  # drop exact duplicate documents (after NFC, whitespace collapsing, lowercasing)
    resume: bool = True  # continue an interrupted run's work dir; false discards it and starts over
    overwrite: bool = False  # replace an earlier gpt-prepare output in out (only its own files)
    work_dir: str | None = None  # the resumable work dir; null: beside out (s3:// out: ~/.cache/gpt-prepare/s3/...)
    executor: ExecutorConfig = field(default_factory=ExecutorConfig)  # executor=local|ray, executor.address=...
    retries: int = 3  # s3:// reads and writes: retries after a failed attempt (backoff 1 s, 2 s, ...), then one line

    def check(self) -> None:
        if not 0.0 <= self.val_fraction < 1.0:
            raise UserError(f"val_fraction={self.val_fraction}: must be in [0, 1)")
        for key in ("seq_len", "shard_size", "workers", "tokenizer_sample_bytes", "vocab_size"):
            if getattr(self, key) < 1:
                raise UserError(f"{key}={getattr(self, key)}: must be positive")
        if self.retries < 0:
            raise UserError(f"retries={self.retries}: must be >= 0")
        if not self.out:
            raise UserError("out=: give the output directory")
        if not self.input:
            raise UserError("input=: empty; give a file, a directory or a glob")
        if self.executor.name not in EXECUTORS:
            raise UserError(f"executor={self.executor.name}: unknown (known: {', '.join(EXECUTORS)})")
        if self.executor.address is not None and self.executor.name != "ray":
            raise UserError(f"executor.address={self.executor.address}: only with executor=ray")
