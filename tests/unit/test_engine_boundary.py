"""The engine boundary: both engines take the same arguments and offer what the Trainer uses;
``TrainState`` is the one, versioned schema of checkpoint metadata."""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import pytest

from conf.errors import UserError
from parallel.engine import Engine, engine_class
from parallel.train_state import TRAIN_STATE, VERSION, TrainState

PROTOCOL = ("train_step", "eval_step", "save", "load", "unwrapped_model")


@pytest.mark.parametrize("name", ["megatron", "deepspeed"])
def test_engines_share_the_constructor_and_implement_the_protocol(name: str) -> None:
    cls = engine_class(name)
    assert list(inspect.signature(cls.__init__).parameters) == ["self", "cfg", "topo", "spec"]
    for method in PROTOCOL:
        ours = inspect.signature(getattr(cls, method)).parameters
        declared = inspect.signature(getattr(Engine, method)).parameters
        assert list(ours) == list(declared), (name, method)


def test_the_trainer_uses_only_what_the_protocol_declares() -> None:
    """No ``engine.optimizer`` / ``.model`` / private reach-through from the loop or the tasks."""
    import ast

    root = Path(__file__).resolve().parents[2] / "pretrain"
    used = set()
    for path in [*(root / "trainer").glob("*.py"), *(root / "tasks").glob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "engine":
                used.add(node.attr)
    assert used <= set(PROTOCOL), used - set(PROTOCOL)


def test_train_state_round_trips_and_reads_older_versions(tmp_path: Path) -> None:
    state = TrainState(step=7, config={"model": {"num_layers": 2}}, vocab_size=67, layout={"tp": 2, "dp": 1})
    state.write(tmp_path)
    assert TrainState.read(tmp_path) == state and state.model == {"num_layers": 2}
    # version 1: a plain dict, fine-tuning's labels at the top level, keys since dropped
    old = {"step": 3, "config": {}, "vocab_size": 67, "engine": "deepspeed", "labels": ["a", "b"], "gone": 1}
    (tmp_path / TRAIN_STATE).write_text(json.dumps(old))
    read = TrainState.read(tmp_path)
    assert (read.step, read.engine, read.task, read.version) == (3, "deepspeed", {"labels": ["a", "b"]}, VERSION)
    (tmp_path / TRAIN_STATE).write_text(json.dumps({**old, "version": VERSION + 1}))
    with pytest.raises(UserError, match="needs a newer gpt-pretrain"):
        TrainState.read(tmp_path)
