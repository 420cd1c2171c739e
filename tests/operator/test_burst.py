"""A burst of resources at once: every one gets its job, over reused connections."""

from __future__ import annotations

import asyncio

import pytest
from ecf_harness import PYTORCHJOBS, manifest

pytestmark = pytest.mark.asyncio


async def test_burst_creates_each_job_once_over_pooled_connections(cluster):
    op = await cluster.start_operator()
    names = [f"burst-{i:03d}" for i in range(150)]
    await asyncio.gather(*(cluster.create(manifest(n)) for n in names))
    await cluster.wait(lambda: all(cluster.phase(n) == "Pending" for n in names), 90.0,
                       what="every resource's job")
    assert all(cluster.creations(PYTORCHJOBS, n) == 1 for n in names)
    # The connection pool holds a connection for every handler thread: none is opened
    # and dropped per request (a TLS handshake each, against a real API server).
    assert "Connection pool is full" not in op.output()
