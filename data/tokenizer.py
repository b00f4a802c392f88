"""Tokenizers behind one small interface: ``char``, ``byte``, ``bpe`` and ``tiktoken``.

Every tokenizer reserves one end-of-text id that separates documents in the
token stream, and is saved next to the shards (``tokenizer.json``) so that
training, fine-tuning, evaluation and generation all decode the same way.

A ``tokenizer.json`` is always a Hugging Face ``tokenizers`` file, as the name promises to every
other tool (``tokenizers.Tokenizer.from_file``, transformers): char and byte are BPE models without
merges, which split the text into characters (char: no pre-tokenizer, unknown characters to
``<unk>``) or bytes (byte: the byte-level pre-tokenizer, one token per byte), so the file encodes
exactly as :meth:`Tokenizer.encode`. They are recognised by that shape when loaded
(:func:`_own_tokenizers_file`). Shard sets and checkpoints written before kept this project's own
JSON (``{"kind": "char", "chars": [...]}``) under the same name: it still loads. tiktoken is saved
by its encoding's name only (its files may be on gpt-prepare's machine alone).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from conf.errors import UserError

EOT = "<|endoftext|>"
# a foreign (e.g. imported Llama) tokenizer's end-of-text, when it has no GPT-2 ``<|endoftext|>``
EOT_FALLBACKS = ("<|end_of_text|>", "</s>", "<|im_end|>", "<eos>")
TOKENIZER_FILE = "tokenizer.json"
UNK = "<unk>"  # the char tokenizer's unknown token in its tokenizers file


class Tokenizer:
    """Common interface: ``encode``, ``decode``, ``vocab_size``, ``eot_id``, ``save``."""

    kind = "base"
    eot_id: int
    vocab_size: int
    unk_id: int | None = None  # the id of text outside the vocabulary (None: every text has its own ids)

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: Iterable[int]) -> str:
        raise NotImplementedError

    def save(self, directory: Path) -> None:
        raise NotImplementedError

    def token_to_id(self, token: str) -> int | None:
        """Id of a special token, or None (fine-tuning adds its own tokens after the vocab)."""
        return self.eot_id if token == EOT else None

    def to_tokenizers(self) -> Any:  # noqa: ANN401 - tokenizers.Tokenizer, imported on demand
        """This tokenizer as a Hugging Face ``tokenizers.Tokenizer`` that encodes every text as
        :meth:`encode` does (what ``tokenizer.json`` holds and gpt-export gives transformers), or None."""
        return None

    def unknown_examples(self, texts: Iterable[str], limit: int = 5) -> list[str]:
        """Up to ``limit`` distinct characters of ``texts`` that become the unknown token."""
        return []


class CharTokenizer(Tokenizer):
    """One id per character seen in the training text (nanoGPT's shakespeare_char).

    Characters never seen at training time map to an ``<unk>`` id instead of failing,
    because fine-tuning and evaluation feed text the vocabulary was not built from.
    """

    kind = "char"

    def __init__(self, chars: list[str]) -> None:
        self.chars = chars
        self.stoi = {c: i for i, c in enumerate(chars)}
        self.eot_id = len(chars)
        self.unk_id = len(chars) + 1
        self.vocab_size = len(chars) + 2

    @classmethod
    def train(cls, texts: Iterable[str]) -> CharTokenizer:
        seen: set[str] = set()
        for text in texts:
            seen.update(text)
        return cls(sorted(seen))

    def encode(self, text: str) -> list[int]:
        stoi, unk = self.stoi, self.unk_id
        return [stoi.get(c, unk) for c in text]

    def decode(self, ids: Iterable[int]) -> str:
        out = []
        for i in ids:
            if i < len(self.chars):
                out.append(self.chars[i])
            elif i == self.eot_id:
                out.append("\n")
        return "".join(out)

    def save(self, directory: Path) -> None:
        self.to_tokenizers().save(str(directory / TOKENIZER_FILE))

    def to_tokenizers(self) -> Any:  # noqa: ANN401
        """A BPE model without merges and without a pre-tokenizer: one token per character, an unknown
        character to ``<unk>`` (not fused: one id each, as :meth:`encode`)."""
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import decoders, models

        vocab = {c: i for i, c in enumerate(self.chars)} | {EOT: self.eot_id, UNK: self.unk_id}
        backend = HFTokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK, fuse_unk=False))
        backend.decoder = decoders.Fuse()
        backend.add_special_tokens([EOT])
        return backend

    def unknown_examples(self, texts: Iterable[str], limit: int = 5) -> list[str]:
        seen: set[str] = set()
        for text in texts:
            seen.update(text)
        return sorted(seen - self.stoi.keys())[:limit]


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes (256 ids) plus end-of-text: no training, any text."""

    kind = "byte"

    def __init__(self) -> None:
        self.eot_id = 256
        self.vocab_size = 257

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Iterable[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def save(self, directory: Path) -> None:
        self.to_tokenizers().save(str(directory / TOKENIZER_FILE))

    def to_tokenizers(self) -> Any:  # noqa: ANN401
        """A BPE model without merges over GPT-2's byte alphabet, behind the byte-level pre-tokenizer
        (without its regex split: the whole text is one piece): one token per UTF-8 byte."""
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import decoders, models, pre_tokenizers

        vocab = {c: b for b, c in enumerate(byte_alphabet())} | {EOT: self.eot_id}
        backend = HFTokenizer(models.BPE(vocab=vocab, merges=[]))
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        backend.decoder = decoders.ByteLevel()
        backend.add_special_tokens([EOT])
        return backend


class BPETokenizer(Tokenizer):
    """Byte-level BPE trained with Hugging Face ``tokenizers`` (GPT-2 style)."""

    kind = "bpe"

    def __init__(self, backend: Any, source: str = TOKENIZER_FILE) -> None:
        self.backend = backend
        ids = [backend.token_to_id(t) for t in (EOT, *EOT_FALLBACKS)]
        eot = next((i for i in ids if i is not None), None)
        if eot is None:
            raise UserError(f"{source}: no end-of-text token ({', '.join((EOT, *EOT_FALLBACKS))})")
        self.eot_id = eot
        self.vocab_size = backend.get_vocab_size()
        unk = getattr(backend.model, "unk_token", None)  # byte-level BPE has none; a foreign model may
        self.unk_id = backend.token_to_id(unk) if unk else None

    @classmethod
    def train(cls, texts: Iterator[str], vocab_size: int) -> BPETokenizer:
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import decoders, models, pre_tokenizers, trainers

        backend = HFTokenizer(models.BPE())
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=[EOT],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        backend.train_from_iterator(texts, trainer=trainer)
        return cls(backend)

    def encode(self, text: str) -> list[int]:
        # no special tokens: a foreign tokenizer's post-processor (Llama's BOS) would insert them
        # into every document, context and continuation
        return self.backend.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int]) -> str:
        return self.backend.decode(list(ids))

    def save(self, directory: Path) -> None:
        self.backend.save(str(directory / TOKENIZER_FILE))

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def to_tokenizers(self) -> Any:  # noqa: ANN401
        return self.backend


