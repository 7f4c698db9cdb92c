"""Runtime tests exercise the engine, not the student's parts: every module here runs on
the reference parts (``solutions``) whatever ``--impl`` says, and restores the choice after."""

from __future__ import annotations

import pytest

from servinglab import impl


@pytest.fixture(scope="module", autouse=True)
def reference_parts():
    """Module-scoped, so module-scoped fixtures that build models see the reference too."""
    with impl.use_impl("solutions"):
        yield
