"""Pruning tests run k-means and the tiny model on a few hundred tokens at a time: one thread each
avoids thread start-up and spin costs that dominate at that size on a shared CI machine."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from threadpoolctl import threadpool_limits


@pytest.fixture(autouse=True, scope="module")
def _single_threaded_math() -> Iterator[None]:
    with threadpool_limits(limits=1):
        yield