class TiktokenTokenizer(Tokenizer):
    """A tiktoken encoding the user already has locally (no download at run time)."""

    kind = "tiktoken"

    def __init__(self, name: str) -> None:
        try:
            import tiktoken

            self.enc = tiktoken.get_encoding(name)
        except Exception as exc:  # noqa: BLE001 - any failure means "not available offline"
            raise UserError(
                f"tokenizer=tiktoken:{name}: encoding not available locally ({exc}); "
                "install tiktoken and cache its files, or use tokenizer=bpe"
            ) from exc
        self.name = name
        self.eot_id = self.enc.eot_token
        self.vocab_size = self.enc.n_vocab

    def encode(self, text: str) -> list[int]:
        return self.enc.encode_ordinary(text)

    def decode(self, ids: Iterable[int]) -> str:
        return self.enc.decode(list(ids))

    def save(self, directory: Path) -> None:
        (directory / TOKENIZER_FILE).write_text(json.dumps({"kind": self.kind, "name": self.name}))


def train_tokenizer(kind: str, texts_factory: Any, vocab_size: int) -> Tokenizer:
    """Build a tokenizer of ``kind``; ``texts_factory()`` yields the training documents."""
    if kind == "char":
        return CharTokenizer.train(texts_factory())
    if kind == "byte":
        return ByteTokenizer()
    if kind == "bpe":
        return BPETokenizer.train(texts_factory(), vocab_size)
    if kind.startswith("tiktoken:"):
        return TiktokenTokenizer(kind.split(":", 1)[1])
    if kind.startswith("file:"):
        return existing_tokenizer(kind)
    raise UserError(f"tokenizer={kind!r}: expected one of char, byte, bpe, tiktoken:<encoding>, file:<path>")


