"""A transformers model dir's safetensors weights, read for gpt-import (``pretrain/hf_import.py``).

Why checked by hand before torch: safetensors' own errors come late (when a tensor is read, after a
model is built) and as tracebacks. The headers are JSON: every tensor the mapping needs
(``pretrain/interop/hf_weights.py``) is checked there, present, floating point, of the shape
config.json implies, and every file is checked to hold the bytes its header promises (a truncated
download, a malformed shard, an index naming the wrong shard), each one line naming the file and
tensor. Then :class:`SafetensorsWeights` reads one tensor at a time (single file or shards with
``model.safetensors.index.json``): memory holds the model plus one tensor.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from conf.errors import UserError

INDEX = "model.safetensors.index.json"
MAX_HEADER = 100_000_000  # bytes: safetensors' own limit on a header
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
FLOAT_DTYPES = ("F32", "F16", "BF16", "F64")  # what a model of ours can copy (it stores fp32)


def index_map(source: Path) -> dict[str, str]:
    """``weight_map`` of ``model.safetensors.index.json`` (tensor -> shard file name), or one line why not."""
    try:
        weight_map = json.loads((source / INDEX).read_text())["weight_map"]
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
            raise TypeError("weight_map must map tensor names to file names")
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise UserError(f"{source / INDEX}: not a safetensors index ({exc})") from exc
    return weight_map


def weight_files(source: Path) -> list[Path]:
    """``model.safetensors``, or the shards ``model.safetensors.index.json`` lists (each checked)."""
    if (source / "model.safetensors").is_file():
        return [source / "model.safetensors"]
    if (source / INDEX).is_file():
        names = sorted(set(index_map(source).values()))
        if not names:
            raise UserError(f"{source / INDEX}: its weight_map lists no tensors")
        missing = [n for n in names if not (source / n).is_file()]
        if missing:
            raise UserError(f"source={source}: {missing[0]} is listed in {INDEX} but missing")
        return [source / n for n in names]
    other = sorted(p.name for p in source.glob("*.bin")) or sorted(p.name for p in source.glob("*.pt*"))
    hint = f" (found {other[0]}: re-save it with save_pretrained(safe_serialization=True))" if other else ""
    raise UserError(f"source={source}: no model.safetensors or {INDEX}{hint}")


def read_header(path: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """name -> (dtype, shape) of a safetensors file, read from its header (no torch), the file checked
    to hold every byte the header promises: a truncated or malformed file is one line naming it
    before anything is built or written (safetensors' own error would be a traceback, later)."""
    size = path.stat().st_size
    with path.open("rb") as f:
        length = int.from_bytes(f.read(8), "little")
        if size < 8 or length > min(size - 8, MAX_HEADER):
            raise UserError(f"{path}: truncated or not a safetensors file ({size} bytes; its header length {length})")
        try:
            header = json.loads(f.read(length))
            entries = {k: v for k, v in header.items() if k != "__metadata__"}
            found = {k: (str(v["dtype"]), tuple(int(d) for d in v["shape"])) for k, v in entries.items()}
            spans = {k: (int(v["data_offsets"][0]), int(v["data_offsets"][1])) for k, v in entries.items()}
        except (ValueError, KeyError, TypeError, AttributeError, IndexError) as exc:
            raise UserError(f"{path}: malformed safetensors header ({type(exc).__name__}: {exc})") from None
    data, at = size - 8 - length, 0
    for name, (begin, end) in sorted(spans.items(), key=lambda item: item[1]):  # back to back, as safetensors
        dtype, shape = found[name]
        if end > data:
            raise UserError(f"{path}: truncated: tensor {name} ends at byte {end} of the data, the file has {data}")
        fits = dtype not in DTYPE_BYTES or end - begin == DTYPE_BYTES[dtype] * math.prod(shape)
        if begin != at or end < begin or not fits:
            raise UserError(f"{path}: malformed: tensor {name} {dtype}{list(shape)} spans bytes [{begin}, {end})")
        at = end
    if at != data:
        raise UserError(f"{path}: malformed: {data} bytes of data, its tensors end at byte {at}")
    return found


def read_headers(source: Path, files: list[Path]) -> dict[str, tuple[str, tuple[int, ...], Path]]:
    """name -> (dtype, shape, file) over every weight file, checked against the index when sharded."""
    found: dict[str, tuple[str, tuple[int, ...], Path]] = {}
    for path in files:
        for name, (dtype, shape) in read_header(path).items():
            if name in found:
                raise UserError(f"{name}: in both {found[name][2].name} and {path.name}; refusing to import")
            found[name] = (dtype, shape, path)
    if files != [source / "model.safetensors"]:  # sharded: each tensor where the index says
        for name, shard in index_map(source).items():
            if name not in found or found[name][2].name != shard:
                where = f"in {found[name][2].name}" if name in found else "in none of the files it lists"
                raise UserError(f"{source / INDEX}: lists {name} in {shard}, it is {where}; refusing to import")
    return found


def check_weights(source: Path, files: list[Path], overrides: dict[str, Any], hf_vocab: int) -> None:
    """Every tensor the mapping reads is there, floating point and of the shape config.json implies,
    and no other (one line naming the tensor, its file and both shapes): checked on the headers, before
    torch is imported or a file written; a reshape of a wrong tensor would fail far from its cause."""
    from pretrain.interop.hf_weights import expected_shapes, refuse_unknown

    headers = read_headers(source, files)
    prefix = "transformer." if overrides["position"] == "learned" else "model."
    used: set[str] = set()
    for name, shape in expected_shapes(overrides, hf_vocab).items():
        key = next((k for k in (prefix + name, name) if k in headers), None)
        if key is None:
            shown = files[0].name if len(files) == 1 else f"{INDEX} and its shards"
            raise UserError(f"{prefix}{name}: missing from {source / shown}; refusing to import")
        dtype, found, path = headers[key]
        if found != shape:
            raise UserError(f"{path}: tensor {key} has shape {list(found)}, config.json implies {list(shape)}")
        if dtype not in FLOAT_DTYPES:
            raise UserError(
                f"{path}: tensor {key} has dtype {dtype}, expected one of {', '.join(FLOAT_DTYPES)} "
                "(quantized weights cannot be imported)"
            )
        used.add(key)
    refuse_unknown(headers, used, overrides)


class SafetensorsWeights:
    """A read-only mapping over safetensors files that loads each tensor when it is asked for."""

    def __init__(self, files: list[Path]) -> None:
        from safetensors import safe_open

        try:  # check_weights read the headers: what safetensors still refuses is one line too
            self._handles = [safe_open(str(f), framework="pt") for f in files]
        except Exception as exc:  # noqa: BLE001 - SafetensorError
            raise UserError(f"{files[0].parent}: unreadable safetensors file ({str(exc).splitlines()[0]})") from None
        self._where = {key: h for h in self._handles for key in h.keys()}  # noqa: SIM118 - not a dict

    def __getitem__(self, key: str) -> Any:  # noqa: ANN401
        return self._where[key].get_tensor(key)

    def __contains__(self, key: object) -> bool:
        return key in self._where

    def __iter__(self) -> Any:  # noqa: ANN401
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


def load_weights(model: Any, files: list[Path], overrides: dict[str, Any], seq_len: int) -> str:  # noqa: ANN401
    """Copy the mapped weights into ``model`` one tensor at a time (strict); the source's dtype."""
    import torch

    from pretrain.interop.hf_weights import iter_from_hf

    params = {k: v for k, v in model.state_dict(keep_vars=True).items() if not k.endswith("_extra_state")}
    assigned, dtypes = set(), set()
    with torch.no_grad():
        for name, tensor in iter_from_hf(SafetensorsWeights(files), overrides, seq_len):
            if tuple(tensor.shape) != tuple(params[name].shape):
                raise UserError(
                    f"{name}: shape {tuple(tensor.shape)} in the weights, config.json implies "
                    f"{tuple(params[name].shape)}; refusing to import"
                )
            params[name].copy_(tensor)
            assigned.add(name)
            dtypes.add(str(tensor.dtype).removeprefix("torch."))
    if assigned != set(params):
        raise RuntimeError(f"import mapping incomplete: {sorted(set(params) - assigned)} not assigned")
    return "/".join(sorted(dtypes))
