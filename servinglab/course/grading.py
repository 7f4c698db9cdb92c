"""Grade the graded tests: points per part, a Gradescope ``results.json``, stub checks.

``servinglab grade`` runs ``pytest tests/graded`` in-process with a small plugin that
records every test's part, points, outcome and output. A test skipped for missing
hardware (a GPU-only check on a CPU laptop) is reported as *blocked* and its points
leave the total: it is never a failure (the convention of CMU 11-868's grader).

``--expect full`` / ``--expect zero`` turn the grade into a check: every counted test
passes (the reference) or none does (the untouched stubs). ``make test`` runs both.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

import pytest

from servinglab.impl import IMPLS, PARTS

ROOT = Path(__file__).resolve().parents[2]
GRADED_DIR = ROOT / "tests" / "graded"


@dataclass
class TestResult:
    """One graded test's outcome."""

    name: str
    part: int
    max_score: float
    score: float
    status: str  # passed | failed | blocked
    output: str


class _Recorder:
    """pytest plugin collecting graded outcomes."""

    def __init__(self) -> None:
        self.results: dict[str, TestResult] = {}

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_makereport(self, item: pytest.Item, call: pytest.CallInfo):  # noqa: ARG002
        outcome = yield
        report = outcome.get_result()
        part_m, points_m = item.get_closest_marker("part"), item.get_closest_marker("points")
        if part_m is None or points_m is None:
            return
        part, points = int(part_m.args[0]), float(points_m.args[0])
        prior = self.results.get(item.nodeid)
        if report.skipped:
            reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
            self.results[item.nodeid] = TestResult(item.nodeid, part, points, 0.0, "blocked", f"skipped: {reason}")
        elif report.failed:
            text = report.longreprtext.strip().splitlines()
            self.results[item.nodeid] = TestResult(item.nodeid, part, points, 0.0, "failed", "\n".join(text[-15:]))
        elif report.when == "call" and (prior is None or prior.status != "failed"):
            self.results[item.nodeid] = TestResult(item.nodeid, part, points, points, "passed", "")


def run_graded(impl: str, extra_args: list[str] | None = None, quiet: bool = True) -> list[TestResult]:
    """Run the graded tests against ``impl`` and return one result per test."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    recorder = _Recorder()
    args = [str(GRADED_DIR), f"--impl={impl}", "-p", "no:cacheprovider", *(extra_args or [])]
    if quiet:
        args += ["-q", "--no-header", "-rN", "--tb=no"]
    pytest.main(args, plugins=[recorder])
    return sorted(recorder.results.values(), key=lambda r: (r.part, r.name))


def points_table(results: list[TestResult]) -> str:
    """A per-part table: points earned / counted, tests passed, blocked."""
    rows: dict[int, list[TestResult]] = defaultdict(list)
    for r in results:
        rows[r.part].append(r)
    lines = [f"{'part':<22} {'points':>12} {'passed':>8} {'blocked':>8}"]
    total = counted = 0.0
    for part in sorted(rows):
        rs = rows[part]
        got = sum(r.score for r in rs)
        cnt = sum(r.max_score for r in rs if r.status != "blocked")
        total, counted = total + got, counted + cnt
        name = f"{part} {PARTS.get(part, '?')}"
        passed = sum(r.status == "passed" for r in rs)
        blocked = sum(r.status == "blocked" for r in rs)
        lines.append(f"{name:<22} {got:>5g} / {cnt:<5g} {passed:>4}/{len(rs):<3} {blocked:>8}")
    lines.append(f"{'total':<22} {total:>5g} / {counted:<5g}")
    return "\n".join(lines)


def gradescope_json(results: list[TestResult]) -> dict:
    """Gradescope's autograder format (tests with name, score, max_score, output)."""
    tests = []
    for r in results:
        d = asdict(r)
        d["name"] = f"Part {r.part}: {r.name.split('::', 1)[-1]}"
        d["status"] = "passed" if r.status == "passed" else "failed"
        if r.status == "blocked":
            d["max_score"] = 0.0  # missing hardware is not held against the student
            d["output"] = "BLOCKED (" + r.output + "); not counted"
        d.pop("part")
        tests.append(d)
    return {"score": sum(r.score for r in results), "tests": tests}


def check_expectation(results: list[TestResult], expect: str) -> list[str]:
    """Problems with the outcome: ``full`` needs every counted test passed, ``zero`` none."""
    if not results:
        return ["no graded tests ran"]
    counted = [r for r in results if r.status != "blocked"]
    if expect == "full":
        return [f"{r.name} did not pass on the reference:\n{r.output}" for r in counted if r.status != "passed"]
    if expect == "zero":
        return [f"{r.name} passes on the untouched stubs: it asserts nothing a stub lacks" for r in counted if r.status == "passed"]
    raise ValueError(f"expect must be 'full' or 'zero', got {expect!r}")


def grade(impl: str, results_json: Path | None, expect: str | None, extra_args: list[str] | None = None) -> int:
    """Entry point of ``servinglab grade``; returns a process exit code."""
    results = run_graded(impl, extra_args)
    print(f"\nGraded implementation: {impl}")
    print(points_table(results))
    for r in results:
        if r.status == "blocked":
            print(f"blocked (not counted): {r.name}: {r.output}")
    if results_json:
        results_json.write_text(json.dumps(gradescope_json(results), indent=1))
        print(f"wrote {results_json}")
    if expect:
        problems = check_expectation(results, expect)
        for p in problems:
            print("ERROR:", p)
        if problems:
            return 1
        print(f"OK: expectation '{expect}' holds for {len(results)} graded tests")
    return 0
