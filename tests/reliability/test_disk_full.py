"""The node cache's disk filling up mid-download gives one clear line and no partial file.

A container cannot portably get a small file system without root, so the child process
that downloads gets a file-size limit (RLIMIT_FSIZE, 1 MiB) with SIGXFSZ ignored: every
write past the limit then fails with EFBIG exactly where a full disk fails with ENOSPC,
inside the real transfer code, through the real HTTP path to the embedded S3 server. The
case where the free space is known to be too small before the transfer starts is covered
by tests/storage (`test_download_larger_than_free_space_fails_before_transfer`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import tally

from evaclip.s3server import EmbeddedS3

CHILD = r"""
import json, os, resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
from evaclip.errors import UserError
from evaclip.spec import StorageSpec
from evaclip.storage import Storage, StorageError
storage = Storage(StorageSpec(endpoint=os.environ["S3_ENDPOINT"]), cache_dir=sys.argv[1],
                  credentials={"aws_access_key_id": "k", "aws_secret_access_key": "s"},
                  backoff=0.01)
try:
    storage.fetch(sys.argv[2], field="model.weights")
    outcome = {"error": None}
except (UserError, StorageError) as err:
    outcome = {"error": type(err).__name__, "message": str(err)}
print(json.dumps(outcome))
"""


def test_a_full_disk_while_caching_is_one_clear_error(tmp_path: Path) -> None:
    uri = "s3://disk-full/weights/eva.safetensors"
    cache = tmp_path / "cache"
    with EmbeddedS3(buckets=["disk-full"]) as s3:
        s3.storage().write_bytes(uri, os.urandom(3 << 20))
        done = subprocess.run([sys.executable, "-c", CHILD, str(cache), uri],
                              env={**os.environ, "S3_ENDPOINT": s3.endpoint},
                              capture_output=True, text=True, timeout=120, check=False)
    outcome = json.loads(done.stdout.strip().splitlines()[-1]) if done.returncode == 0 else {}
    message = outcome.get("message", "")
    left = [p for p in (cache / "data").rglob("*") if p.is_file()] if cache.exists() else []
    clear = bool(outcome.get("error")) and "\n" not in message and uri in message \
        and "model.weights" in message and "File too large" in message
    tally.record("disk-full-cache", survived=int(clear and not left), lost=len(left))
    assert done.returncode == 0, done.stderr[-3000:]  # an exception the caller can handle
    assert clear, outcome
    assert not left, left  # no partial file that a later run could take for the weights