def existing_tokenizer(kind: str) -> Tokenizer:
    """``file:PATH``: a tokenizer saved before -- a ``tokenizer.json`` or a directory holding one (a
    shard set, a checkpoint, a transformers model dir such as ``gpt-import``'s source)."""
    path = Path(kind.split(":", 1)[1]).expanduser()
    if path.is_file() and path.name == TOKENIZER_FILE:
        path = path.parent
    if not (path / TOKENIZER_FILE).is_file():
        raise UserError(f"tokenizer={kind}: no {TOKENIZER_FILE} there")
    return load_tokenizer(path)


def _payload(path: Path) -> tuple[str | None, dict[str, Any]]:
    """(this project's ``kind`` or None for a ``tokenizers`` file, the JSON) of a tokenizer.json, or
    one line naming the file: a truncated or hand-edited file must not become a traceback."""
    if not path.is_file():
        raise UserError(f"{path}: no tokenizer saved here (run gpt-prepare first)")
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise UserError(f"{path}: cannot read ({exc.strerror})") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
        raise UserError(f"{path}: not a tokenizer file (not JSON: {exc})") from None
    if not isinstance(payload, dict):
        raise UserError(f"{path}: not a tokenizer file (a JSON {type(payload).__name__}, not an object)")
    own = _own_tokenizers_file(payload)
    if own is not None:
        return own[0], {"chars": own[1]}
    kind = payload.get("kind")  # this project's own JSON, written before tokenizer.json was tokenizers'
    if kind == "char" and not (
        isinstance(payload.get("chars"), list) and all(isinstance(c, str) for c in payload["chars"])
    ):
        raise UserError(f"{path}: malformed char tokenizer (its chars must be a list of strings)")
    if kind == "tiktoken" and not isinstance(payload.get("name"), str):
        raise UserError(f"{path}: malformed tiktoken tokenizer (its name must be an encoding name)")
    return (kind if kind in ("char", "byte", "tiktoken") else None), payload


def byte_alphabet() -> list[str]:
    """GPT-2's printable stand-in of each byte 0..255 (what the byte-level pre-tokenizer maps bytes to)."""
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)}
    shifted = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(shifted)) for b in range(256)]


def _own_tokenizers_file(payload: dict[str, Any]) -> tuple[str, list[str]] | None:
    """``("char", chars)`` or ``("byte", [])`` when a tokenizers file has the shape CharTokenizer or
    ByteTokenizer writes (a BPE model without merges, normalizer or post-processor, over single
    characters then end-of-text and ``<unk>``, or over the byte alphabet then end-of-text); else None."""
    model = payload.get("model")
    if not isinstance(model, dict) or model.get("type") != "BPE" or model.get("merges"):
        return None
    if any(payload.get(k) is not None for k in ("normalizer", "post_processor")) or any(
        model.get(k) for k in ("fuse_unk", "byte_fallback", "continuing_subword_prefix", "end_of_word_suffix")
    ):
        return None
    vocab = model.get("vocab")
    if not isinstance(vocab, dict) or not all(isinstance(v, int) and not isinstance(v, bool) for v in vocab.values()):
        return None
    tokens = sorted(vocab, key=vocab.__getitem__)
    if [vocab[t] for t in tokens] != list(range(len(tokens))):
        return None
    pre = payload.get("pre_tokenizer")
    if pre is None and model.get("unk_token") == UNK and tokens[-2:] == [EOT, UNK]:
        chars = tokens[:-2]
        return ("char", chars) if all(len(c) == 1 for c in chars) else None
    byte_level = isinstance(pre, dict) and pre.get("type") == "ByteLevel" and pre.get("use_regex") is False
    if byte_level and not pre.get("add_prefix_space") and tokens == [*byte_alphabet(), EOT]:
        return "byte", []
    return None


