"""``gpt-prepare``: documents → tokenizer → fixed-length token windows → webdataset shards.

Documents (``.txt`` files, or ``.jsonl`` lines with a text field) are tokenized
and joined into one stream with an end-of-text token after each document. The
stream is split like nanoGPT's: the first ``1 - val_fraction`` of the tokens is
training data, the rest validation. Each split is cut into windows of
``seq_len + 1`` tokens with stride ``seq_len`` (window *i* covers tokens
``[i·seq_len, (i+1)·seq_len]``), so every token is predicted exactly once and a
split of ``T`` tokens yields ``(T - 1) // seq_len`` windows.

``out`` is an owned output directory (``data/output_dir.py``): a new or empty directory,
or one holding only an earlier gpt-prepare output, which ``overwrite=true`` replaces.
Anything else in it is refused before any work, and never deleted. Everything is written
into a hidden temporary directory and swapped into place at the end; a failure leaves
``out`` untouched.
"""

from __future__ import annotations

import glob
import json
from pathlib import Path

import hydra
import numpy as np
from omegaconf import DictConfig
from tqdm import tqdm

from conf.errors import UserError
from data.jsonl import iter_jsonl
from data.output_dir import check_output_dir, owned_output
from data.shards import FORMAT, MANIFEST, write_manifest, write_shard
from data.tokenizer import TOKENIZER_FILE, Tokenizer, existing_tokenizer, train_tokenizer

SUFFIXES = (".txt", ".jsonl")
COMMAND = "gpt-prepare"


def legacy_shard_set(out: Path) -> set[str] | None:
    """A shard set written before gpt-prepare left a marker counts as its own: the names of
    ``manifest.json``, ``tokenizer.json`` and the ``.tar`` shards the manifest lists."""
    try:
        raw = json.loads((out / MANIFEST).read_text())
        shards = {str(s["file"]) for split in raw["splits"].values() for s in split["shards"]}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    if raw.get("format") != FORMAT or not (out / TOKENIZER_FILE).is_file():
        return None
    if not all(f.endswith(".tar") and "/" not in f for f in shards):
        return None
    return {MANIFEST, TOKENIZER_FILE, *shards}


def resolve_inputs(spec: str) -> list[Path]:
    """A file, a directory (its .txt/.jsonl files, recursively) or a glob → sorted files."""
    if not spec:
        raise UserError("input=: empty; give a file, a directory or a glob")
    path = Path(spec).expanduser()
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in SUFFIXES)
    else:
        files = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
    if not files:
        raise UserError(f"input={spec}: no such file, or no .txt/.jsonl files match")
    return files


def read_documents(files: list[Path], text_field: str) -> list[str]:
    """Read every document; a non-UTF-8 file or bad JSONL line is named in the error."""
    docs: list[str] = []
    for path in files:
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise UserError(f"{path}: not UTF-8 text (byte {exc.start}: {exc.reason})") from exc
        if path.suffix == ".jsonl":
            for lineno, record in iter_jsonl(path, text):
                if not isinstance(record.get(text_field), str):
                    raise UserError(f"{path}:{lineno}: no string field {text_field!r}")
                if record[text_field]:
                    docs.append(record[text_field])
        elif text:
            docs.append(text)
    if not docs or not any(d.strip() for d in docs):
        raise UserError(f"input: {', '.join(map(str, files[:3]))}: empty (no text to tokenize)")
    return docs


def tokenize(docs: list[str], tokenizer: Tokenizer, dtype: str) -> np.ndarray:
    """One token stream, each document followed by end-of-text."""
    parts = []
    for doc in tqdm(docs, desc="tokenize", unit="doc", disable=len(docs) < 2):
        parts.append(np.asarray(tokenizer.encode(doc) + [tokenizer.eot_id], dtype=dtype))
    return np.concatenate(parts)


