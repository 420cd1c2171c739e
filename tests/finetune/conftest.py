"""Fixtures of the fine-tuning tests: an embedded S3 store on 127.0.0.1."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from evaclip.s3server import EmbeddedS3


@pytest.fixture(scope="session")
def s3_server() -> Iterator[EmbeddedS3]:
    with EmbeddedS3() as server:
        yield server


@pytest.fixture
def s3_storage(s3_server, tmp_path):
    """(Storage, s3://bucket) on a fresh bucket of the session's embedded store."""
    name = f"ft-{uuid.uuid4().hex[:12]}"
    s3_server.ensure_bucket(name)
    return s3_server.storage(cache_dir=tmp_path / "cache"), f"s3://{name}"
