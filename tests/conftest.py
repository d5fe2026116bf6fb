"""Suite-wide: the order in which whole files go to the two xdist workers."""

from __future__ import annotations

import pytest


def _minutes(item: pytest.Item) -> float:
    marker = item.get_closest_marker("long")
    return float(marker.args[0]) if marker else 0.0


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Longest modules first (`long(minutes)`, stable otherwise): each worker takes whole files in
    this order, and a file of several minutes handed out last would leave the other worker idle."""
    items.sort(key=_minutes, reverse=True)
