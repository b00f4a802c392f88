"""``gpt-prepare``: documents → tokenizer → fixed-length token windows → webdataset shards.

Documents (``.txt`` files, ``.jsonl`` lines with a text field, plain, ``.gz`` or ``.zst``; Parquet
and Hugging Face dataset rows; local or in a bucket: ``data/inputs.py``) are
streamed (``data/corpus.py``), tokenized by ``workers`` processes (``data/prepare_pool.py``), or by
Ray tasks on a cluster with ``executor=ray`` (``data/prepare_executor.py``, ``data/prepare_ray.py``), and
joined into one stream with an end-of-text token after each document. The stream is split like
nanoGPT's: the first ``1 - val_fraction`` of the tokens is training data, the rest validation.
Each split is cut into windows of ``seq_len + 1`` tokens with stride ``seq_len`` (window *i*
covers tokens ``[i·seq_len, (i+1)·seq_len]``), so every token is predicted exactly once and a
split of ``T`` tokens yields ``(T - 1) // seq_len`` windows. The output is byte-identical for any
``workers`` and either executor.

The corpus is never held in memory: each input file's tokens go to a part file in a work dir
beside ``out`` (``data/prepare_work.py``: what makes an interrupted run resumable, file by file);
once all are done, the shards are cut from the parts. ``dedup=true`` drops exact duplicate
documents (``data/prepare_dedup.py``). ``bpe`` trains on a bounded sample
(``tokenizer_sample_bytes``); ``char`` reads the corpus once more for its alphabet.

``out`` is an owned output directory (``data/output_dir.py``): a new or empty directory,
or one holding only an earlier gpt-prepare output, which ``overwrite=true`` replaces.
Anything else in it is refused before any work, and never deleted. Shards and manifest are
written into a hidden temporary directory and swapped into place at the end; a failure leaves
``out`` untouched. ``out=s3://bucket/prefix`` follows the same rule with objects, the manifest
written last (``data/s3_output.py``).
"""

from __future__ import annotations

import bisect
import contextlib
import hashlib
import os
import re
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

import conf.schema  # noqa: F401 - registers prepare_schema, which conf/prepare.yaml composes on
from conf.errors import UserError
from conf.prepare_schema import PrepareConfig
from conf.tool_schemas import typed
from data.corpus import corpus_pieces, first_text, sample_texts
from data.inputs import InputFile, resolve_inputs
from data.output_dir import check_output_dir, owned_output
from data.prepare_executor import PrepareExecutor, check_executor, open_executor
from data.prepare_pool import write_shard_task
from data.prepare_progress import Progress
from data.prepare_work import WorkDir, work_dir_of, worth_keeping
from data.s3 import S3Store, is_s3, split_url
from data.s3_output import S3Output
from data.shards import MANIFEST, shard_set_names, write_manifest
from data.tokenizer import TOKENIZER_FILE, BPETokenizer, CharTokenizer, Tokenizer, train_tokenizer

COMMAND = "gpt-prepare"
__all__ = ["prepare", "resolve_inputs", "legacy_shard_set"]


def legacy_shard_set(out: Path) -> set[str] | None:
    """A shard set written before gpt-prepare left a marker counts as its own: the names of
    ``manifest.json``, ``tokenizer.json`` and the ``.tar`` shards the manifest lists."""
    try:
        text = (out / MANIFEST).read_text()
    except OSError:
        return None
    return shard_set_names(text) if (out / TOKENIZER_FILE).is_file() else None


def typed_config(cfg: DictConfig | PrepareConfig) -> PrepareConfig:
    """``cfg`` checked against :class:`PrepareConfig` (a config built in Python skips Hydra's check)."""
    if not isinstance(cfg, PrepareConfig) and isinstance(cfg.get("executor"), str):
        # executor="ray" in Python, as executor=ray on the command line
        cfg = OmegaConf.merge(cfg, {"executor": None}, {"executor": {"name": cfg.executor}})
    return typed(cfg, PrepareConfig, config_name="prepare")


