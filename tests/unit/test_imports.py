"""The house rule: imports run one way (conf → data → parallel → pretrain), and commands start fast."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
# a package may import from itself and from the packages listed for it, nothing else of ours
ALLOWED = {
    "conf": {"conf"},
    "data": {"conf", "data"},
    "parallel": {"conf", "data", "parallel"},
    "pretrain": {"conf", "data", "parallel", "pretrain"},
}
COMMANDS = (
    "data.prepare",
    "pretrain.train",
    "pretrain.finetune",
    "pretrain.evaluate",
    "pretrain.generate",
    "pretrain.export",
    "pretrain.hf_import",
    "pretrain.plan",
    "pretrain.goodput",
)


def imported_packages(path: Path) -> set[tuple[str, int]]:
    """(top-level package, line) of every import in the module, at any depth (lazy imports too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {(alias.name.split(".")[0], node.lineno) for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add((node.module.split(".")[0], node.lineno))
    return found


def test_imports_only_run_downward() -> None:
    ours = set(ALLOWED) | {"launch", "benchmarks", "tests"}
    wrong = []
    for package, allowed in ALLOWED.items():
        for path in sorted((REPO / package).rglob("*.py")):
            for name, line in imported_packages(path):
                if name in ours and name not in allowed:
                    wrong.append(f"{path.relative_to(REPO)}:{line} imports {name}")
    assert not wrong, "\n".join(wrong)


def test_the_walker_sees_lazy_imports(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from pretrain.model import build_gpt\n    import parallel.engine\n")
    assert {name for name, _ in imported_packages(module)} == {"pretrain", "parallel"}


@pytest.mark.parametrize("module", COMMANDS)
def test_commands_import_no_heavy_library_before_a_run(module: str) -> None:
    """``--help`` and config errors must not pay for torch / megatron-core / DeepSpeed."""
    code = f"import sys, {module}; print(sorted(m for m in ('torch', 'megatron', 'deepspeed') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", f"{module} imports {out.strip()}"


def test_the_model_imports_without_torch_dynamo() -> None:
    """megatron's ``@jit_fuser`` decorations wait for a first call (parallel/lazy_fusions.py): a process
    building a GPT does not import ``torch._dynamo`` (seconds) unless something is compiled."""
    code = (
        "import sys, pretrain.model.gpt\n"
        "from megatron.core.fusions.fused_bias_gelu import bias_gelu\n"
        "print('torch._dynamo' in sys.modules, getattr(bias_gelu, 'deferred_compile', False))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["False", "True"]


def test_a_deferred_fusion_is_torch_compile_of_the_function_at_its_first_call(monkeypatch) -> None:  # noqa: ANN001
    import torch

    from parallel.lazy_fusions import deferred_compile

    compiled: list = []
    monkeypatch.setattr(torch, "compile", lambda fn: compiled.append(fn) or (lambda *a: ("compiled", fn(*a))))

    def double(x: int) -> int:
        return 2 * x

    fused = deferred_compile(double)
    assert compiled == [] and fused.__name__ == "double"
    assert fused(3) == ("compiled", 6) and fused(4) == ("compiled", 8)
    assert compiled == [double]  # compiled once, at the first call


def module_graph() -> dict[str, set[str]]:
    """Our modules and the modules of ours each imports, at any depth (function-level imports too: a
    cycle hidden in a function is still a cycle). ``from pkg import name`` counts ``pkg.name`` when
    that is a module, else ``pkg``."""
    modules = {}
    for package in ALLOWED:
        for path in (REPO / package).rglob("*.py"):
            parts = path.relative_to(REPO).with_suffix("").parts
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                targets = [
                    f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                    for a in node.names
                ]
            edges |= {t for t in targets if t in modules and t != name}
        graph[name] = edges
    return graph


def test_no_import_cycles() -> None:
    """No two modules import each other, directly or through others (a package's ``__init__`` that
    re-exports its own modules is the one exception: it is not a cycle of behaviour)."""
    graph = module_graph()
    for name, edges in graph.items():  # a package's __init__ importing its children is not a cycle
        graph[name] = {e for e in edges if not e.startswith(f"{name}.")}
    cycles, state = [], dict.fromkeys(graph, 0)

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state[nxt] == 1:
                cycles.append(" -> ".join([*path[path.index(nxt) :], nxt]))
            elif state[nxt] == 0:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for node in sorted(graph):
        if state[node] == 0:
            visit(node, [node])
    assert not cycles, "\n".join(cycles)


def test_engine_differences_live_in_the_capabilities_table() -> None:
    """No ``engine == "deepspeed"``: what an engine supports is a row of ``parallel/capabilities.py``.
    The engine registry and the DeepSpeed checkpoint converter name engines as formats, not features."""
    import re

    compared = re.compile(r"""engine\S*\s*(==|!=)\s*["'](megatron|deepspeed)["']""")
    exempt = {"parallel/capabilities.py", "parallel/engine.py", "pretrain/interop/deepspeed_convert.py"}
    found = [
        f"{path.relative_to(REPO)}:{number}: {line.strip()}"
        for package in ALLOWED
        for path in sorted((REPO / package).rglob("*.py"))
        if path.relative_to(REPO).as_posix() not in exempt
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if compared.search(line)
    ]
    assert not found, "\n".join(found)


HELP = {  # module, its config, the groups it selects presets of (conf/cli.py groups_of), a key of its own
    "data.prepare": ("prepare", ("executor",), "tokenizer:"),
    "pretrain.train": ("config", None, "max_steps:"),
    "pretrain.finetune": ("finetune", None, "aux_lm_weight:"),
    "pretrain.evaluate": ("eval", (), "num_fewshot:"),
    "pretrain.generate": ("generate", (), "max_new_tokens:"),
    "pretrain.export": ("export", (), "overwrite:"),
    "pretrain.hf_import": ("import", (), "source:"),
    "pretrain.plan": ("plan", None, "search:"),
}


@pytest.mark.parametrize("module", HELP)
def test_help_lists_only_the_commands_own_groups_and_keys(module: str) -> None:
    from conf.cli import CONF_DIR, groups_of

    config_name, groups, key = HELP[module]
    done = subprocess.run([sys.executable, "-m", module, "--help"], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr[-2000:]
    head, _, config = done.stdout.partition("== Config ==")
    _, has_groups, section = head.partition("== Configuration groups ==")
    listed = [line.split(":")[0] for line in section.splitlines() if ": " in line] if has_groups else []
    own = groups_of(config_name) if groups is None else groups
    assert listed == list(own)
    assert "schema" not in listed  # Hydra's help listed the typed schemas and every other command's groups
    assert any(line.startswith(key) or line.strip().startswith(key) for line in config.splitlines()), config
    known = {p.name for p in CONF_DIR.iterdir() if p.is_dir()}
    assert set(listed) <= known


def test_pretrain_top_level_holds_only_the_commands() -> None:
    """Rooms named by their job: ``pretrain/*.py`` are the console scripts; everything else lives in a
    room (model, tasks, trainer, eval, interop) whose name says what it does."""
    top = {p.stem for p in (REPO / "pretrain").glob("*.py")} - {"__init__"}
    commands = {m.split(".")[1] for m in COMMANDS if m.startswith("pretrain.")} | {"lm_eval_cli"}
    assert top == commands, sorted(top ^ commands)
    rooms = {p.name for p in (REPO / "pretrain").iterdir() if (p / "__init__.py").exists()}
    assert rooms == {"model", "tasks", "trainer", "eval", "interop"}, rooms


RUNTIME = ("pretrain/trainer", "pretrain/tasks", "pretrain/model", "pretrain/eval", "pretrain/interop", "parallel")
# the two places that take a composed config and validate it (the Run is built there)
DOORS = {"pretrain/trainer/process.py", "pretrain/trainer/preflight.py"}
CONFIG_NAMES = {"cfg", "config", "par", "train", "model", "data", "ev", "hw", "logging", "finetune", "parallel"}


def _chain(node: ast.AST) -> list[str]:
    """``self.config.train`` -> ['self', 'config', 'train']."""
    names: list[str] = []
    while isinstance(node, ast.Attribute):
        names.insert(0, node.attr)
        node = node.value
    return [node.id, *names] if isinstance(node, ast.Name) else names


def test_nothing_after_validation_reads_a_raw_config_or_repeats_a_default() -> None:
    """The Run is the config after the door: no ``DictConfig`` in the runtime modules, and no
    ``cfg.train.get(key, default)`` (a default repeated beside the dataclass's)."""
    wrong = []
    for room in RUNTIME:
        for path in sorted((REPO / room).rglob("*.py")):
            rel = str(path.relative_to(REPO))
            text = path.read_text()
            if rel not in DOORS and ("DictConfig" in text.replace("``DictConfig``", "") or "open_dict" in text):
                wrong.append(f"{rel}: uses DictConfig / open_dict")
            for node in ast.walk(ast.parse(text)) if rel not in DOORS else ():
                if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get":
                    chain = _chain(node.func.value)
                    if chain and chain[0] in CONFIG_NAMES | {"self"} and set(chain) & CONFIG_NAMES:
                        wrong.append(f"{rel}:{node.lineno}: {'.'.join(chain)}.get(...)")
    assert not wrong, "\n".join(wrong)


def test_the_run_is_frozen() -> None:
    import dataclasses

    from conf.cli import compose
    from parallel.run_config import Run

    run = Run.from_config(compose(["data.dir=unused", "train.warmup_fraction=0.1", "train.max_steps=50"]), 1, 0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        run.train.lr = 1.0  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        run.micro_batches = 3  # type: ignore[misc]
    assert run.train.warmup_steps == 5 and run.micro_batches == 1 and run.distributed_optimizer is False
    assert run.to_dict()["train"]["warmup_steps"] == 5
