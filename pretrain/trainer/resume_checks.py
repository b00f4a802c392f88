"""What a resumed run checks and reports against the checkpoint it continues.

A resumed run does what its config says, or refuses in one line; it never silently does
something else:

- **refused**: another engine or ZeRO stage, another model shape, another tokenizer
  (its ``tokenizer.json`` hash), another shard set of the same tokenizer unless
  ``data.allow_new=true`` (continued pretraining: the loader then starts the new set's order);
- **applied and reported**: changed optimisation settings. The config in effect wins, as
  with megatron's ``--override-opt_param-scheduler``: the lr schedule is recomputed at the
  resumed step from the new values; each change is one console line and one
  ``{"event": "config_change"}`` line in ``metrics.jsonl``.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from conf.errors import UserError
from data.shards import MANIFEST, Manifest
from data.tokenizer import TOKENIZER_FILE, equivalent_digests
from parallel.capabilities import capabilities
from parallel.run_config import Run
from parallel.train_state import TrainState

# a model key and its value in a checkpoint written before the key existed
SHAPE_KEYS = {
    "num_layers": None,
    "num_heads": None,
    "hidden_size": None,
    "ffn_hidden_size": None,
    "seq_len": None,
    "vocab_multiple": None,
    "tie_embeddings": None,
    "position": "learned",
    "rope_theta": 10000.0,
    "norm": "layernorm",
    "mlp": "gelu",
    "num_query_groups": None,
    "qk_norm": False,
    "bias": True,
}
# applied at resume when changed (the rest of train.* either cannot change or does not matter)
SCHEDULE_KEYS = (
    "lr",
    "min_lr_ratio",
    "warmup_steps",
    "lr_decay_steps",
    "lr_schedule",
    "max_steps",
    "weight_decay",
    "grad_clip",
    "beta1",
    "beta2",
    "global_batch",
    "micro_batch",
    "spike_factor",
    "max_skipped",
)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def data_identity(manifest: Manifest) -> dict[str, Any]:
    """The tokenizer and shard set a checkpoint was trained on (recorded in its train state)."""
    return {
        "tokenizer": manifest.tokenizer,
        "vocab_size": manifest.vocab_size,
        "tokenizer_sha256": _sha256(manifest.directory / TOKENIZER_FILE),
        "tokenizer_digests": equivalent_digests(manifest.directory),  # the same tokenizer in any file format
        "data_sha256": _sha256(manifest.directory / MANIFEST),
        "data_dir": manifest.location or str(manifest.directory),  # a URL for a remote shard set
    }


def same_tokenizer(recorded: dict[str, Any], identity: dict[str, Any]) -> bool:
    """Whether a recorded data identity (a checkpoint's, or another source's) names the tokenizer of
    ``identity``: equal bytes, or files that encode alike (``equivalent_digests``)."""
    if "tokenizer_sha256" not in recorded:
        return True  # written before tokenizers were recorded
    ours = set(identity.get("tokenizer_digests") or [identity["tokenizer_sha256"]])
    theirs = set(recorded.get("tokenizer_digests") or [recorded["tokenizer_sha256"]])
    return bool(ours & theirs)


def _saved_shape(recorded: dict[str, Any], key: str) -> Any:
    """A shape key as a checkpoint recorded it (its historical value when it predates the key)."""
    value = recorded.get(key, SHAPE_KEYS[key])
    return (value or recorded.get("num_heads")) if key == "num_query_groups" else value


def _shape(model: Any, key: str) -> Any:
    value = getattr(model, key)
    return (value or model.num_heads) if key == "num_query_groups" else value


def check_resume(config: Run, state: TrainState, step_dir: Path) -> None:
    """Refuse a checkpoint of another engine, ZeRO stage or model shape (any task)."""
    engine = state.engine
    run = config.run.dir
    if state.weights_only:
        engine = config.parallel.engine  # weights only: any engine and stage starts from them
    if engine != config.parallel.engine:
        raise UserError(
            f"run.dir={run} holds a parallel.engine={engine} checkpoint ({step_dir.name}); resume it with "
            f"parallel.engine={engine}, or start a new run.dir (gpt-finetune/gpt-eval load either engine's checkpoints)"
        )
    saved_stage = state.config.get("parallel", {}).get("zero_stage", 0)
    if capabilities(engine).zero and not state.weights_only and int(saved_stage) != config.parallel.zero_stage:
        raise UserError(
            f"run.dir={run} holds a parallel.zero_stage={saved_stage} checkpoint; resume it with that stage "
            "(the dp size may change)"
        )
    saved = state.model
    diff = [k for k in SHAPE_KEYS if _saved_shape(saved, k) != _shape(config.model, k)]
    if diff:
        saved_shape = ", ".join(f"{k}={_saved_shape(saved, k)}" for k in diff)
        raise UserError(f"run.dir={run} holds a checkpoint of another model ({saved_shape}); use a new run.dir")


def check_data(config: Run, state: TrainState, identity: dict[str, Any]) -> bool:
    """Refuse a checkpoint trained with another tokenizer, or on another shard set unless
    ``data.allow_new``; returns whether the loader state is to be restored."""
    run = config.run.dir
    old = state.data_identity or {}
    old_vocab = old.get("vocab_size", state.vocab_size)
    other_tokenizer = not same_tokenizer(old, identity)
    if other_tokenizer or (old_vocab is not None and int(old_vocab) != identity["vocab_size"]):
        raise UserError(
            f"run.dir={run} was trained with another tokenizer ({old.get('tokenizer', '?')}, vocab {old_vocab}, "
            f"data.dir={old.get('data_dir', '?')}) than data.dir={identity['data_dir']} "
            f"({identity['tokenizer']}, vocab {identity['vocab_size']}); use a new run.dir"
        )
    if old.get("data_sha256", identity["data_sha256"]) != identity["data_sha256"]:
        if not config.data.allow_new:
            raise UserError(
                f"data.dir={identity['data_dir']} is another shard set than the one run.dir={run} was trained on "
                f"({old.get('data_dir')}); pass data.allow_new=true to continue pretraining on it"
            )
        return False
    return True


def config_changes(config: Run, state: TrainState) -> list[dict[str, Any]]:
    """``config_change`` events for the optimisation settings that differ from the checkpoint's run."""
    saved = state.config.get("train", {})
    now = config.to_dict()["train"]
    events = []
    for key in SCHEDULE_KEYS:
        if key in saved and key in now and saved[key] != now[key]:
            events.append({"event": "config_change", "key": f"train.{key}", "old": saved[key], "new": now[key]})
    return events
