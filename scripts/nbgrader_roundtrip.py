"""Prove the nbgrader round trip: release, then autograde a reference and a stub submission.

In a temporary course folder: ``nbgrader generate_assignment day51``, then two
submissions of the released notebooks, each carrying an ``exercises/`` package next to
the notebooks (that is how a student submits their code):

- ``reference``: the source notebooks (solution cells answered) and ``exercises/``
  holding the solutions;
- ``starter``: the released notebooks untouched and ``exercises/`` holding the stubs.

``nbgrader autograde`` runs both; the reference must score full marks, with no cell
raising an error (graded or not: this is the only run of the graded notebooks with the
reference, so it also does what ``nbval --nbval-lax`` would), and the starter zero.
Prints each notebook's score, the seconds each submission took and the slowest cells;
exits 1 on any failure.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ASSIGNMENT = "day51"
NOTEBOOK_DIR = ROOT / "notebooks" / ASSIGNMENT
CONFIG = """\
c = get_config()
c.CourseDirectory.root = {root!r}
c.CourseDirectory.source_directory = "source"
c.CourseDirectory.course_id = "day51-llm-serving"
c.ExecutePreprocessor.timeout = 900
c.CourseDirectory.ignore = [".ipynb_checkpoints", "*.pyc", "__pycache__", "outputs"]
"""


def nbgrader(course: Path, *args: str, progress: bool = False) -> None:
    """Run ``nbgrader ARGS`` in ``course``; ``progress``: print its per-notebook lines as they come."""
    # nbgrader runs helpers (alembic) from the environment's bin folder, or from the bin folder of a
    # `pip install --target` site on sys.path (a registry-less GPU runner, setup_guide.md section 5).
    bins = [str(Path(sys.executable).parent)] + [str(Path(p) / "bin") for p in sys.path if p and (Path(p) / "bin").is_dir()]
    path = os.pathsep.join([*bins, os.environ.get("PATH", "")])
    env = dict(os.environ, SERVINGLAB_IMPL="exercises", VLLM_ENABLE_V1_MULTIPROCESSING="0", PATH=path)
    cmd = [sys.executable, "-m", "nbgrader", *args]
    if not progress:
        proc = subprocess.run(cmd, cwd=course, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"`nbgrader {' '.join(args)}` failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
        return
    # Long runs (autograde): echo which notebook starts when, so a run stopped by a time limit
    # (a GPU runner's per-command limit) still tells how far it got and what took the time.
    start, lines = time.monotonic(), []
    with subprocess.Popen(cmd, cwd=course, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
        for line in proc.stdout:
            lines.append(line)
            if "Autograding" in line:  # "... Autograding <course>/autograded/<student>/<assignment>/<notebook>.ipynb"
                parts = Path(line.strip().split()[-1]).parts
                print(f"  [{time.monotonic() - start:6.0f} s] autograding {parts[-3]} {Path(parts[-1]).stem}", flush=True)
    if proc.returncode != 0:
        raise SystemExit(f"`nbgrader {' '.join(args)}` failed:\n{''.join(lines)[-8000:]}")


def make_submission(course: Path, student: str, notebooks: Path, code_dir: Path) -> None:
    """A submission folder: the notebooks plus an ``exercises/`` package with ``code_dir``'s files."""
    dest = course / "submitted" / student / ASSIGNMENT
    shutil.copytree(notebooks, dest)
    pkg = dest / "exercises"
    pkg.mkdir()
    for src in code_dir.glob("*.py"):
        shutil.copy(src, pkg / src.name)


def scores(course: Path, students: list[str]) -> dict[str, dict[str, tuple[float, float]]]:
    """Per student, per notebook: (score, max score) from the gradebook."""
    from nbgrader.api import Gradebook

    out: dict[str, dict[str, tuple[float, float]]] = {}
    with Gradebook(f"sqlite:///{course / 'gradebook.db'}") as gb:
        for student in students:
            sub = gb.find_submission(ASSIGNMENT, student)
            out[student] = {nb.name: (nb.score, nb.max_score) for nb in sub.notebooks}
    return out


def _seconds(cell: dict) -> float:
    """How long nbclient took to run a cell (its recorded ``execution`` timestamps), 0 when it did not run."""
    stamps = cell.get("metadata", {}).get("execution", {})
    start, end = stamps.get("iopub.execute_input"), stamps.get("shell.execute_reply")
    if not (start and end):
        return 0.0
    parse = lambda t: datetime.fromisoformat(t.replace("Z", "+00:00"))  # noqa: E731
    return (parse(end) - parse(start)).total_seconds()


def executed(course: Path, student: str) -> dict[str, dict]:
    """The autograded (executed) notebooks of one student, by name."""
    folder = course / "autograded" / student / ASSIGNMENT
    return {p.stem: json.loads(p.read_text()) for p in sorted(folder.glob("*.ipynb"))}


