"""The operator's own test harness (tests/operator/ecf_harness.py), for reliability tests.

`emulated_cluster(tmp_path)` starts kmock's KubernetesEmulator over real HTTP on
127.0.0.1 with the EvaClipFinetune CRD loaded, exactly as tests/operator/conftest.py does;
`cluster.start_operator()` then runs `evaclip operator` against it as a subprocess.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import AsyncIterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "operator"))

import kmock  # noqa: E402
import yaml  # noqa: E402
from ecf_harness import (  # noqa: E402, F401
    ECF,
    OUR_CRD,
    PYTORCHJOBS,
    ApiServerEmulator,
    Cluster,
    declare,
    manifest,
)


@contextlib.asynccontextmanager
async def emulated_cluster(tmp_path: Path) -> AsyncIterator[Cluster]:
    """An emulated API server serving EvaClipFinetunes and PyTorchJobs; stops operators."""
    emulator = ApiServerEmulator()
    declare(emulator, pytorchjobs=True)
    async with emulator, kmock.Server(emulator) as server:
        cluster = Cluster(emulator, server, tmp_path)
        await cluster.create(yaml.safe_load(OUR_CRD.read_text()))
        try:
            yield cluster
        finally:
            for op in cluster.operators:
                await op.stop()
