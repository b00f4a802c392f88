"""megatron-core's fusions compiled at their first call, not at import: start-up without ``torch._dynamo``.

``megatron.core.jit`` sets ``jit_fuser = torch.compile`` and some 40 fused functions are decorated with it
while ``import megatron.core`` runs; decorating imports ``torch._dynamo`` (and inductor, sympy, networkx),
about half of megatron's import time, in every process, although a CPU run never calls those functions and
``torch.compile`` itself only compiles at the first call. :func:`install` (run by ``import parallel``, before
anything of ours imports megatron) adds an import hook that, right after ``megatron.core.jit`` executes,
replaces its ``jit_fuser`` with :func:`deferred_compile`: the same ``torch.compile`` of the same function,
made at the first call instead. The stdlib ``importlib.util.LazyLoader`` cannot do this (megatron reads the
attribute at import), hence the hook. The hook imports nothing until megatron is imported.
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.machinery
import sys
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any

TARGET = "megatron.core.jit"


def deferred_compile(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``torch.compile(fn)``, built at the first call (megatron uses ``@jit_fuser`` bare, with no options)."""
    compiled: Callable[..., Any] | None = None

    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        nonlocal compiled
        if compiled is None:
            import torch

            compiled = torch.compile(fn)
        return compiled(*args, **kwargs)

    call.deferred_compile = True  # type: ignore[attr-defined]
    return call


class _Loader(importlib.abc.Loader):
    def __init__(self, loader: importlib.abc.Loader):
        self.loader = loader

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self.loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self.loader.exec_module(module)
        import torch

        if getattr(module, "jit_fuser", None) is torch.compile:  # megatron's default; a disabled fuser stays
            module.jit_fuser = deferred_compile


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(
        self, name: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if name != TARGET:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _Loader(spec.loader)
        return spec


def install() -> None:
    """Add the hook once; a no-op when megatron was imported before (its fusions are decorated already)."""
    if TARGET in sys.modules or any(isinstance(f, _Finder) for f in sys.meta_path):
        return
    sys.meta_path.insert(0, _Finder())
