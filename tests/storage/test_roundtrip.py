"""Round trips through s3:// (moto on 127.0.0.1) and local paths with the same calls."""

from __future__ import annotations

from pathlib import Path

import pytest

from evaclip.errors import UserError
from evaclip.storage import Storage, is_s3, join_uri


@pytest.fixture(params=["s3", "local", "file-uri", "relative"])
def base(request, bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """The root URI of one test: on S3, or on local disk in each way of writing a path."""
    if request.param == "s3":
        return f"s3://{bucket}/run"
    if request.param == "file-uri":
        return f"file://{tmp_path}/store/run"
    if request.param == "relative":
        monkeypatch.chdir(tmp_path)
        return "./store/run"
    return str(tmp_path / "store" / "run")


def _tree(root: Path) -> dict[str, bytes]:
    files = {"a.txt": b"alpha", "sub/b.bin": bytes(range(256)) * 40, "sub/deep/c": b""}
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return files


def test_bytes_round_trip(storage: Storage, base: str) -> None:
    uri = join_uri(base, "x", "y.json")
    assert not storage.exists(uri)
    storage.write_bytes(uri, b'{"ok": 1}')
    assert storage.exists(uri)
    assert storage.exists(join_uri(base, "x"))  # a non-empty prefix exists too
    assert storage.read_bytes(uri) == b'{"ok": 1}'
    storage.delete(uri)
    assert not storage.exists(uri)


def test_tree_upload_list_download_fetch(storage: Storage, base: str, tmp_path: Path) -> None:
    src = tmp_path / "src"
    files = _tree(src)
    storage.upload_tree(src, base)
    listed = storage.list(base)
    assert [o.relpath for o in listed] == sorted(files)
    assert {o.relpath: o.size for o in listed} == {k: len(v) for k, v in files.items()}
    assert all(o.uri == join_uri(base, o.relpath) for o in listed)
    if is_s3(base):
        assert all(o.etag for o in listed)

    dest = storage.download(join_uri(base, "sub/b.bin"), tmp_path / "out" / "b.bin")
    assert dest.read_bytes() == files["sub/b.bin"]

    one = storage.fetch(join_uri(base, "a.txt"))
    assert one.read_bytes() == b"alpha"
    tree = storage.fetch_tree(base)
    assert {
        p.relative_to(tree).as_posix(): p.read_bytes() for p in tree.rglob("*") if p.is_file()
    } == files

    assert storage.delete_prefix(base) == len(files)
    assert storage.list(base) == []


def test_missing_input_is_a_user_error(storage: Storage, base: str) -> None:
    uri = join_uri(base, "nope.bin")
    with pytest.raises(UserError, match=r"^model\.weights: .*nope\.bin does not exist"):
        storage.read_bytes(uri, field="model.weights")
    with pytest.raises(UserError, match="nope.bin"):
        storage.fetch(uri, field="model.weights")


def test_missing_bucket_is_a_user_error_naming_output(storage: Storage) -> None:
    with pytest.raises(UserError, match=r"^output: bucket 'no-such-bucket-x' of s3://no-such"):
        storage.check_writable("s3://no-such-bucket-x/out")


def test_check_writable_passes_and_leaves_nothing(storage: Storage, base: str) -> None:
    storage.check_writable(base)
    assert storage.list(base) == []


def test_fetch_of_a_prefix_returns_the_tree(storage: Storage, bucket: str) -> None:
    storage.write_bytes(f"s3://{bucket}/ckpt/a.bin", b"a")
    storage.write_bytes(f"s3://{bucket}/ckpt/b/c.bin", b"c")
    root = storage.fetch(f"s3://{bucket}/ckpt")
    assert root == storage.fetch_tree(f"s3://{bucket}/ckpt/")
    assert (root / "b" / "c.bin").read_bytes() == b"c"


def test_embedded_store_refuses_an_invalid_bucket_name(s3) -> None:
    with pytest.raises(UserError, match=r"^s3://ab: 'ab' is not a valid bucket name"):
        s3.ensure_bucket("ab")