def windows(stream: np.ndarray, seq_len: int) -> np.ndarray:
    """Windows of seq_len+1 tokens with stride seq_len (each token is a target once)."""
    count = (len(stream) - 1) // seq_len
    if count <= 0:
        return np.empty((0, seq_len + 1), dtype=stream.dtype)
    index = np.arange(count)[:, None] * seq_len + np.arange(seq_len + 1)[None, :]
    return stream[index]


def write_split(out: Path, name: str, data: np.ndarray, shard_size: int) -> dict:
    shards = []
    starts = range(0, len(data), shard_size)
    for number, start in enumerate(tqdm(starts, desc=f"write {name}", unit="shard")):
        path = out / f"{name}-{number:06d}.tar"
        info = write_shard(path, data[start : start + shard_size], start)
        shards.append({"file": path.name, "num_samples": info.num_samples, "sha256": info.sha256, "bytes": info.size})
    return {"num_samples": int(len(data)), "num_tokens": int(len(data) * (data.shape[1] - 1)), "shards": shards}


def prepare(cfg: DictConfig) -> Path:
    """Run the whole preparation; returns the output directory."""
    if not 0.0 <= float(cfg.val_fraction) < 1.0:
        raise UserError(f"val_fraction={cfg.val_fraction}: must be in [0, 1)")
    if int(cfg.seq_len) < 1 or int(cfg.shard_size) < 1:
        raise UserError(f"seq_len={cfg.seq_len}, shard_size={cfg.shard_size}: must be positive")
    if not cfg.out:
        raise UserError("out=: give the output directory")
    out = Path(cfg.out).expanduser()
    files = resolve_inputs(str(cfg.input))
    inputs = [Path(str(cfg.input)).expanduser(), *files]
    check_output_dir(out, COMMAND, bool(cfg.overwrite), inputs=inputs, legacy=legacy_shard_set)
    kind = str(cfg.tokenizer)
    given = existing_tokenizer(kind) if kind.startswith("file:") else None  # refused before any reading
    docs = read_documents(files, str(cfg.text_field))
    tokenizer = given or train_tokenizer(kind, lambda: iter(docs), int(cfg.vocab_size))
    dtype = "uint16" if tokenizer.vocab_size <= 2**16 else "uint32"
    stream = tokenize(docs, tokenizer, dtype)
    seq_len = int(cfg.seq_len)
    n_val = int(len(stream) * float(cfg.val_fraction))
    splits = {"train": windows(stream[: len(stream) - n_val], seq_len)}
    if n_val:
        splits["val"] = windows(stream[len(stream) - n_val :], seq_len)
    for name, data in splits.items():
        if len(data) == 0:
            raise UserError(f"input={cfg.input}: the {name} split has fewer than seq_len+1={seq_len + 1} tokens")

    with owned_output(out, COMMAND, bool(cfg.overwrite), inputs=inputs, legacy=legacy_shard_set) as tmp:
        tokenizer.save(tmp)
        manifest = {
            "tokenizer": tokenizer.kind,
            "vocab_size": tokenizer.vocab_size,
            "eot_id": tokenizer.eot_id,
            "seq_len": seq_len,
            "dtype": dtype,
            "window_stride": seq_len,
            "splits": {n: write_split(tmp, n, d, int(cfg.shard_size)) for n, d in splits.items()},
            "source": {
                "inputs": [str(f) for f in files],
                "num_documents": len(docs),
                "num_tokens": int(len(stream)),
                "val_fraction": float(cfg.val_fraction),
            },
        }
        write_manifest(tmp, manifest)
    for name, split in manifest["splits"].items():
        print(f"{name}: {split['num_samples']} windows of {seq_len + 1} tokens in {len(split['shards'])} shards")
    print(f"tokenizer={tokenizer.kind} vocab_size={tokenizer.vocab_size} → {out}")
    return out


@hydra.main(version_base=None, config_path="../conf", config_name="prepare")
def _hydra_main(cfg: DictConfig) -> None:
    from conf.cli import exit_on_user_error

    with exit_on_user_error():
        prepare(cfg)


def main() -> None:
    _hydra_main()


if __name__ == "__main__":
    main()
