"""Fixtures for trainer tests: an embedded S3 store, job contexts, small image sets."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from evaclip.manifest import parse_resource
from evaclip.s3server import EmbeddedS3

BASE_MANIFEST: dict[str, Any] = {
    "apiVersion": "training.evaclip.io/v1alpha1",
    "kind": "EvaClipFinetune",
    "metadata": {"name": "probe-test"},
    "spec": {
        "model": {"preset": "eva-clip-18b-tiny", "precision": "fp32"},
        "data": {"train": "/unused", "numWorkers": 0},
        "training": {"epochs": 3, "batchSize": 4},
        "resources": {"gpusPerNode": 0},
        "output": "/unused-output",
    },
}


def manifest(**spec: Any) -> dict[str, Any]:
    """The base manifest with spec sections updated (one level deep)."""
    out = copy.deepcopy(BASE_MANIFEST)
    for key, value in spec.items():
        if isinstance(value, dict) and isinstance(out["spec"].get(key), dict):
            out["spec"][key].update(value)
        else:
            out["spec"][key] = value
    return out


@pytest.fixture
def make_ctx(tmp_path: Path, s3: EmbeddedS3) -> Callable[..., Any]:
    """Build a JobContext of a single process (or a given rank) without a process group."""
    from evaclip.trainer.context import JobContext
    from evaclip.trainer.progress import Reporter

    def make(rank: int = 0, world_size: int = 1, **spec: Any) -> Any:
        import torch

        resource = parse_resource(manifest(**spec))
        storage = s3.storage(cache_dir=tmp_path / "cache")
        workdir = tmp_path / f"work-{rank}"
        workdir.mkdir(exist_ok=True)
        return JobContext(resource, rank, world_size, rank, world_size, torch.device("cpu"),
                          storage, workdir, Reporter(sinks=[], is_primary=rank == 0))

    return make
