"""Generate ``exercises/*.py`` (student stubs) from ``solutions/*.py`` (the reference).

A solution marks each body a student writes with a pair of comment lines::

    def f(x: int) -> int:
        \"\"\"Docstring and hints stay in the stub.\"\"\"
        # A hint comment above the region stays too.
        ### BEGIN SOLUTION
        return x + 1
        ### END SOLUTION

Everything between the markers (markers included) becomes one
``raise NotImplementedError(...)`` line at the same indentation, so the stub keeps the
signature, docstring and hints, and fails loudly until the student fills it in.
``--check`` regenerates in memory and exits 1 with a diff when ``exercises/`` has
drifted from ``solutions/`` (CI runs it).
"""

from __future__ import annotations

import argparse
import difflib
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BEGIN = re.compile(r"^(?P<indent>[ \t]*)### BEGIN SOLUTION\s*$")
END = re.compile(r"^[ \t]*### END SOLUTION\s*$")
HEADER = (
    "# Exercise stub generated from solutions/{name} by scripts/make_exercises.py.\n"
    "# Fill in every `raise NotImplementedError` below; keep the signatures.\n"
)


def make_stub(source: str, name: str) -> str:
    """Return the stub text for one solution file's text; raise on malformed markers."""
    out: list[str] = []
    region_start: int | None = None
    func = "this function"
    for lineno, line in enumerate(source.splitlines(keepends=True), start=1):
        if region_start is None:
            m = BEGIN.match(line)
            if m:
                indent = m.group("indent")
                if not indent:
                    raise ValueError(f"{name}:{lineno}: a solution region must sit inside a function body")
                region_start = lineno
                out.append(f'{indent}raise NotImplementedError("{func}: your code here")\n')
                continue
            if END.match(line):
                raise ValueError(f"{name}:{lineno}: END SOLUTION without BEGIN SOLUTION")
            d = re.match(r"^\s*(?:async\s+)?def\s+(\w+)", line)
            if d:
                func = d.group(1)
            out.append(line)
        elif END.match(line):
            region_start = None
        elif BEGIN.match(line):
            raise ValueError(f"{name}:{lineno}: nested BEGIN SOLUTION (region opened at line {region_start})")
    if region_start is not None:
        raise ValueError(f"{name}:{region_start}: BEGIN SOLUTION is never closed")
    body = "".join(out)
    if name == "__init__.py":
        return body
    return HEADER.format(name=name) + body


def generate(solutions: Path, exercises: Path) -> dict[Path, str]:
    """Map each exercises/ path to the text it should have."""
    return {exercises / src.name: make_stub(src.read_text(), src.name) for src in sorted(solutions.glob("*.py"))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if exercises/ differs from what solutions/ generates")
    parser.add_argument("--solutions", type=Path, default=ROOT / "solutions")
    parser.add_argument("--exercises", type=Path, default=ROOT / "exercises")
    args = parser.parse_args(argv)
    wanted = generate(args.solutions, args.exercises)
    if args.check:
        drift = []
        for path, text in wanted.items():
            have = path.read_text() if path.exists() else ""
            if have != text:
                drift.extend(difflib.unified_diff(have.splitlines(True), text.splitlines(True), str(path), f"{path} (generated)"))
        extra = {p for p in args.exercises.glob("*.py")} - set(wanted)
        for p in sorted(extra):
            drift.append(f"{p}: has no solution counterpart\n")
        if drift:
            sys.stdout.writelines(drift)
            print("exercises/ is out of sync with solutions/: run `make exercises`", file=sys.stderr)
            return 1
        print(f"exercises/ in sync ({len(wanted)} files)")
        return 0
    args.exercises.mkdir(exist_ok=True)
    for path, text in wanted.items():
        path.write_text(text)
    print(f"wrote {len(wanted)} files to {args.exercises}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
