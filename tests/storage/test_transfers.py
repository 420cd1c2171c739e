"""Multipart transfers and retries over the real HTTP path, with faults injected."""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import pytest

from evaclip.s3server import EmbeddedS3, FaultProxy
from evaclip.storage import MiB, Storage, StorageError

from .conftest import small_storage


@pytest.fixture(scope="module")
def big_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """11 MiB: three parts of 5 MiB (5 + 5 + 1)."""
    path = tmp_path_factory.mktemp("big") / "weights.bin"
    path.write_bytes(os.urandom(11 * MiB))
    return path


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_multipart_upload_and_download_use_parallel_parts(
    s3: EmbeddedS3, proxy: FaultProxy, bucket: str, big_file: Path, tmp_path: Path
) -> None:
    st = small_storage(s3, proxy.endpoint, tmp_path / "cache")
    proxy.latency = 0.3  # parts overlap only if they are sent in parallel
    uri = f"s3://{bucket}/w/weights.bin"
    info = st.upload_file(big_file, uri)
    assert proxy.count("PUT", "partNumber=") == 3
    assert proxy.max_in_flight >= 2
    assert info.etag.endswith("-3") and info.size == 11 * MiB

    proxy.reset_counters()
    dest = st.download(uri, tmp_path / "dl" / "weights.bin")
    assert _sha(dest) == _sha(big_file)
    assert proxy.count("GET", f"/{bucket}/w/weights.bin") == 3  # ranged GETs
    assert proxy.max_in_flight >= 2
    assert _leftovers(dest.parent) == ["weights.bin"]


