"""Plant plausible student bugs in a copy of ``solutions/`` and count the graded tests each one fails.

Each entry of ``MUTANTS`` is one bug a student could plausibly write, expressed as text
substitutions in one reference file. For every bug the script copies ``solutions/`` into
a temporary folder, applies the substitutions there (never in the repository), and runs
that part's graded tests against the copy with ``--impl solutions`` (the copy comes first
on ``sys.path``, so it is the ``solutions`` package that gets imported). It prints the
table part / bug / tests failing and exits 1 when a bug fails fewer than ``--min-fail``
graded tests (2 by default): a test suite that one plausible bug slips past, or that only
one test guards, is too thin to grade with.

Usage (a few minutes; ``make test`` does not run it)::

    python scripts/mutation_check.py                # every part
    python scripts/mutation_check.py --part 7 8     # some parts
    python scripts/mutation_check.py -k nibble      # the bugs whose name contains "nibble"
    python scripts/mutation_check.py --list         # the bugs, without running anything
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

from mutants import MUTANTS, Mutant  # noqa: E402


def graded_files(mutant: Mutant) -> list[str]:
    """The graded test files a bug is run against: its ``tests`` globs, else its part's files (3 with 3b, 8 with 8b and 8c, 9 with 9b)."""
    globs = mutant.tests or (f"test_part{mutant.part}[_a-z]*.py",)
    return sorted({str(p) for g in globs for p in (ROOT / "tests" / "graded").glob(g)})


def plant(mutant: Mutant, dest: Path) -> None:
    """Copy ``solutions/`` to ``dest/solutions`` and apply the mutant's substitutions there."""
    target = dest / "solutions"
    shutil.copytree(ROOT / "solutions", target, ignore=shutil.ignore_patterns("__pycache__"))
    path = target / f"{mutant.module}.py"
    text = path.read_text()
    for old, new in mutant.subs:
        found = text.count(old)
        if found != mutant.count:
            raise SystemExit(f"[{mutant.name}] expected {mutant.count} occurrence(s) of {old!r} in solutions/{mutant.module}.py, found {found}")
        text = text.replace(old, new)
    path.write_text(text)


def failing_tests(mutant: Mutant, workdir: Path) -> tuple[list[str], int]:
    """Run the bug's graded tests against ``workdir/solutions``; return (failed test ids, test cases run)."""
    report = workdir / "junit.xml"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(workdir), str(ROOT)]), "SERVINGLAB_IMPL": "solutions"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--impl", "solutions",
           f"--junitxml={report}", *graded_files(mutant)]
    # cwd=workdir: `python -m pytest` puts the working folder first on sys.path.
    subprocess.run(cmd, cwd=workdir, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
    if not report.exists():
        return ["<pytest did not run>"], 0
    failed, total = [], 0
    for case in ET.parse(report).iter("testcase"):
        total += 1
        if case.find("failure") is not None or case.find("error") is not None:
            failed.append(case.get("name", "?"))
    return failed, total


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", type=int, nargs="*", help="parts to check (default: all)")
    parser.add_argument("-k", "--bug", default="", help="only the bugs whose name contains this text")
    parser.add_argument("--min-fail", type=int, default=2, help="graded tests each bug must fail (default 2)")
    parser.add_argument("--list", action="store_true", help="print the bugs and exit")
    parser.add_argument("-v", "--verbose", action="store_true", help="name the failing tests")
    args = parser.parse_args()
    chosen = sorted((m for m in MUTANTS if (not args.part or m.part in args.part) and args.bug in m.name), key=lambda m: m.part)
    if args.list:
        for m in chosen:
            print(f"{m.part}  {m.name}  (solutions/{m.module}.py)")
        return 0
    weak = 0
    print(f"{'part':<5} {'bug':<66} graded tests failing")
    for m in chosen:
        with tempfile.TemporaryDirectory(prefix="mutant-") as tmp:
            plant(m, Path(tmp))
            failed, total = failing_tests(m, Path(tmp))
        # A parametrized test counts once: its cases are not independent tests.
        tests = sorted({name.split("[")[0] for name in failed})
        flag = "" if len(tests) >= args.min_fail else "   <-- too few"
        weak += len(tests) < args.min_fail
        print(f"{m.part:<5} {m.name:<66} {len(tests):>2} tests ({len(failed)} of {total} cases){flag}", flush=True)
        if args.verbose:
            for name in failed:
                print(f"{'':<7}{name}")
    print(f"{len(chosen) - weak} of {len(chosen)} bugs fail >= {args.min_fail} graded tests")
    return 1 if weak else 0


if __name__ == "__main__":
    sys.exit(main())
