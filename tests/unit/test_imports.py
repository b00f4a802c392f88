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
COMMANDS = ("data.prepare", "pretrain.train", "pretrain.finetune", "pretrain.evaluate", "pretrain.generate",
            "pretrain.export", "pretrain.hf_import", "pretrain.plan")


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
