"""The operator stops on SIGTERM and SIGINT, as a pod's container must."""

from __future__ import annotations

import signal
import time

import pytest
from ecf_harness import manifest

pytestmark = pytest.mark.asyncio


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_signal_stops_the_operator_cleanly(cluster, sig):
    # With work done first: the handlers' worker threads exist when the signal arrives.
    op = await cluster.start_operator()
    await cluster.create(manifest("digits"))
    await cluster.wait(lambda: cluster.phase("digits") == "Pending", what="the job's status")
    started = time.monotonic()
    assert await op.stop(grace=10.0, sig=sig) == 0
    # kopf itself stops at once; the rest is the interpreter's exit.
    assert time.monotonic() - started < 5.0
    log = op.output()
    assert f"Signal {sig.name} is received" in log
    assert "InvalidStateError" not in log and "Traceback" not in log
