"""``gpt-import``: a local transformers GPT-2, Llama, Qwen3, Qwen3-MoE or Mixtral directory → a run dir.

Why a run dir and not just weights: everything downstream (``gpt-pretrain`` continuing from the
weights, ``gpt-finetune init.checkpoint=``, ``gpt-eval``, ``gpt-generate``, ``gpt-export``) reads
run dirs, so an imported model is one ``checkpoints/step_0`` written by the same
:class:`~parallel.checkpoint.CheckpointDir` as a training run (checksums, atomic rename, ``latest``),
marked ``weights_only`` (no optimizer or data state: a run starts from it with fresh ones), with the
model's ``tokenizer.json`` inside, ``config.yaml``, and ``conf/model/<name>.yaml``, a model preset for
``gpt-pretrain --config-dir RUN_DIR/conf model=<name>``.

The weights are read tensor by tensor with ``safetensors`` (single file or sharded with an index;
``pretrain/interop/safetensors_source.py`` checks every header first):
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
import shutil
import sys
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from conf.errors import UserError
from conf.tool_schemas import ImportRoot, typed
from data.output_dir import check_output_dir, owned_output
from data.tokenizer import TOKENIZER_FILE, Tokenizer, load_tokenizer
from pretrain.interop.safetensors_source import check_weights, load_weights, weight_files

COMMAND = "gpt-import"
MAX_ROPE_CONTEXT = 4096  # a rotary model's default model.seq_len: Llama 3's 131072 would be a huge first run


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
        cfg, run = compose_config(tmp / "conf", name, out.resolve())
        dtype = _write_run_dir(tmp, cfg, run, files, overrides, context, tokenizer, source, hf_vocab, arch)
    print(f"imported {CLASSES[arch]} from {source} ({dtype} weights, stored as fp32) into {out}/checkpoints/step_0")
    print_next_steps(out, name, source)
    return out


def compose_config(conf_dir: Path, name: str, run_dir: Path) -> tuple[DictConfig, Any]:
    """gpt-pretrain's default config with the new preset, as ``--config-dir conf_dir model=name`` gives it
    (written as the run dir's config.yaml), and its validated Run (one process) to build the model from."""
    import copy

    from hydra.core.global_hydra import GlobalHydra

    from conf.cli import compose
    from parallel.run_config import Run

    GlobalHydra.instance().clear()  # gpt-import's own Hydra app is running: compose needs a fresh one
    cfg = compose([f"model={name}", f"run.dir={run_dir}", f"hydra.searchpath=[file://{conf_dir.resolve()}]"])
    probe = copy.deepcopy(cfg)
    probe.data.dir = "unused"  # the data comes when pretraining continues
    # e.g. num_heads not divisible by num_query_groups: one line, nothing written
    return cfg, Run.from_config(probe, world_size=1, rank=0)


def _write_run_dir(
    tmp: Path,
    cfg: DictConfig,
    run: Any,
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
    from parallel.train_state import TrainState
    from pretrain.model import build_gpt, transformer_config

    cpu_compat.apply()
    run.layout.init(run.train.seed)
    # no random initialisation: every parameter is assigned below
    config = transformer_config(run.model, perform_initialization=False)
    model = build_gpt(run.model, tokenizer.vocab_size, config, seed=run.train.seed)
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
        c = typed(cfg, ImportRoot)
        import_model(c.source, c.out, c.overwrite, c.seq_len, c.name, c.approximate_gelu)


def main() -> None:
    from conf.cli import check_command_line, quiet_third_party

    check_command_line(sys.argv[1:], "import")
    quiet_third_party()
    _hydra_main()


if __name__ == "__main__":
    main()
