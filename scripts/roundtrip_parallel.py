"""The nbgrader round trip split over several processes: one (student, notebook) per run.

On a GPU runner the round trip's two submissions x nine notebooks run one after another
in one ``nbgrader autograde`` (more than ten minutes with the model prepared), while the
machine has many cores and one GPU that each notebook uses a small part of. Here each
(student, notebook) pair is its own ``nbgrader_roundtrip.py --students S --notebooks N``
run, in its own temporary course folder (nbgrader's gradebook is one SQLite file per
course), and ``jobs`` of them run at once, the longest first. The verdict is the same:
every run must pass (reference full marks and no cell error, starter zero).
On a CPU with few cores the notebooks compete for them, so ``--jobs auto`` stays at 1 there.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent / "nbgrader_roundtrip.py"

# Seconds the reference took per notebook on a CPU round trip (a scheduling hint only:
# the longest start first, so the last to finish is not a long one started late).
WEIGHT = {"08": 90, "06": 70, "04": 60, "05": 50, "03": 45, "09": 45, "01": 20, "07": 20, "02": 15}


def auto_jobs() -> int:
    """1 without CUDA (a CPU runner's cores are the notebooks' own); with CUDA, a quarter of the cores, 2 to 6."""
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    return 1 if not has_cuda else max(2, min(6, (os.cpu_count() or 8) // 4))


def _one(student: str, notebook: str) -> tuple[str, str, int, str, float]:
    start = time.monotonic()
    proc = subprocess.run([sys.executable, str(SCRIPT), "--jobs", "1", "--students", student, "--notebooks", notebook],
                          capture_output=True, text=True)
    return student, notebook, proc.returncode, proc.stdout + proc.stderr, time.monotonic() - start


def run_parallel(students: list[str], notebooks: list[str], jobs: int) -> int:
    """Run every (student, notebook) pair, ``jobs`` at a time; print each result as it ends; 0 when all pass."""
    pairs = sorted(((s, n) for s in students for n in notebooks), key=lambda p: (-WEIGHT.get(p[1][:2], 30), p[0]))
    print(f"round trip over {len(pairs)} runs, {jobs} at a time", flush=True)
    start, failed = time.monotonic(), []
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        for done in as_completed([pool.submit(_one, *pair) for pair in pairs]):  # printed as they end
            student, notebook, code, output, seconds = done.result()
            verdict = [line for line in output.splitlines() if line.startswith((student, "reference ", "starter "))]
            print(f"[{time.monotonic() - start:6.0f} s] {student} {notebook}: {seconds:.0f} s, "
                  f"{'ok' if code == 0 else 'FAILED'}", flush=True)
            for line in verdict:
                print("   ", line)
            if code != 0:
                failed.append((student, notebook))
                print(output[-3000:])
    print("nbgrader round trip:", "OK (reference full marks, starter zero)" if not failed else f"FAILED: {failed}")
    return 0 if not failed else 1
