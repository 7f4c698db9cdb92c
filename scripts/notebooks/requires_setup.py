"""The set-up cell every notebook build script writes: nbbuild's, plus the ``# requires:`` marker.

``setup(nb)`` replaces ``nb.setup()``: the same cell (grade_id ``setup``) that also calls
``servinglab.course.notebook.enable_requires_marker()`` and prints what this machine has,
so a later cell whose first line is ``# requires: model, vllm`` prints why it skips on a
machine without them instead of failing.
"""

from __future__ import annotations

from nbbuild import SETUP_CELL, Notebook

REQUIRES_SETUP = """\
from servinglab.course.notebook import enable_requires_marker
print(enable_requires_marker())
"""


def setup(nb: Notebook) -> None:
    """The standard first code cell, with the ``# requires:`` marker switched on."""
    nb.code(SETUP_CELL.format(name=nb.name) + REQUIRES_SETUP, grade_id="setup")