def check_saved_tokenizer(directory: str | Path, vocab_size: int, eot_id: int) -> None:
    """Load the tokenizer beside a shard set and match it with the manifest's ``vocab_size`` and
    ``eot_id``: gpt-pretrain calls this at start, because it only hashes the file otherwise and would
    train for hours and copy a broken file into every checkpoint (gpt-generate would find out).
    A tiktoken encoding is checked by name only: its files may be on gpt-prepare's machine alone."""
    path = Path(directory) / TOKENIZER_FILE
    kind, _ = _payload(path)
    found = (vocab_size, eot_id) if kind == "tiktoken" else None
    if found is None:
        tokenizer = load_tokenizer(directory)
        found = (tokenizer.vocab_size, tokenizer.eot_id)
    if found != (vocab_size, eot_id):
        raise UserError(
            f"{path}: vocab {found[0]}, end-of-text id {found[1]}; its manifest.json says vocab {vocab_size}, "
            f"end-of-text id {eot_id} (replaced after gpt-prepare? prepare the data again)"
        )


def load_tokenizer(directory: str | Path) -> Tokenizer:
    """Load the tokenizer saved beside a shard set (``DIR/tokenizer.json``)."""
    path = Path(directory) / TOKENIZER_FILE
    kind, payload = _payload(path)
    if kind == "char":
        return CharTokenizer(payload["chars"])
    if kind == "byte":
        return ByteTokenizer()
    if kind == "tiktoken":
        return TiktokenTokenizer(payload["name"])
    from tokenizers import Tokenizer as HFTokenizer

    try:
        backend = HFTokenizer.from_file(str(path))
    except Exception as exc:  # noqa: BLE001 - a user's file: say which and why, in one line
        raise UserError(f"{path}: not a tokenizer file ({str(exc).splitlines()[0] if str(exc) else exc})") from exc
    return BPETokenizer(backend, str(path))


def equivalent_digests(directory: Path) -> list[str]:
    """sha256 of every ``tokenizer.json`` that encodes exactly as the one in ``directory``: its own bytes
    and, for char and byte tokenizers, both the ``tokenizers`` file this version writes and the JSON
    that earlier versions wrote (``{"kind": "char", "chars": [...]}``). A shard set prepared with
    ``tokenizer=file:`` of an older one, in either version, is then still the same tokenizer to the
    resume and mixture checks, which compare these digests."""
    import hashlib
    import tempfile

    path = directory / TOKENIZER_FILE
    digests = {hashlib.sha256(path.read_bytes()).hexdigest()}
    tokenizer = load_tokenizer(directory)
    legacy = None
    if isinstance(tokenizer, CharTokenizer):
        legacy = json.dumps({"kind": "char", "chars": tokenizer.chars}, ensure_ascii=False)
    elif isinstance(tokenizer, ByteTokenizer):
        legacy = json.dumps({"kind": "byte"})
    if legacy is not None:
        digests.add(hashlib.sha256(legacy.encode("utf-8")).hexdigest())
        with tempfile.TemporaryDirectory() as tmp:
            tokenizer.save(Path(tmp))
            digests.add(hashlib.sha256((Path(tmp) / TOKENIZER_FILE).read_bytes()).hexdigest())
    return sorted(digests)
