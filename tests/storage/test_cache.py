"""fetch/fetch_tree: one download per node, kept across restarts, refetched when damaged."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from evaclip.s3server import EmbeddedS3, FaultProxy
from evaclip.storage import Storage

from .conftest import small_storage


def _object_gets(proxy: FaultProxy, bucket: str, key: str) -> int:
    """GETs of the object itself (listing requests carry a query, not the key path)."""
    return proxy.count("GET", f"/{bucket}/{key}")


def test_second_fetch_and_restarted_worker_make_no_get(
    s3: EmbeddedS3, proxy: FaultProxy, proxied: Storage, bucket: str, tmp_path: Path
) -> None:
    uri = f"s3://{bucket}/weights/model.bin"
    proxied.write_bytes(uri, os.urandom(300_000))
    first = proxied.fetch(uri)
    assert _object_gets(proxy, bucket, "weights/model.bin") == 1
    assert proxied.fetch(uri) == first
    # A restarted worker is a new process with a new Storage on the same cache directory.
    restarted = small_storage(s3, proxy.endpoint, tmp_path / "cache")
    assert restarted.fetch(uri) == first
    assert _object_gets(proxy, bucket, "weights/model.bin") == 1
    assert first.read_bytes() == proxied.read_bytes(uri)


@pytest.mark.parametrize("damage", ["same-size", "truncated"])
def test_damaged_cached_copy_is_fetched_again(
    proxy: FaultProxy, proxied: Storage, bucket: str, damage: str
) -> None:
    uri = f"s3://{bucket}/w.bin"
    data = os.urandom(100_000)
    proxied.write_bytes(uri, data)
    cached = proxied.fetch(uri)
    if damage == "same-size":
        cached.write_bytes(b"\0" * len(data))
    else:
        cached.write_bytes(data[:1000])
    again = proxied.fetch(uri)
    assert again.read_bytes() == data
    assert _object_gets(proxy, bucket, "w.bin") == 2


def test_touched_but_intact_copy_is_kept(proxy: FaultProxy, proxied: Storage, bucket: str) -> None:
    uri = f"s3://{bucket}/w.bin"
    proxied.write_bytes(uri, b"x" * 5000)
    cached = proxied.fetch(uri)
    os.utime(cached, (time.time() + 5, time.time() + 5))
    assert proxied.fetch(uri).read_bytes() == b"x" * 5000
    assert _object_gets(proxy, bucket, "w.bin") == 1


def test_replaced_object_is_fetched_again(proxied: Storage, bucket: str) -> None:
    uri = f"s3://{bucket}/w.bin"
    proxied.write_bytes(uri, b"old")
    assert proxied.fetch(uri).read_bytes() == b"old"
    proxied.write_bytes(uri, b"new!")
    assert proxied.fetch(uri).read_bytes() == b"new!"


def test_fetch_tree_is_cached_and_mirrors_the_prefix(
    proxy: FaultProxy, proxied: Storage, bucket: str
) -> None:
    base = f"s3://{bucket}/ckpt"
    for name in ("a.safetensors", "b/c.json", "b/d.json"):
        proxied.write_bytes(f"{base}/{name}", name.encode() * 100)
    root = proxied.fetch_tree(base)
    gets = proxy.count("GET", f"/{bucket}/ckpt/")
    assert gets == 3
    assert proxied.fetch_tree(base) == root
    assert proxy.count("GET", f"/{bucket}/ckpt/") == 3
    proxied.delete(f"{base}/b/d.json")
    proxied.write_bytes(f"{base}/e.bin", b"e")
    root = proxied.fetch_tree(base)
    files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    assert files == ["a.safetensors", "b/c.json", "e.bin"]
    assert proxy.count("GET", f"/{bucket}/ckpt/") == 4  # only the new file


_CHILD = """
import json, logging, sys, time
from pathlib import Path
from evaclip.s3server import EmbeddedS3
from evaclip.spec import StorageSpec
from evaclip.storage import Storage
endpoint, cache, uri, go, ready = sys.argv[1:6]
logging.basicConfig(level=logging.INFO, format="%(message)s")
st = Storage(StorageSpec(endpoint=endpoint), credentials=EmbeddedS3().credentials,
             cache_dir=cache)
Path(ready).touch()
while not Path(go).exists():
    time.sleep(0.005)
print(json.dumps(str(st.fetch(uri))))
"""


@pytest.mark.slow
def test_ranks_of_one_node_download_once(
    proxy: FaultProxy, proxied: Storage, bucket: str, tmp_path: Path
) -> None:
    uri = f"s3://{bucket}/big.bin"
    data = os.urandom(3 * 1024 * 1024)
    proxied.write_bytes(uri, data)
    proxy.latency = 0.2  # keep the first download in flight while the others arrive
    go = tmp_path / "go"
    args = [proxy.endpoint, str(tmp_path / "shared-cache"), uri, str(go)]
    ranks = [
        subprocess.Popen(
            [sys.executable, "-c", _CHILD, *args, str(tmp_path / f"ready-{rank}")],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in range(3)
    ]
    deadline = time.monotonic() + 60
    while not all((tmp_path / f"ready-{rank}").exists() for rank in range(3)):
        assert time.monotonic() < deadline, "ranks did not start"
        time.sleep(0.02)
    go.touch()  # all three fetch at the same moment
    outputs = [r.communicate(timeout=60) for r in ranks]
    assert all(r.returncode == 0 for r in ranks), [err for _, err in outputs]
    paths = {json.loads(out) for out, _ in outputs}
    assert len(paths) == 1
    assert sum("Waiting for another process" in err for _, err in outputs) >= 1
    assert Path(paths.pop()).read_bytes() == data
    assert _object_gets(proxy, bucket, "big.bin") == 1
    assert proxy.count("HEAD", f"/{bucket}/big.bin") >= 3  # each rank checked the object


def test_temp_files_of_a_killed_download_are_removed(proxied: Storage, bucket: str) -> None:
    uri = f"s3://{bucket}/w.bin"
    proxied.write_bytes(uri, b"w" * 2048)
    cached = proxied.fetch(uri)
    stale = cached.with_name(f".evaclip-tmp-{cached.name}.4242.deadbeef")
    stale.write_bytes(b"half a download")
    cached.unlink()  # as if the worker died mid-download
    assert proxied.fetch(uri).read_bytes() == b"w" * 2048
    assert sorted(p.name for p in cached.parent.iterdir()) == ["w.bin"]


def test_fetch_tree_logs_progress_once_per_tree(
    s3: EmbeddedS3, bucket: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import logging

    st = small_storage(s3, s3.endpoint, tmp_path / "cache", progress_interval=0.0)
    for i in range(6):
        st.write_bytes(f"s3://{bucket}/images/{i}.png", b"p" * 1000)
    with caplog.at_level(logging.INFO, logger="evaclip.storage"):
        st.fetch_tree(f"s3://{bucket}/images")
    lines = [r.getMessage() for r in caplog.records if r.name == "evaclip.storage"]
    assert lines[0] == f"Fetching 6 of 6 files (5.9 KiB) under s3://{bucket}/images into the cache."
    assert any("ETA" in m and "/s" in m for m in lines)
    assert not any("into the cache" in m and m.endswith(".png into the cache.") for m in lines)
