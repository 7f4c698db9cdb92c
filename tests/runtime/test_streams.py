"""servinglab.course.streams: library warnings leave stderr (nbgrader zeroes a graded cell that writes there)."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def test_warnings_and_logging_reach_stdout_not_stderr() -> None:
    code = textwrap.dedent("""
        import logging, sys, warnings
        early = logging.getLogger("early_lib")
        early.addHandler(logging.StreamHandler())      # made before: holds sys.stderr
        from servinglab.course.streams import warnings_to_stdout
        print(warnings_to_stdout())
        warnings.warn("a library warning")
        early.warning("early handler record")
        late = logging.getLogger("late_lib")
        late.addHandler(logging.StreamHandler())       # made after: default stream
        late.warning("late handler record")
        logging.getLogger("no_handler").warning("last resort record")
        print(warnings_to_stdout())                    # twice: nothing more
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == "", proc.stderr
    for text in ("a library warning", "early handler record", "late handler record", "last resort record"):
        assert text in proc.stdout
    assert "C code" not in proc.stdout  # outside a kernel the file descriptors are left alone


def test_exceptions_still_fail() -> None:
    code = "from servinglab.course.streams import warnings_to_stdout; warnings_to_stdout(); assert False, 'wrong answer'"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "wrong answer" in proc.stdout + proc.stderr
