"""Shared test setup: every server a test talks to listens on 127.0.0.1 only."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from evaclip.s3server import EmbeddedS3

ROOT = Path(__file__).resolve().parents[1]

# DeepSpeed JIT-compiles a CPU comm op once; keep it in the project cache.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))
os.environ.setdefault("DS_ACCELERATOR", "cpu")
# Never reach a real cloud: no instance metadata look-ups, no ambient credentials.
os.environ["AWS_EC2_METADATA_DISABLED"] = "true"
for _var in ("AWS_PROFILE", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
    os.environ.pop(_var, None)


@pytest.fixture(scope="session")
def s3() -> Iterator[EmbeddedS3]:
    """moto's S3 server on 127.0.0.1 for the whole session."""
    with EmbeddedS3() as server:
        yield server


@pytest.fixture
def bucket(s3: EmbeddedS3) -> str:
    """A new, empty bucket, so tests never see each other's objects."""
    name = f"t-{uuid.uuid4().hex[:12]}"
    s3.ensure_bucket(name)
    return name