def cell_errors(nb: dict) -> list[str]:
    """One line per code cell that raised (what ``nbval --nbval-lax`` would fail on), and per graded
    cell that wrote to stderr: nbgrader scores such a cell zero (``nbgrader.utils.determine_grade``),
    so a library's warning would cost a correct answer its points."""
    found = []
    for index, cell in enumerate(c for c in nb["cells"] if c["cell_type"] == "code"):
        meta = cell.get("metadata", {}).get("nbgrader", {})
        grade_id = meta.get("grade_id", "?")
        for out in cell.get("outputs", []):
            if out.get("output_type") == "error":
                found.append(f"code cell {index} ({grade_id}): {out.get('ename')}: {str(out.get('evalue'))[:300]}")
            elif meta.get("grade") and out.get("output_type") == "stream" and out.get("name") == "stderr":
                text = "".join(out.get("text", "")).strip()
                found.append(f"code cell {index} ({grade_id}): graded cell wrote to stderr (scored zero): {text[:300]}")
    return found


def time_report(runs: dict[str, dict[str, dict]], slowest: int = 8) -> None:
    """Seconds each student's notebooks took, and the slowest cells of the reference run."""
    for student, nbs in runs.items():
        per_nb = {name: sum(_seconds(c) for c in nb["cells"] if c["cell_type"] == "code") for name, nb in nbs.items()}
        print(f"{student:<10} executed in {sum(per_nb.values()):6.0f} s: "
              + ", ".join(f"{name[:2]} {t:.0f}" for name, t in per_nb.items()))
    cells = [(_seconds(c), name, i) for name, nb in runs.get("reference", {}).items()
             for i, c in enumerate(c for c in nb["cells"] if c["cell_type"] == "code")]
    print("slowest reference cells:", ", ".join(f"{name} cell {i} {t:.0f} s" for t, name, i in sorted(cells, reverse=True)[:slowest]))


def graded_notebooks() -> list[str]:
    """The notebooks with graded cells (the round trip executes these; ungraded ones have nothing to grade)."""
    return [p.stem for p in sorted(NOTEBOOK_DIR.glob("*.ipynb")) if '"grade": true' in p.read_text()]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", action="store_true", help="keep the temporary course folder")
    parser.add_argument("--notebooks", nargs="*", help="only these notebook names (default: all)")
    parser.add_argument("--students", nargs="*", choices=("reference", "starter"), default=["reference", "starter"],
                        help="submissions to autograde (default both; a GPU runner with a per-call limit may split them)")
    parser.add_argument("--jobs", default="auto",
                        help="runs at once, one per (student, notebook) (scripts/roundtrip_parallel.py); "
                             "auto: 1 without CUDA, several with it")
    args = parser.parse_args()
    from roundtrip_parallel import auto_jobs, run_parallel

    if args.jobs != "auto" and not (args.jobs.isdigit() and int(args.jobs) >= 1):
        parser.error(f"--jobs must be 'auto' or a positive integer, got {args.jobs!r}")
    jobs = auto_jobs() if args.jobs == "auto" else int(args.jobs)
    if jobs > 1:
        return run_parallel(args.students, args.notebooks or graded_notebooks(), jobs)
    course = Path(tempfile.mkdtemp(prefix="day51-course-"))
    try:
        (course / "nbgrader_config.py").write_text(CONFIG.format(root=str(course)))
        src = course / "source" / ASSIGNMENT
        src.mkdir(parents=True)
        names = args.notebooks or graded_notebooks()
        for name in names:
            shutil.copy(NOTEBOOK_DIR / f"{name}.ipynb", src)
        nbgrader(course, "db", "assignment", "add", ASSIGNMENT)
        nbgrader(course, "generate_assignment", ASSIGNMENT, "--force")
        # The reference answers every notebook cell as the source does and carries the solutions;
        # the starter hands in the release untouched with the generated stubs.
        handed_in = {"reference": (src, ROOT / "solutions"), "starter": (course / "release" / ASSIGNMENT, ROOT / "exercises")}
        for student in args.students:
            make_submission(course, student, *handed_in[student])
            nbgrader(course, "db", "student", "add", student)
        nbgrader(course, "autograde", ASSIGNMENT, "--force", progress=True)
        result = scores(course, args.students)
        runs = {student: executed(course, student) for student in result}
        time_report(runs)
        ok = True
        # Every cell of the reference must run without error, graded or not (nbval's check):
        # this run is the only one that executes the graded notebooks with the reference.
        for name, nb in runs.get("reference", {}).items():
            for line in cell_errors(nb):
                ok = False
                print(f"reference  {name}: ERROR in {line}")
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
