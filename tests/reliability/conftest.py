"""Reliability tests: faults, bad input and secrets; the figures go to tally.json."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

sys.path.insert(0, str(Path(__file__).parent))

import tally  # noqa: E402
from kube import Cluster, emulated_cluster  # noqa: E402


@pytest_asyncio.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[Cluster]:
    async with emulated_cluster(tmp_path) as c:
        yield c


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Count the covering tests of other areas, then write the machine-readable tally."""
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        tally.count_external(reporter.stats)
    if tally.results():
        tally.write()
