"""Prove the nbgrader round trip: release, then autograde a reference and a stub submission.

In a temporary course folder: ``nbgrader generate_assignment day51``, then two
submissions of the released notebooks, each carrying an ``exercises/`` package next to
the notebooks (that is how a student submits their code):

- ``reference``: the source notebooks (solution cells answered) and ``exercises/``
  holding the solutions;
- ``starter``: the released notebooks untouched and ``exercises/`` holding the stubs.

``nbgrader autograde`` runs both; the reference must score full marks and the starter
zero. Exits 1 otherwise, printing each notebook's score.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ASSIGNMENT = "day51"
CONFIG = """\
c = get_config()
c.CourseDirectory.root = {root!r}
c.CourseDirectory.source_directory = "source"
c.CourseDirectory.course_id = "day51-llm-serving"
c.ExecutePreprocessor.timeout = 900
c.CourseDirectory.ignore = [".ipynb_checkpoints", "*.pyc", "__pycache__", "outputs"]
"""


def nbgrader(course: Path, *args: str) -> None:
    # nbgrader runs helpers (alembic) from the environment's bin folder.
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    env = dict(os.environ, SERVINGLAB_IMPL="exercises", VLLM_ENABLE_V1_MULTIPROCESSING="0", PATH=path)
    cmd = [sys.executable, "-m", "nbgrader", *args]
    proc = subprocess.run(cmd, cwd=course, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"`nbgrader {' '.join(args)}` failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")


def make_submission(course: Path, student: str, notebooks: Path, code_dir: Path) -> None:
    """A submission folder: the notebooks plus an ``exercises/`` package with ``code_dir``'s files."""
    dest = course / "submitted" / student / ASSIGNMENT
    shutil.copytree(notebooks, dest)
    pkg = dest / "exercises"
    pkg.mkdir()
    for src in code_dir.glob("*.py"):
        shutil.copy(src, pkg / src.name)


def scores(course: Path) -> dict[str, dict[str, tuple[float, float]]]:
    from nbgrader.api import Gradebook

    out: dict[str, dict[str, tuple[float, float]]] = {}
    with Gradebook(f"sqlite:///{course / 'gradebook.db'}") as gb:
        for student in ("reference", "starter"):
            sub = gb.find_submission(ASSIGNMENT, student)
            out[student] = {nb.name: (nb.score, nb.max_score) for nb in sub.notebooks}
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", action="store_true", help="keep the temporary course folder")
    parser.add_argument("--notebooks", nargs="*", help="only these notebook names (default: all)")
    args = parser.parse_args()
    course = Path(tempfile.mkdtemp(prefix="day51-course-"))
    try:
        (course / "nbgrader_config.py").write_text(CONFIG.format(root=str(course)))
        src = course / "source" / ASSIGNMENT
        src.mkdir(parents=True)
        names = args.notebooks or [p.stem for p in sorted((ROOT / "notebooks" / ASSIGNMENT).glob("*.ipynb"))
                                   if '"grade": true' in p.read_text()]  # ungraded notebooks (10) have nothing to grade
        for name in names:
            shutil.copy(ROOT / "notebooks" / ASSIGNMENT / f"{name}.ipynb", src)
        nbgrader(course, "db", "assignment", "add", ASSIGNMENT)
        nbgrader(course, "generate_assignment", ASSIGNMENT, "--force")
        # The reference answers every notebook cell as the source does and carries the solutions;
        # the starter hands in the release untouched with the generated stubs.
        make_submission(course, "reference", src, ROOT / "solutions")
        make_submission(course, "starter", course / "release" / ASSIGNMENT, ROOT / "exercises")
        for student in ("reference", "starter"):
            nbgrader(course, "db", "student", "add", student)
        nbgrader(course, "autograde", ASSIGNMENT, "--force")
        result = scores(course)
        ok = True
        for student, nbs in result.items():
            for nb, (score, max_score) in sorted(nbs.items()):
                want = max_score if student == "reference" else 0.0
                flag = "ok" if score == want else "WRONG"
                ok &= score == want and max_score > 0
                print(f"{student:<10} {nb:<28} {score:>5g} / {max_score:<5g} {flag}")
        print("nbgrader round trip:", "OK (reference full marks, starter zero)" if ok else "FAILED")
        return 0 if ok else 1
    finally:
        if args.keep:
            print("course folder kept at", course)
        else:
            shutil.rmtree(course, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
