"""Fixtures for storage tests: one embedded S3 store per session, a fresh bucket per test.

Other test areas can reuse the same pieces without these fixtures::

    from evaclip.s3server import EmbeddedS3, FaultProxy
    with EmbeddedS3(buckets=["data"]) as s3:
        storage = s3.storage(cache_dir=tmp_path / "cache")
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from evaclip.s3server import EmbeddedS3, FaultProxy
from evaclip.storage import MiB, Storage


@pytest.fixture
def proxy(s3: EmbeddedS3) -> Iterator[FaultProxy]:
    """A fault-injecting proxy in front of the session's store."""
    with FaultProxy(s3.endpoint) as p:
        yield p


def small_storage(s3: EmbeddedS3, endpoint: str, cache: Path, **kwargs) -> Storage:
    """A Storage with 5 MiB parts and quick retries, so multipart and retries show fast."""
    options = dict(
        cache_dir=cache,
        multipart_threshold=5 * MiB,
        multipart_chunksize=5 * MiB,
        max_attempts=3,
        transfer_attempts=3,
        backoff=0.05,
        connect_timeout=5,
        read_timeout=10,
    )
    options.update(kwargs)
    return s3.storage(endpoint, **options)


@pytest.fixture
def storage(s3: EmbeddedS3, tmp_path: Path) -> Storage:
    """A Storage talking straight to the embedded store."""
    return small_storage(s3, s3.endpoint, tmp_path / "cache")


@pytest.fixture
def proxied(s3: EmbeddedS3, proxy: FaultProxy, tmp_path: Path) -> Storage:
    """A Storage whose every request passes through ``proxy``."""
    return small_storage(s3, proxy.endpoint, tmp_path / "cache")
