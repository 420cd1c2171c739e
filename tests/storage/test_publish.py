"""publish: outputs count only once the manifest exists, and it is written last."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from evaclip.errors import UserError
from evaclip.s3server import FaultProxy
from evaclip.storage import MANIFEST_NAME, Storage, StorageError, join_uri


def _outputs(root: Path) -> dict[str, bytes]:
    files = {
        "head.safetensors": os.urandom(70_000),
        "adapters/lora.safetensors": os.urandom(30_000),
        "metrics.json": b'{"val_acc": 0.9}',
    }
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return files


@pytest.fixture(params=["s3", "local"])
def output(request, bucket: str, tmp_path: Path) -> str:
    if request.param == "s3":
        return f"s3://{bucket}/runs/r1"
    return str(tmp_path / "published" / "r1")


def test_publish_then_read(storage: Storage, output: str, tmp_path: Path) -> None:
    files = _outputs(tmp_path / "out")
    manifest_uri = storage.publish(tmp_path / "out", output, extra={"step": 40})
    assert manifest_uri == join_uri(output, MANIFEST_NAME)
    manifest = storage.read_published(output)
    assert manifest["extra"] == {"step": 40}
    entries = {e["path"]: e for e in manifest["files"]}
    assert sorted(entries) == sorted(files)
    for rel, data in files.items():
        assert entries[rel]["size"] == len(data)
        assert entries[rel]["sha256"] == hashlib.sha256(data).hexdigest()
        assert storage.read_bytes(join_uri(output, rel)) == data
    assert json.loads(storage.read_bytes(manifest_uri)) == manifest


def test_manifest_is_the_last_write(
    proxy: FaultProxy, proxied: Storage, bucket: str, tmp_path: Path
) -> None:
    _outputs(tmp_path / "out")
    proxied.publish(tmp_path / "out", f"s3://{bucket}/r")
    puts = [s.path for s in proxy.requests if s.method == "PUT"]
    assert puts[-1] == f"/{bucket}/r/{MANIFEST_NAME}"
    assert sum(MANIFEST_NAME in p for p in puts) == 1
    deletes = [i for i, s in enumerate(proxy.requests) if s.method == "DELETE"]
    first_put = next(i for i, s in enumerate(proxy.requests) if s.method == "PUT")
    assert deletes and deletes[0] < first_put  # the old manifest goes first


def test_interrupted_publish_leaves_no_manifest(
    proxy: FaultProxy, proxied: Storage, bucket: str, tmp_path: Path
) -> None:
    output = f"s3://{bucket}/r"
    _outputs(tmp_path / "out")
    proxied.publish(tmp_path / "out", output, extra={"attempt": 1})
    (tmp_path / "out" / "metrics.json").write_bytes(b'{"val_acc": 0.95}')
    proxy.storm(1.0, kinds=["500", "reset"], methods=["PUT"])
    with pytest.raises(StorageError):
        proxied.publish(tmp_path / "out", output, extra={"attempt": 2})
    proxy.calm()
    # The earlier, complete manifest was withdrawn before the new upload began.
    with pytest.raises(UserError, match=rf"^output: {output} has no {MANIFEST_NAME}"):
        proxied.read_published(output, field="output")


def test_unreadable_source_file_leaves_no_manifest(storage: Storage, output: str, tmp_path: Path):
    _outputs(tmp_path / "out")
    (tmp_path / "out" / "broken").symlink_to(tmp_path / "missing-target")
    with pytest.raises(UserError):
        storage.publish(tmp_path / "out", output)
    assert not storage.exists(join_uri(output, MANIFEST_NAME))


def test_read_published_refuses_a_prefix_without_manifest(storage: Storage, output: str) -> None:
    storage.write_bytes(join_uri(output, "head.safetensors"), b"partial")
    with pytest.raises(UserError, match="has no _SUCCESS.json"):
        storage.read_published(output, field="model.checkpoint")


def test_read_published_refuses_a_foreign_file(storage: Storage, output: str) -> None:
    storage.write_bytes(join_uri(output, MANIFEST_NAME), b'{"hello": 1}')
    with pytest.raises(UserError, match="not a manifest written by evaclip"):
        storage.read_published(output)


def test_include_existing_lists_files_other_nodes_uploaded(
    storage: Storage, output: str, tmp_path: Path
) -> None:
    other = tmp_path / "node1"
    (other / "shard-1.pt").parent.mkdir(parents=True)
    (other / "shard-1.pt").write_bytes(b"node one")
    storage.upload_tree(other, output)
    _outputs(tmp_path / "node0")
    storage.publish(tmp_path / "node0", output, manifest_name="COMPLETE", include_existing=True)
    manifest = storage.read_published(output, manifest_name="COMPLETE")
    entries = {e["path"]: e for e in manifest["files"]}
    assert entries["shard-1.pt"]["size"] == len(b"node one")
    assert entries["shard-1.pt"]["sha256"] == hashlib.sha256(b"node one").hexdigest()
    assert "head.safetensors" in entries and "COMPLETE" not in entries
