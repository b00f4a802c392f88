"""``gpt-import``: a local transformers GPT-2, Llama, Qwen3, Qwen3-MoE or Mixtral directory → a run dir.

Why a run dir and not just weights: everything downstream (``gpt-pretrain`` continuing from the
weights, ``gpt-finetune init.checkpoint=``, ``gpt-eval``, ``gpt-generate``, ``gpt-export``) reads
run dirs, so an imported model is one ``checkpoints/step_0`` written by the same
:class:`~parallel.checkpoint.CheckpointDir` as a training run (checksums, atomic rename, ``latest``),
marked ``weights_only`` (no optimizer or data state: a run starts from it with fresh ones), with the
model's ``tokenizer.json`` inside, ``config.yaml``, and ``conf/model/<name>.yaml``, a model preset for
``gpt-pretrain --config-dir RUN_DIR/conf model=<name>``.

The weights are read tensor by tensor with ``safetensors`` (single file or sharded with an index):
no transformers model is built, so memory holds our model plus one layer. The model is built at
tp = pp = 1 in this process and saved with megatron-core ``dist_checkpointing``, so it loads and
reshards at any layout. The padded vocabulary equals the source's ``vocab_size`` exactly
(``model.vocab_multiple`` is chosen for it), so the logits are the source model's.

Everything a user can get wrong (no config.json, another architecture, scaled RoPE, sliding
windows, no tokenizer.json, a non-empty ``out``, a truncated or malformed weight file or shard, a
missing, extra, quantized or misshapen tensor) is one line before torch is imported.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import sys
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from conf.errors import UserError
from data.output_dir import check_output_dir, owned_output
from data.tokenizer import TOKENIZER_FILE, Tokenizer, load_tokenizer

COMMAND = "gpt-import"
MAX_ROPE_CONTEXT = 4096  # a rotary model's default model.seq_len: Llama 3's 131072 would be a huge first run
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


def read_source(source: Path) -> tuple[dict[str, Any], list[Path]]:
    """config.json and the weight files of a transformers model dir (with a tokenizer.json), or one line why not."""
    if not source.is_dir():
        raise UserError(f"source={source}: not a directory (a local transformers model dir)")
    try:
        hf = json.loads((source / "config.json").read_text())
    except FileNotFoundError:
        raise UserError(f"source={source}: no config.json (not a transformers model dir)") from None
    except ValueError as exc:
        raise UserError(f"{source / 'config.json'}: not JSON ({exc})") from exc
    files = weight_files(source)
    if not (source / TOKENIZER_FILE).is_file():
        raise UserError(
            f"source={source}: no {TOKENIZER_FILE} (a fast tokenizer's file; save one with "
            "AutoTokenizer.from_pretrained(...).save_pretrained(dir))"
        )
    return hf, files


def vocab_multiple(hf_vocab: int, tokenizer_vocab: int) -> int:
    """``model.vocab_multiple`` whose padding of the tokenizer's vocabulary is exactly ``hf_vocab``:
    the largest power of two up to 128 that divides it (padding rows must stay the source's)."""
    if tokenizer_vocab > hf_vocab:
        raise UserError(f"{TOKENIZER_FILE} has {tokenizer_vocab} tokens, the model's embedding only {hf_vocab}")
    for multiple in (128, 64, 32, 16, 8, 4, 2, 1):
        if hf_vocab % multiple == 0 and hf_vocab - tokenizer_vocab < multiple:
            return multiple
    return next(d for d in range(hf_vocab - tokenizer_vocab + 1, hf_vocab + 1) if hf_vocab % d == 0)


def choose_seq_len(overrides: dict[str, Any], requested: int | None) -> int:
    """The context: the source's (learned positions: at most it; rotary: capped at MAX_ROPE_CONTEXT)."""
    limit = int(overrides["seq_len"])
    if requested is not None:
        if requested < 1 or (overrides["position"] == "learned" and requested > limit):
            raise UserError(f"seq_len={requested}: must be in [1, {limit}] (the model's n_positions)")
        return requested
    if overrides["position"] == "rope" and limit > MAX_ROPE_CONTEXT:
        print(f"note: model.seq_len={MAX_ROPE_CONTEXT} (max_position_embeddings={limit}; pass seq_len=N for more)")
        return MAX_ROPE_CONTEXT
    return limit


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


class ModelWriter:
    """The one method :meth:`CheckpointDir.save` needs of an engine: the model's sharded weights
    under ``"model"``, exactly what ``load_model`` and gpt-finetune read."""

    def __init__(self, model: Any) -> None:  # noqa: ANN401
        self.model = model

    def save(self, directory: Path, state_dict: dict[str, Any], async_save: bool = False) -> None:
        from megatron.core import dist_checkpointing

        dist_checkpointing.save({"model": self.model.sharded_state_dict()}, str(directory))


def preset_yaml(model: dict[str, Any], source: Path, arch: str) -> str:
    body = OmegaConf.to_yaml(OmegaConf.create({"model": model}))
    return f"# @package _global_\n# gpt-import of {source} (transformers {arch})\n{body}"


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


def import_model(
    source: str | Path,
    out: str | Path,
    overwrite: bool = False,
    seq_len: int | None = None,
    name: str | None = None,
    approximate_gelu: bool = False,
) -> Path:
    """Write the run dir ``out`` from the transformers model dir ``source``; returns ``out``."""
    from pretrain.interop.hf_weights import CLASSES, architecture_of, model_overrides

    source, out = Path(source).expanduser(), Path(out).expanduser()
    check_output_dir(out, COMMAND, overwrite, inputs=[source])
    hf, files = read_source(source)
    try:
        overrides, hf_vocab = model_overrides(hf, approximate_gelu), int(hf["vocab_size"])
    except (KeyError, TypeError, ValueError) as exc:  # a key the architecture must have, missing or not a number
        kind = hf.get("model_type")
        raise UserError(f"{source / 'config.json'}: {exc} missing or malformed for model_type={kind}") from None
    arch = architecture_of(overrides)
    check_weights(source, files, overrides, hf_vocab)
    tokenizer = load_tokenizer(source)  # a foreign tokenizer without an end-of-text token is refused
    multiple = vocab_multiple(hf_vocab, tokenizer.vocab_size)
    context = choose_seq_len(overrides, seq_len)
    name = name or f"imported-{arch}"
    model_keys = {"name": name, **overrides, "seq_len": context, "vocab_multiple": multiple, "dropout": 0.0}
    if multiple < 8:
        print(f"note: vocab_size {hf_vocab} needs model.vocab_multiple={multiple}: parallel.tp must divide {multiple}")

    with owned_output(out, COMMAND, overwrite, inputs=[source]) as tmp:
        preset = tmp / "conf" / "model" / f"{name}.yaml"
        preset.parent.mkdir(parents=True)
        preset.write_text(preset_yaml(model_keys, source, arch))
        cfg = compose_config(tmp / "conf", name, out.resolve())
        dtype = _write_run_dir(tmp, cfg, files, overrides, context, tokenizer, source, hf_vocab, arch)
    print(f"imported {CLASSES[arch]} from {source} ({dtype} weights, stored as fp32) into {out}/checkpoints/step_0")
    print_next_steps(out, name, source)
    return out


def compose_config(conf_dir: Path, name: str, run_dir: Path) -> DictConfig:
    """gpt-pretrain's default config with the new preset, as ``--config-dir conf_dir model=name`` gives it."""
    import copy

    from hydra.core.global_hydra import GlobalHydra

    from conf.cli import compose
    from conf.schema import validate

    GlobalHydra.instance().clear()  # gpt-import's own Hydra app is running: compose needs a fresh one
    cfg = compose([f"model={name}", f"run.dir={run_dir}", f"hydra.searchpath=[file://{conf_dir.resolve()}]"])
    probe = copy.deepcopy(cfg)
    probe.data.dir = "unused"  # the data comes when pretraining continues
    validate(probe)  # e.g. num_heads not divisible by num_query_groups: one line, nothing written
    return cfg


def _write_run_dir(
    tmp: Path,
    cfg: DictConfig,
    files: list[Path],
    overrides: dict[str, Any],
    context: int,
    tokenizer: Tokenizer,
    source: Path,
    hf_vocab: int,
    arch: str,
) -> str:
    """step_0 (through CheckpointDir, weights only) and config.yaml into ``tmp``; the source's dtype."""
    from parallel import cpu_compat
    from parallel.checkpoint import CheckpointDir
    from parallel.topology import Topology
    from parallel.train_state import TrainState
    from pretrain.model import build_gpt, transformer_config

    cpu_compat.apply()
    Topology.from_config(cfg, world_size=1, rank=0).init(int(cfg.train.seed))
    # no random initialisation: every parameter is assigned below
    config = transformer_config(cfg.model, perform_initialization=False)
    model = build_gpt(cfg.model, tokenizer.vocab_size, config, seed=int(cfg.train.seed))
    rows = model.embedding.word_embeddings.weight.shape[0]
    if rows != hf_vocab:
        raise RuntimeError(f"padded vocabulary {rows} is not the source's {hf_vocab}")
    dtype = load_weights(model, files, overrides, context)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    # re-serialised by `tokenizers`, as gpt-prepare tokenizer=file:... writes it: the same bytes, so the
    # resume guard (tokenizer hash) accepts shards prepared with it and refuses any other tokenizer
    staged = tmp / ".tokenizer"
    staged.mkdir()
    tokenizer.save(staged)
    identity = {
        "tokenizer": tokenizer.kind,
        "vocab_size": tokenizer.vocab_size,
        "tokenizer_sha256": hashlib.sha256((staged / TOKENIZER_FILE).read_bytes()).hexdigest(),
    }
    state = TrainState(
        step=0,
        config=resolved,
        vocab_size=tokenizer.vocab_size,
        engine="megatron",
        layout={"tp": 1, "pp": 1, "dp": 1, "vpp": 1},
        data_identity=identity,
        converted_from=f"transformers:{arch}",
        weights_only=True,
    )
    ckpts = CheckpointDir(tmp)
    ckpts.save(0, ModelWriter(model), state, files=(staged / TOKENIZER_FILE,))
    ckpts.finalize(blocking=True)
    shutil.rmtree(staged)
    OmegaConf.save(cfg, tmp / "config.yaml", resolve=True)
    return dtype


def print_next_steps(out: Path, name: str, source: Path) -> None:
    print(
        "next:\n"
        f"  gpt-prepare input=TEXT out=DATA tokenizer=file:{source} seq_len=N\n"
        f"  gpt-pretrain --config-dir {out}/conf model={name} run.dir={out} data.dir=DATA\n"
        f"  gpt-finetune init.checkpoint={out} task.train=TRAIN.jsonl task.validation=VAL.jsonl run.dir=RUN\n"
        f"  gpt-eval checkpoint={out} run.dir=EVAL_RUN eval.perplexity.path=TEXT\n"
        f"  gpt-generate checkpoint={out} prompt=TEXT",
        flush=True,
    )


@hydra.main(version_base=None, config_path="../conf", config_name="import")
def _hydra_main(cfg: DictConfig) -> None:
    from conf.cli import exit_on_user_error

    with exit_on_user_error():
        seq_len = cfg.seq_len
        if seq_len is not None and (isinstance(seq_len, bool) or not isinstance(seq_len, int)):
            raise UserError(f"seq_len={seq_len}: must be an integer (or null: the model's)")
        import_model(
            str(cfg.source),
            str(cfg.out),
            bool(cfg.overwrite),
            seq_len,
            str(cfg.name) if cfg.name else None,
            bool(cfg.approximate_gelu),
        )


def main() -> None:
    from conf.cli import answer_help, quiet_third_party
    from pretrain.export import refuse_unknown_keys

    answer_help(sys.argv[1:], "import", groups=())
    refuse_unknown_keys(sys.argv[1:], "import")
    quiet_third_party()
    _hydra_main()


if __name__ == "__main__":
    main()
