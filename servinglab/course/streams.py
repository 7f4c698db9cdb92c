"""Keep libraries' warnings out of a notebook's stderr, so nbgrader does not zero a correct answer.

nbgrader scores a graded code cell zero when its output holds an error *or any text on
stderr* (``nbgrader.utils.determine_grade``). Libraries write there on their own: Python
``warnings`` (a deprecation in transformers, a Triton or PyTorch ``UserWarning`` that only
fires on a GPU), ``logging`` records, and C code writing to file descriptor 2 (a compiler
message), which the Jupyter kernel forwards as a stderr stream too. A student whose code is
right would then lose the cell's points on one machine and keep them on another. The
notebooks' set-up cell calls :func:`warnings_to_stdout` once, so all of that is still shown,
on stdout. Exceptions are unaffected: a failing ``assert`` is an error output, not stderr.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from typing import TextIO


def _show_on_stdout(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                    file: TextIO | None = None, line: str | None = None) -> None:
    """``warnings.showwarning`` that prints where the cell's ordinary output goes."""
    sys.stdout.write(warnings.formatwarning(message, category, filename, lineno, line))


def _in_kernel() -> bool:
    """True inside a Jupyter kernel (``sys.stdout`` is the kernel's stream, not a terminal)."""
    return type(sys.stdout).__module__.startswith("ipykernel")


def warnings_to_stdout() -> str:
    """Route warnings, logging and (in a kernel) file descriptor 2 to stdout; return what it did.

    - ``warnings.showwarning`` prints to ``sys.stdout``;
    - every ``logging.StreamHandler`` writing to ``sys.stderr`` now writes to ``sys.stdout``,
      and ``sys.stderr`` itself is ``sys.stdout``, so handlers made later (a library that sets
      up its logger on import) write there too;
    - in a Jupyter kernel only, file descriptor 2 becomes a copy of descriptor 1, so text that
      C code writes to stderr reaches the notebook as stdout. In a plain ``python`` process the
      descriptors are left alone (a terminal's stderr is not graded).
    Calling it again changes nothing more.
    """
    old = sys.stderr
    warnings.showwarning = _show_on_stdout
    # (logging.lastResort reads sys.stderr when it emits: it follows the assignment below.)
    handlers = list(logging.getLogger().handlers)
    handlers += [h for lg in logging.Logger.manager.loggerDict.values() if isinstance(lg, logging.Logger) for h in lg.handlers]
    for handler in handlers:
        if type(handler) is logging.StreamHandler and handler.stream in (old, sys.__stderr__):
            handler.setStream(sys.stdout)  # (subclasses such as lastResort's may compute their stream)
    sys.stderr = sys.stdout
    done = "warnings and logging print on stdout"
    if _in_kernel():
        os.dup2(1, 2)
        done += "; so does C code's stderr"
    return done
