"""Build nbgrader source notebooks from plain Python build scripts.

Each notebook has one build script in ``scripts/notebooks/`` that calls this module:

    nb = Notebook("01_kv_cache")
    nb.md("# Part 1 ...")
    nb.code("x = 1")                                  # ordinary cell, read-only for graders
    nb.solution("answer = ...\\n### BEGIN SOLUTION\\n...\\n### END SOLUTION", "answer")
    nb.tests("assert answer == 42", "answer_test", points=2)   # autograded test cell
    nb.save()

``nb.save()`` writes ``notebooks/day51/<name>.ipynb`` with the nbgrader cell metadata
(schema 3). ``make notebooks`` reruns every build script; CI checks they are in sync.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parent.parent
ASSIGNMENT = "day51"
NOTEBOOK_DIR = ROOT / "notebooks" / ASSIGNMENT

SETUP_CELL = '''\
# Course set-up: the notebook's own folder goes first on sys.path, so a submission's
# `exercises/` folder (next to the notebook) is the code that runs and gets graded.
import os, sys, pathlib
sys.path.insert(0, str(pathlib.Path.cwd()))
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
from servinglab.impl import current_impl, load_part
from servinglab.course.notebook import device_summary, enable_requires_marker, output_dir
from servinglab.course.streams import warnings_to_stdout
print("implementation under test:", current_impl(), "| device:", device_summary())
# nbgrader gives a graded cell zero for any text on stderr, and libraries warn there (more
# so on a GPU): their warnings still show, on stdout.
print(warnings_to_stdout())
OUT = output_dir("{name}")
# Cells whose first line is `# requires: model, vllm, cuda` (any of them) print why they
# skip where that is missing; what is missing is decided here, once.
print(enable_requires_marker())
'''


class Notebook:
    """Accumulates cells and writes one nbgrader source notebook."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.nb = nbformat.v4.new_notebook()
        self.nb.metadata.update(
            {
                "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
                "language_info": {"name": "python"},
            }
        )
        self._ids: set[str] = set()

    def _meta(self, grade_id: str, *, grade: bool, solution: bool, locked: bool, points: int = 0) -> dict:
        if grade_id in self._ids:
            raise ValueError(f"duplicate grade_id {grade_id!r} in {self.name}")
        self._ids.add(grade_id)
        meta = {"grade": grade, "grade_id": grade_id, "locked": locked, "schema_version": 3, "solution": solution, "task": False}
        if grade:
            meta["points"] = points
        return {"nbgrader": meta}

    def md(self, text: str) -> None:
        """A markdown cell (read-only in the release)."""
        cell = nbformat.v4.new_markdown_cell(textwrap.dedent(text).strip())
        cell.metadata.update(self._meta(f"md_{len(self.nb.cells)}", grade=False, solution=False, locked=True))
        self.nb.cells.append(cell)

    def setup(self) -> None:
        """The standard first code cell (sys.path, implementation switch, output folder)."""
        self.code(SETUP_CELL.format(name=self.name), grade_id="setup")

    def code(self, src: str, grade_id: str | None = None) -> None:
        """An ordinary code cell, locked for students."""
        cell = nbformat.v4.new_code_cell(textwrap.dedent(src).strip())
        cell.metadata.update(self._meta(grade_id or f"code_{len(self.nb.cells)}", grade=False, solution=False, locked=True))
        self.nb.cells.append(cell)

    def solution(self, src: str, grade_id: str) -> None:
        """A cell the student completes; ``### BEGIN/END SOLUTION`` marks what the release strips."""
        text = textwrap.dedent(src).strip()
        if "### BEGIN SOLUTION" not in text:
            raise ValueError(f"solution cell {grade_id} has no ### BEGIN SOLUTION region")
        cell = nbformat.v4.new_code_cell(text)
        cell.metadata.update(self._meta(grade_id, grade=False, solution=True, locked=False))
        self.nb.cells.append(cell)

    def tests(self, src: str, grade_id: str, points: int) -> None:
        """An autograded test cell worth ``points``; ``### BEGIN/END HIDDEN TESTS`` hides parts."""
        if points <= 0:
            raise ValueError(f"points must be positive, got {points}")
        marker = textwrap.dedent(src).strip().splitlines()[0]
        if marker.startswith("# requires:") and "part" in marker:
            # A skipped cell raises nothing, and nbgrader scores a test cell that raises nothing as passed.
            raise ValueError(f"{grade_id}: a graded cell may not wait for a part ({marker!r}); only for model/vllm/cuda")
        cell = nbformat.v4.new_code_cell(textwrap.dedent(src).strip())
        cell.metadata.update(self._meta(grade_id, grade=True, solution=False, locked=True, points=points))
        self.nb.cells.append(cell)

    def save(self) -> Path:
        """Write the notebook (cell ids are stable so regeneration is reproducible)."""
        for i, cell in enumerate(self.nb.cells):
            cell["id"] = f"{self.name[:2]}-{i:03d}"
        NOTEBOOK_DIR.mkdir(parents=True, exist_ok=True)
        path = NOTEBOOK_DIR / f"{self.name}.ipynb"
        nbformat.validate(self.nb)
        path.write_text(nbformat.writes(self.nb) + "\n")
        return path
