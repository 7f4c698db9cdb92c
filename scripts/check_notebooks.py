"""Fail when a committed notebook differs from what its build script writes.

Each ``scripts/notebooks/nb*.py`` rebuilds one notebook; this runs them all into a
scratch copy of the notebooks folder and compares, so hand edits to a notebook (or a
build script change without a rebuild) are caught.
"""

from __future__ import annotations

import filecmp

import runpy
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

import nbbuild  # noqa: E402


def main() -> int:
    scripts = sorted((ROOT / "scripts" / "notebooks").glob("nb*.py"))
    committed = nbbuild.NOTEBOOK_DIR
    with tempfile.TemporaryDirectory() as tmp:
        nbbuild.NOTEBOOK_DIR = Path(tmp)
        for script in scripts:
            runpy.run_path(str(script), run_name="__main__")
        built = sorted(p.name for p in Path(tmp).glob("*.ipynb"))
        have = sorted(p.name for p in committed.glob("*.ipynb"))
        problems = [f"{n}: no build script writes it" for n in set(have) - set(built)]
        problems += [f"{n}: not committed (run `make notebooks`)" for n in set(built) - set(have)]
        problems += [f"{n}: differs from its build script (run `make notebooks`)" for n in built if n in have and not filecmp.cmp(Path(tmp) / n, committed / n, shallow=False)]
    for p in problems:
        print("ERROR:", p)
    if problems:
        return 1
    print(f"notebooks in sync ({len(built)} files)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