def settings_of(config: PrepareConfig) -> dict[str, Any]:
    """What the tokens of a part depend on: a resumed run must match these."""
    settings: dict[str, Any] = {"tokenizer": config.tokenizer, "text_field": config.text_field, "dedup": config.dedup}
    if config.tokenizer == "bpe":
        settings.update(vocab_size=config.vocab_size, tokenizer_sample_bytes=config.tokenizer_sample_bytes)
    if config.tokenizer.startswith("file:"):  # the same path may hold another tokenizer by now
        path = Path(config.tokenizer.split(":", 1)[1]).expanduser()
        path = path if path.is_file() else path / TOKENIZER_FILE
        settings["tokenizer_sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    return settings


def build_tokenizer(config: PrepareConfig, files: list[InputFile], given: Tokenizer | None) -> Tokenizer:
    if given is not None:
        return given
    if config.tokenizer == "char":
        print(f"char: collecting the alphabet (one pass over {len(files)} input files)", flush=True)
        return CharTokenizer.train(text for text, _ in corpus_pieces(files, config.text_field))
    print(f"bpe: training vocab_size={config.vocab_size} on up to {config.tokenizer_sample_bytes / 1e6:.0f} MB")
    return BPETokenizer.train(sample_texts(files, config.text_field, config.tokenizer_sample_bytes), config.vocab_size)


def shard_tasks(
    out: Path, name: str, base: int, length: int, config: PrepareConfig, parts: list[tuple[str, int, int]]
) -> list[tuple[str, int, int, int, list[tuple[str, int, int]]]]:
    """One task per shard of the split ``[base, base + length)`` of the token stream: which slices of
    which part files its windows come from."""
    seq_len, size = config.seq_len, config.shard_size
    count = (length - 1) // seq_len
    starts = [p[1] for p in parts]
    tasks = []
    for number, first in enumerate(range(0, count, size)):
        n = min(size, count - first)
        lo, hi = base + first * seq_len, base + (first + n) * seq_len + 1
        slices = []
        for path, start, tokens in parts[max(bisect.bisect_right(starts, lo) - 1, 0) :]:
            if start >= hi:
                break
            a, b = max(lo, start), min(hi, start + tokens)
            if a < b:
                slices.append((path, a - start, b - a))
        tasks.append((str(out / f"{name}-{number:06d}.tar"), first, n, seq_len, slices))
    return tasks


class Destination:
    """Where the output goes: an owned local directory (``data/output_dir.py``) or an ``s3://``
    prefix (``data/s3_output.py``), checked before any work and written the same way: into a local
    directory, each finished file handed to ``publish`` (an upload for a bucket), manifest last."""

    def __init__(self, config: PrepareConfig, files: list[InputFile], store: S3Store) -> None:
        self.config, self.files = config, files
        self.s3 = S3Output(config.out, COMMAND, config.overwrite, store) if is_s3(config.out) else None
        self.local = None if self.s3 else Path(config.out).expanduser()
        given = [] if is_s3(config.input) else [Path(config.input).expanduser()]
        self.inputs = given + [f for f in files if isinstance(f, Path)]  # what replacing a local out must spare
        if self.s3 is not None:
            self.s3.check(files)
        else:
            check_output_dir(self.local, COMMAND, config.overwrite, inputs=self.inputs, legacy=legacy_shard_set)

    @property
    def label(self) -> str:
        return self.s3.url if self.s3 else str(self.local)

    def work_path(self) -> Path:
        """The work dir: ``work_dir=``, else beside a local ``out``, else under the user's cache dir
        (``$XDG_CACHE_HOME`` or ``~/.cache``) at a name made from the bucket and prefix."""
        if self.config.work_dir:
            return Path(self.config.work_dir).expanduser().resolve()
        if self.local is not None:
            return work_dir_of(self.local.resolve())
        bucket, prefix = split_url(self.config.out, "out")
        slug = re.sub(r"[^A-Za-z0-9._-]", "_", prefix) or "_"
        digest = hashlib.sha256(self.label.encode()).hexdigest()[:8]
        cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser()
        return work_dir_of(cache / "gpt-prepare" / "s3" / bucket / f"{slug}-{digest}")

    @contextlib.contextmanager
    def writing(self, work: WorkDir) -> Iterator[tuple[Path, Callable[[list[str]], None], Callable[[Path], None]]]:
        """(directory to write into, ``expect(names)`` before writing them, ``publish(path)`` of each finished file)."""
        if self.s3 is not None:
            with self.s3.writing(work.path / "staging", self.files) as writer:
                yield writer.path, writer.expect, writer.publish
            return
        assert self.local is not None
        with owned_output(
            self.local, COMMAND, self.config.overwrite, inputs=self.inputs, legacy=legacy_shard_set
        ) as tmp:
            yield tmp, lambda names: None, lambda path: None


def finalise(
    config: PrepareConfig,
    destination: Destination,
    files: list[InputFile],
    work: WorkDir,
    tokenizer: Tokenizer,
    dtype: str,
    executor: PrepareExecutor,
) -> dict:
    """Cut the finished parts into shards and write the manifest (last) into ``out``'s temp dir."""
    done = work.done
    parts, total = [], 0
    for index in range(len(files)):
        parts.append((str(work.part(index)), total, done[index]["tokens"]))
        total += done[index]["tokens"]
    n_val = int(total * config.val_fraction)
    splits = {"train": (0, total - n_val)} | ({"val": (total - n_val, n_val)} if n_val else {})
    for name, (_, length) in splits.items():
        if (length - 1) // config.seq_len <= 0:
            raise UserError(
                f"input={config.input}: the {name} split has fewer than seq_len+1={config.seq_len + 1} tokens"
            )
    with destination.writing(work) as (tmp, expect, publish):
        tasks = {name: shard_tasks(tmp, name, base, length, config, [p for p in parts if p[2]])
                 for name, (base, length) in splits.items()}  # fmt: skip
        expect([TOKENIZER_FILE, *(Path(task[0]).name for split in tasks.values() for task in split)])
        tokenizer.save(tmp)
        publish(tmp / TOKENIZER_FILE)
        written = {}
        for name, split_tasks in tasks.items():
            bar = Progress(len(split_tasks), f"write {name}", unit="shard")
            shards = []
            for entry in executor.map(write_shard_task, split_tasks):
                shards.append(entry)
                publish(tmp / entry["file"])
                bar.update(1)
            bar.close()
            samples = sum(s["num_samples"] for s in shards)
            written[name] = {"num_samples": samples, "num_tokens": samples * config.seq_len, "shards": shards}
        manifest = {
            "tokenizer": tokenizer.kind,
            "vocab_size": tokenizer.vocab_size,
            "eot_id": tokenizer.eot_id,
            "seq_len": config.seq_len,
            "dtype": dtype,
            "window_stride": config.seq_len,
            "splits": written,
            "source": {
                "inputs": [str(f) for f in files],
                "num_documents": sum(d["documents"] for d in done.values()),
                "num_tokens": total,
                "val_fraction": config.val_fraction,
                "dedup": config.dedup,
                "num_duplicates": sum(d["duplicates"] for d in done.values()),
            },
        }
        write_manifest(tmp, manifest)
    return manifest


def prepare(cfg: DictConfig | PrepareConfig) -> Path | str:
    """Run the whole preparation (or resume an interrupted one); returns the output directory (or
    the ``s3://`` URL of the output prefix)."""
    config = typed_config(cfg)
    check_executor(config)  # executor=ray without Ray: one line, before any work
    store = S3Store(retries=config.retries)
    files = resolve_inputs(config.input, store)
    destination = Destination(config, files, store)  # refuses an out it may not write, before any work
    kind = config.tokenizer
    given = None if kind in ("char", "bpe") else train_tokenizer(kind, lambda: iter(()), 0)  # refused up front
    settings = settings_of(config)
    if not first_text(files, config.text_field):
        raise UserError(f"input: {', '.join(map(str, files[:3]))}: empty (no text to tokenize)")
    work = WorkDir.open(destination.label, settings, files, config.resume, destination.work_path(), store)
    try:
        manifest = _run(config, destination, files, work, given)
    except BaseException as exc:
        if not worth_keeping(work.record):
            work.remove()
            raise
        work.close()
        finished = len(set(work.done) | set(work.scanned))
        kept = f"{finished} of {len(files)} input files done and kept in {work.path}; the same command resumes"
        if isinstance(exc, UserError):
            raise UserError(f"{exc} ({kept})") from exc
        print(f"note: {kept}", file=sys.stderr, flush=True)
        raise
    work.remove()
    for name, split in manifest["splits"].items():
        print(f"{name}: {split['num_samples']} windows of {config.seq_len + 1} tokens in {len(split['shards'])} shards")
    source = manifest["source"]
    removed = f" ({source['num_duplicates']} exact duplicates removed)" if config.dedup else ""
    print(f"documents: {source['num_documents']}{removed}, tokens: {source['num_tokens']}")
    print(f"tokenizer={manifest['tokenizer']} vocab_size={manifest['vocab_size']} → {destination.label}")
    return destination.local if destination.local is not None else destination.label


def _run(
    config: PrepareConfig, destination: Destination, files: list[InputFile], work: WorkDir, given: Tokenizer | None
) -> dict:
    with open_executor(config) as executor:  # Ray is reached (or started) before a tokenizer is trained
        finished = executor.finished(work)
        if finished:
            print(f"resuming: {len(finished)} of {len(files)} input files already tokenized ({work.path})", flush=True)
        tokenizer = work.tokenizer()
        if tokenizer is None:
            tokenizer = build_tokenizer(config, files, given)
            work.save_tokenizer(tokenizer)
        dtype = "uint16" if tokenizer.vocab_size <= 2**16 else "uint32"
        with executor.running(work.path, dtype):
            executor.tokenize(work, files)
            return finalise(config, destination, files, work, tokenizer, dtype, executor)


@hydra.main(version_base=None, config_path="../conf", config_name="prepare")
def _hydra_main(cfg: DictConfig) -> None:
    from conf.cli import exit_on_user_error

    with exit_on_user_error():
        prepare(cfg)


def main() -> None:
    from conf.cli import check_group_choices

    check_group_choices(sys.argv[1:], groups=("executor",), config_name="prepare")
    _hydra_main()


if __name__ == "__main__":
    main()
