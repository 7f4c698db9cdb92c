"""Graded tests: every test carries ``@pytest.mark.part(n)`` and ``@pytest.mark.points(p)``."""

import pytest


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if item.get_closest_marker("part") is None or item.get_closest_marker("points") is None:
            raise pytest.UsageError(f"graded test {item.nodeid} needs both @pytest.mark.part and @pytest.mark.points")
