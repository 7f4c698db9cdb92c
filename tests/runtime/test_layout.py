"""The runtime's rooms and the one direction their imports run (read with ``ast``, nothing imported).

    course  ->  bench  ->  serving  ->  engine  ->  model  ->  interfaces, sequence, impl

A module may import its own room and the rooms below it, never one above, and never a
private (``_name``) of another module. Every import counts as an edge: the lazy ones
inside functions, and the type-only ones under ``if TYPE_CHECKING:`` too (they never
run, but a type hint that names a module above is the same knot in the design: two
modules that need each other's names). The import graph must have no cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "servinglab"
# Higher ranks may import lower ones. The top level (cli, the lazy __init__) may import all.
RANKS = {"base": 0, "model": 1, "engine": 2, "serving": 3, "bench": 4, "course": 5, "top": 6}
BASE = {"interfaces", "sequence", "impl"}
MAX_LINES = 300


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def room_of(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1:
        return "top"
    if parts[1] in RANKS:
        return parts[1]
    return "base" if parts[1] in BASE else "top"


def imports_of(path: Path, source: str | None = None) -> list[tuple[str, list[str], int]]:
    """``(imported module, names, line)`` for every servinglab import, type-only ones included.

    ``source`` replaces the file's text (the self-test below checks a made-up module).
    """
    tree = ast.parse(source if source is not None else path.read_text(), filename=str(path))
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    found: list[tuple[str, list[str], int]] = []

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import):
                found.extend((a.name, [], child.lineno) for a in child.names if a.name.split(".")[0] == "servinglab")
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    anchor = package.split(".")[: len(package.split(".")) - child.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                if base.split(".")[0] == "servinglab":
                    names = [a.name for a in child.names]
                    # `from servinglab.model import cpu_gemm` imports the submodule servinglab.model.cpu_gemm
                    subs = [f"{base}.{n}" for n in names if (PACKAGE.parent / f"{base}.{n}".replace(".", "/")).with_suffix(".py").exists()]
                    found.extend((s, [], child.lineno) for s in subs)
                    if len(subs) < len(names):
                        found.append((base, [n for n in names if f"{base}.{n}" not in subs], child.lineno))
            visit(child)

    visit(tree)
    return found


FILES = sorted(PACKAGE.rglob("*.py"))


def test_the_package_has_rooms():
    rooms = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert {"engine", "model", "serving", "bench", "course"} <= rooms
    for room in rooms:
        doc = ast.get_docstring(ast.parse((PACKAGE / room / "__init__.py").read_text()))
        assert doc and "import" in doc, f"servinglab/{room}/__init__.py must say what the room is for and what it may import"


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_run_one_way_and_skip_no_private_names(path: Path):
    me = module_name(path)
    for target, names, line in imports_of(path):
        if room_of(me) != "top":
            assert RANKS[room_of(target)] <= RANKS[room_of(me)], (
                f"{me} (room {room_of(me)}) imports {target} (room {room_of(target)}) at line {line}: "
                "imports run course -> bench -> serving -> engine -> model -> interfaces"
            )
        private = [n for n in names if n.startswith("_") and not n.startswith("__")]
        assert not private, f"{me} imports private names {private} from {target} at line {line}: give them a public hook"


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` (module -> imported modules) as ``[a, b, ..., a]``, or ``None``."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def dfs(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                return stack[stack.index(t):] + [t]
            if t not in state and (cycle := dfs(t)):
                return cycle
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (cycle := dfs(m)):
            return cycle
    return None


def import_graph(sources: dict[Path, str] | None = None) -> dict[str, set[str]]:
    """The package's import graph; ``sources`` overrides the text of some files."""
    sources = sources or {}
    graph = {module_name(p): {t for t, _, _ in imports_of(p, sources.get(p))} for p in FILES}
    return {m: {t for t in targets if t in graph and t != m} for m, targets in graph.items()}


def test_no_import_cycles():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_a_type_only_circle_counts():
    """engine.engine -> engine.sampling plus a hint-only import back from sampling is a circle."""
    sampling = PACKAGE / "engine" / "sampling.py"
    planted = sampling.read_text() + "\nif TYPE_CHECKING:\n    from servinglab.engine.engine import LLMEngine\n"
    assert ("servinglab.engine.engine", ["LLMEngine"], planted.count("\n")) in imports_of(sampling, planted)
    cycle = find_cycle(import_graph({sampling: planted}))
    assert cycle is not None and "servinglab.engine.sampling" in cycle and "servinglab.engine.engine" in cycle


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_files_stay_small(path: Path):
    n = len(path.read_text().splitlines())
    assert n <= MAX_LINES, f"{path.relative_to(PACKAGE.parent)} has {n} lines: split it along a seam (at most {MAX_LINES})"


def test_the_lazy_top_level_api():
    import subprocess
    import sys

    code = "import sys, servinglab; assert 'torch' not in sys.modules; from servinglab import LLM, SamplingParams; print(LLM.__module__, SamplingParams.__module__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["servinglab.engine.llm", "servinglab.engine.sampling"]
