"""Fixtures of the operator tests: an emulated API server on 127.0.0.1 (see ecf_harness.py).

`cluster.start_operator()` runs `evaclip operator` as a subprocess against it.
"""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import kmock
import pytest
import pytest_asyncio
import yaml

sys.path.insert(0, str(Path(__file__).parent))

from ecf_harness import OUR_CRD, REFERENCE_CRD, ApiServerEmulator, Cluster, declare  # noqa: E402


async def _start(tmp_path: Path, *, pytorchjobs: bool) -> AsyncIterator[Cluster]:
    emulator = ApiServerEmulator()
    declare(emulator, pytorchjobs=pytorchjobs)
    async with emulator, kmock.Server(emulator) as server:
        cluster = Cluster(emulator, server, tmp_path)
        await cluster.create(yaml.safe_load(OUR_CRD.read_text()))
        try:
            yield cluster
        finally:
            # Every operator must stop cleanly on SIGTERM; stop all before reporting one.
            failures = []
            for op in cluster.operators:
                try:
                    await op.stop()
                except AssertionError as err:
                    failures.append(str(err))
            if failures:
                raise AssertionError("\n".join(failures))


@pytest_asyncio.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[Cluster]:
    """An emulated API server that serves EvaClipFinetunes and PyTorchJobs."""
    async for c in _start(tmp_path, pytorchjobs=True):
        yield c


@pytest_asyncio.fixture
async def bare_cluster(tmp_path: Path) -> AsyncIterator[Cluster]:
    """An emulated API server without the Kubeflow training operator's CRD."""
    async for c in _start(tmp_path, pytorchjobs=False):
        yield c


@pytest.fixture(scope="session")
def pytorchjob_schema() -> dict[str, Any]:
    """openAPIV3Schema of the Kubeflow training-operator v1.9.0 PyTorchJob CRD."""
    crd = yaml.safe_load(REFERENCE_CRD.read_text())
    return crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]



@pytest.fixture(scope="session")
def ecf_schema() -> dict[str, Any]:
    """openAPIV3Schema of our generated EvaClipFinetune CRD."""
    crd = yaml.safe_load(OUR_CRD.read_text())
    return crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