def test_download_logs_progress_with_rate_and_eta(
    s3: EmbeddedS3, bucket: str, big_file: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    st = small_storage(s3, s3.endpoint, tmp_path / "cache", progress_interval=0.0)
    uri = f"s3://{bucket}/weights.bin"
    st.upload_file(big_file, uri)
    with caplog.at_level(logging.INFO, logger="evaclip.storage"):
        st.download(uri, tmp_path / "w.bin")
    lines = [r.getMessage() for r in caplog.records if r.name == "evaclip.storage"]
    assert any("Downloading" in m and "/s" in m and "ETA" in m for m in lines), lines


def test_corrupt_content_is_refused(s3: EmbeddedS3, storage: Storage, bucket: str, tmp_path: Path):
    """An object whose bytes differ from its recorded sha256 never lands at the destination."""
    s3.client().put_object(
        Bucket=bucket, Key="bad.bin", Body=b"actual bytes", Metadata={"sha256": "0" * 64}
    )
    with pytest.raises(StorageError, match=r"could not download s3://.*/bad\.bin.*SHA-256"):
        storage.download(f"s3://{bucket}/bad.bin", tmp_path / "out" / "bad.bin")
    assert _leftovers(tmp_path / "out") == []


@pytest.mark.parametrize(
    ("kind", "methods"),
    [("503", ["GET"]), ("500", ["GET", "HEAD"]), ("reset", ["GET"])],
)
def test_download_survives_faults(
    proxy: FaultProxy,
    proxied: Storage,
    bucket: str,
    big_file: Path,
    tmp_path: Path,
    kind: str,
    methods: list[str],
) -> None:
    uri = f"s3://{bucket}/weights.bin"
    proxied.upload_file(big_file, uri)
    proxy.fail(2, kind, methods=methods, path_contains="/weights.bin")
    dest = proxied.download(uri, tmp_path / "weights.bin")
    assert proxy.faults[kind] == 2
    assert _sha(dest) == _sha(big_file)
    assert proxied.fetch(uri).read_bytes() == dest.read_bytes()


@pytest.mark.parametrize("kind", ["500", "reset"])  # SlowDown: see the download test
def test_upload_survives_faults(
    s3: EmbeddedS3, proxy: FaultProxy, proxied: Storage, bucket: str, big_file: Path, kind: str
) -> None:
    uri = f"s3://{bucket}/up/weights.bin"
    proxy.fail(1, kind, methods=["PUT"], path_contains="partNumber=")
    proxy.fail(1, kind, methods=["POST"])  # create or complete the multipart upload
    proxied.upload_file(big_file, uri)
    assert proxy.faults[kind] == 2
    got = s3.client().get_object(Bucket=bucket, Key="up/weights.bin")["Body"].read()
    assert hashlib.sha256(got).hexdigest() == _sha(big_file)


def test_small_requests_survive_faults(proxy: FaultProxy, proxied: Storage, bucket: str) -> None:
    uri = f"s3://{bucket}/cfg.json"
    proxy.fail(2, "reset", methods=["PUT"])
    proxied.write_bytes(uri, b'{"a": 1}' * 100)
    proxy.fail(1, "500", methods=["GET"])
    proxy.fail(1, "reset", methods=["GET"])
    assert proxied.read_bytes(uri) == b'{"a": 1}' * 100
    proxy.fail(2, "500", methods=["GET"], path_contains="list-type")
    assert [o.relpath for o in proxied.list(f"s3://{bucket}/")] == ["cfg.json"]
    assert sum(proxy.faults.values()) == 6


def test_random_storm_over_a_tree(
    s3: EmbeddedS3, proxy: FaultProxy, bucket: str, tmp_path: Path
) -> None:
    st = small_storage(s3, proxy.endpoint, tmp_path / "cache", max_attempts=4, transfer_attempts=4)
    src = tmp_path / "src"
    files = {f"shard-{i}.bin": os.urandom(50_000 + i) for i in range(8)}
    for name, data in files.items():
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_bytes(data)
    proxy.storm(0.25)
    st.upload_tree(src, f"s3://{bucket}/tree")
    root = st.fetch_tree(f"s3://{bucket}/tree")
    proxy.calm()
    assert sum(proxy.faults.values()) > 0
    assert {p.name: p.read_bytes() for p in root.iterdir()} == files


def test_permanent_storm_fails_clearly_and_leaves_nothing(
    s3: EmbeddedS3, proxy: FaultProxy, bucket: str, tmp_path: Path
) -> None:
    st = small_storage(s3, proxy.endpoint, tmp_path / "cache", max_attempts=2, transfer_attempts=2)
    uri = f"s3://{bucket}/w.bin"
    st.write_bytes(uri, os.urandom(200_000))
    proxy.storm(1.0, kinds=["500", "reset"], methods=["GET"])
    with pytest.raises(StorageError) as err:
        st.download(uri, tmp_path / "out" / "w.bin")
    message = str(err.value)
    assert message.startswith(f"could not download {uri} at {proxy.endpoint}: ")
    assert "\n" not in message
    assert _leftovers(tmp_path / "out") == []
    with pytest.raises(StorageError):
        st.fetch(uri)
    cached = list((tmp_path / "cache").rglob("*w.bin*"))
    assert cached == []


def test_corrupted_responses_are_caught_and_fetched_again(
    proxy: FaultProxy, proxied: Storage, bucket: str, big_file: Path, tmp_path: Path
) -> None:
    """Bytes damaged in flight fail the SHA-256 check; the transfer starts over."""
    uri = f"s3://{bucket}/weights.bin"
    proxied.upload_file(big_file, uri)
    proxy.fail(1, "corrupt", methods=["GET"], path_contains="/weights.bin")
    dest = proxied.download(uri, tmp_path / "weights.bin")
    assert proxy.faults["corrupt"] == 1
    assert _sha(dest) == _sha(big_file)
    assert proxy.count("GET", "/weights.bin") == 6  # three ranges, twice


@pytest.mark.parametrize("writer", ["evaclip", "other-tool"])
def test_corruption_storm_never_lands_a_damaged_file(
    s3: EmbeddedS3, proxy: FaultProxy, proxied: Storage, bucket: str, tmp_path: Path, writer: str
) -> None:
    """Checked by the recorded SHA-256, or by the MD5 ETag for objects written elsewhere."""
    uri = f"s3://{bucket}/w.bin"
    data = os.urandom(100_000)
    if writer == "evaclip":
        proxied.write_bytes(uri, data)
    else:
        s3.client().put_object(Bucket=bucket, Key="w.bin", Body=data)
    check = "SHA-256 differs" if writer == "evaclip" else "MD5 differs"
    proxy.storm(1.0, kinds=["corrupt"], methods=["GET"])
    with pytest.raises(StorageError, match=check):
        proxied.fetch(uri)
    with pytest.raises(StorageError, match=check):
        proxied.read_bytes(uri)
    with pytest.raises(StorageError, match=check):
        proxied.download(uri, tmp_path / "out" / "w.bin")
    assert list(tmp_path.rglob("w.bin*")) == []
    proxy.calm()
    assert proxied.fetch(uri).read_bytes() == data
