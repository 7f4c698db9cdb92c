"""Choose whose code the runtime runs: the student's ``exercises`` or the ``solutions``.

The choice comes from the ``SERVINGLAB_IMPL`` environment variable (``exercises`` by
default, so a student's engine runs the student's code) or from :func:`set_impl`, which
the test suite calls for ``pytest --impl``. Every part is imported by name, for example
``load_part("block_manager")``, so the runtime never reaches into private names.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import os
from collections.abc import Iterator
from contextlib import contextmanager
from types import ModuleType

IMPLS: tuple[str, ...] = ("exercises", "solutions")
# Part number -> its name in the grade table; PART_MODULES lists every module a part
# is made of (the graded fixtures and ``load_part`` accept exactly these).
PARTS: dict[int, str] = {
    1: "kv_cache",
    2: "block_manager",
    3: "paged_attention",
    4: "scheduler",
    5: "speculative",
    6: "serving",
    7: "load_balancer+monitoring",
    8: "quantization",
    9: "tensor_parallel",
}
PART_MODULES: dict[int, tuple[str, ...]] = {
    1: ("kv_cache", "model_shape"),
    2: ("block_manager", "block_pool", "block_prefix_cache", "block_swap"),
    3: ("paged_attention", "paged_attention_triton"),
    4: ("scheduler", "admission", "preemption"),
    5: ("speculative", "ngram_proposer", "speculative_math"),
    6: ("serving", "serving_stats"),
    7: ("load_balancer", "prefix_tree", "monitoring"),
    8: ("quantization", "quant_gemm_triton", "gptq"),
    9: ("tensor_parallel", "tp_collectives", "pipeline_parallel"),
}
MODULES: tuple[str, ...] = tuple(m for mods in PART_MODULES.values() for m in mods)
ENV_VAR = "SERVINGLAB_IMPL"

_override: str | None = None


def _check(name: str) -> str:
    if name not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {name!r} (from --impl or ${ENV_VAR})")
    return name


def current_impl() -> str:
    """Return the package the runtime loads parts from: ``exercises`` or ``solutions``."""
    if _override is not None:
        return _override
    return _check(os.environ.get(ENV_VAR, "exercises"))


def set_impl(name: str | None) -> None:
    """Override the implementation for this process (``None`` goes back to the env var)."""
    global _override
    _override = None if name is None else _check(name)


def load_part(part: str, impl: str | None = None) -> ModuleType:
    """Import and return ``<impl>.<part>``, e.g. ``load_part("kv_cache")``."""
    if part not in MODULES:
        raise ValueError(f"part must be one of {sorted(MODULES)}, got {part!r}")
    package = _check(impl) if impl is not None else current_impl()
    return importlib.import_module(f"{package}.{part}")


@contextmanager
def use_impl(name: str) -> Iterator[None]:
    """Run a block with ``name``'s parts (tests of the runtime use the reference); restore after."""
    previous = _override
    set_impl(name)
    try:
        yield
    finally:
        set_impl(previous)


def _is_stub(node: ast.FunctionDef | ast.AsyncFunctionDef) -> bool:
    """A function whose own body (not a branch inside it) raises ``NotImplementedError``: a stub.

    The generated stubs keep the lines before the solution region (argument checks) and
    end in ``raise NotImplementedError("<name>: your code here")``.
    """
    for stmt in node.body:
        if isinstance(stmt, ast.Raise) and stmt.exc is not None:
            exc = stmt.exc.func if isinstance(stmt.exc, ast.Call) else stmt.exc
            if isinstance(exc, ast.Name) and exc.id == "NotImplementedError":
                return True
    return False


def stubs_left(part: int, impl: str | None = None) -> list[str]:
    """The functions of Part ``part`` that are still stubs in ``impl`` (default: the current one).

    Read from the source files without importing them, e.g. ``["Scheduler.schedule"]``;
    an empty list means the part has no stub left (its tests decide whether it is right).
    """
    if part not in PART_MODULES:
        raise ValueError(f"part must be one of {sorted(PART_MODULES)}, got {part!r}")
    package = _check(impl) if impl is not None else current_impl()
    left: list[str] = []
    for module in PART_MODULES[part]:
        spec = importlib.util.find_spec(f"{package}.{module}")
        if spec is None or spec.origin is None:
            raise ModuleNotFoundError(f"{package}.{module} (Part {part}) cannot be found")
        tree = ast.parse(open(spec.origin, encoding="utf-8").read())
        for node in tree.body:
            funcs = [(node.name, node)] if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) else []
            if isinstance(node, ast.ClassDef):
                funcs = [(f"{node.name}.{f.name}", f) for f in node.body if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))]
            left += [name for name, f in funcs if _is_stub(f)]
    return left
