"""Graded tests: every test carries ``@pytest.mark.part(n)`` and ``@pytest.mark.points(p)``."""

from pathlib import Path

import pytest

HERE = Path(__file__).parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # A conftest hook sees every collected item: check only those in this folder.
    for item in items:
        if HERE not in Path(item.path).parents:
            continue
        if item.get_closest_marker("part") is None or item.get_closest_marker("points") is None:
            raise pytest.UsageError(f"graded test {item.nodeid} needs both @pytest.mark.part and @pytest.mark.points")
