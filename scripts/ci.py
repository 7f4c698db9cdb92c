"""Every check CI runs (`make test`), in order of cost, with a wall-time table at the end.

Each step is one command; the first that fails stops the run (later steps would only
repeat its error), and the table of the steps that ran is printed either way, so every
CI log shows where the time went and the next slow-down is visible at once.

Each notebook is executed once with the reference and once with the stubs:

- the notebooks that carry graded cells run inside the nbgrader round trip (step 6),
  which autogrades a reference submission (every cell must run without error, the
  check ``nbval --nbval-lax`` makes, and it must score full marks) and a starter
  submission (it must score zero);
- nbval (step 5) runs only the notebooks the round trip does not execute (ungraded
  ones, such as the troubleshooting notebook).

Usage: ``python scripts/ci.py [--only N ...]`` (``--only 2 5`` runs steps 2 and 5).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

from nbgrader_roundtrip import NOTEBOOK_DIR, graded_notebooks  # noqa: E402

BIN = Path(sys.executable).parent


@dataclass
class Step:
    """One CI step: a title and the command it runs (in ``cwd``, with ``env`` added)."""

    title: str
    cmd: list[str]
    cwd: Path = ROOT
    env: dict[str, str] | None = None


def steps() -> list[Step]:
    """The six steps of ``make test``."""
    py = sys.executable
    pytest = [py, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
    graded = set(graded_notebooks())
    ungraded = sorted(p.name for p in NOTEBOOK_DIR.glob("*.ipynb") if p.stem not in graded)
    return [
        Step("exercises/ and notebooks are generated from their sources",
             ["bash", "-c", f"{py} scripts/make_exercises.py --check && {py} scripts/check_notebooks.py"]),
        Step("unit, runtime and integration tests on the reference",
             [*pytest, "--impl", "solutions", "tests", "--ignore=tests/graded", "--durations=15"]),
        Step("graded tests: the reference scores full marks", [str(BIN / "servinglab"), "grade", "--impl", "solutions", "--expect", "full"]),
        Step("graded tests: the untouched stubs score zero", [str(BIN / "servinglab"), "grade", "--impl", "exercises", "--expect", "zero"]),
        Step(f"nbval of the notebooks the round trip does not execute ({', '.join(ungraded) or 'none'})",
             [*pytest, "--nbval-lax", "--nbval-current-env", *ungraded] if ungraded else ["true"],
             cwd=NOTEBOOK_DIR, env={"SERVINGLAB_IMPL": "solutions"}),
        Step("nbgrader round trip: every graded notebook runs cleanly on the reference (full marks), starter zero",
             [py, "scripts/nbgrader_roundtrip.py"]),
    ]


def fmt(seconds: float) -> str:
    """``12m 05s`` style."""
    m, s = divmod(round(seconds), 60)
    return f"{m}m {s:02d}s"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", type=int, nargs="*", help="run only these step numbers (1..6)")
    args = parser.parse_args()
    all_steps = steps()
    chosen = args.only or list(range(1, len(all_steps) + 1))
    bad = [n for n in chosen if not 1 <= n <= len(all_steps)]
    if bad:
        parser.error(f"--only: steps {bad} do not exist; allowed 1..{len(all_steps)}")
    times: list[tuple[int, str, float, str]] = []
    status = 0
    start = time.perf_counter()
    for n in chosen:
        step = all_steps[n - 1]
        print(f"== {n}/{len(all_steps)} {step.title}", flush=True)
        t0 = time.perf_counter()
        rc = subprocess.run(step.cmd, cwd=step.cwd, env={**os.environ, **(step.env or {})}).returncode
        times.append((n, step.title, time.perf_counter() - t0, "ok" if rc == 0 else f"FAILED (exit {rc})"))
        if rc != 0:
            status = rc
            break
    print("\n== wall time per step")
    print(" | ".join(f"{n}/{len(all_steps)} {fmt(t)}{'' if s == 'ok' else ' ' + s}" for n, _, t, s in times)
          + f" | total {fmt(time.perf_counter() - start)}")
    return status


if __name__ == "__main__":
    sys.exit(main())
