"""User mistakes read as one line naming field and URI; credentials never show up."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from evaclip.errors import UserError
from evaclip.s3server import EmbeddedS3, FaultProxy
from evaclip.spec import StorageSpec
from evaclip.storage import Storage, StorageError

ACCESS_KEY_ID = "AKIAEVACLIPTESTKEY42"
SECRET_ACCESS_KEY = "wJalrXUtnFEMI/K7MDENG/evaclipTopSecretValue"
SESSION_TOKEN = "FwoGZXIvYXdzEvaclipSessionTokenValue=="
SECRETS = (ACCESS_KEY_ID, SECRET_ACCESS_KEY, SESSION_TOKEN)


def test_check_writable_names_output_for_a_missing_bucket(storage: Storage) -> None:
    with pytest.raises(UserError) as err:
        storage.check_writable("s3://evaclip-missing-bucket/runs/r1")
    assert str(err.value) == (
        "output: bucket 'evaclip-missing-bucket' of s3://evaclip-missing-bucket/runs/r1 "
        "does not exist; create it or fix the URI"
    )


def test_check_writable_refuses_a_path_under_a_file(storage: Storage, tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match=r"^output: cannot write to .*file/out"):
        storage.check_writable(str(tmp_path / "file" / "out"))


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes to read-only directories")
def test_check_writable_refuses_a_read_only_directory(storage: Storage, tmp_path: Path) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        with pytest.raises(UserError, match=r"^output: cannot write to .*ro/out"):
            storage.check_writable(str(ro / "out"))
    finally:
        ro.chmod(0o755)


def test_unsupported_scheme_and_bucketless_uri(storage: Storage) -> None:
    with pytest.raises(UserError, match=r"gs:// is not supported"):
        storage.read_bytes("gs://bucket/key")
    with pytest.raises(UserError, match="needs a bucket name"):
        storage.read_bytes("s3:///key")


def test_missing_prefix_for_fetch_tree(storage: Storage, bucket: str) -> None:
    with pytest.raises(UserError, match=rf"^data\.train: nothing is stored under s3://{bucket}/x"):
        storage.fetch_tree(f"s3://{bucket}/x", field="data.train")


def test_no_credential_value_in_logs_reprs_or_errors(
    s3: EmbeddedS3,
    proxy: FaultProxy,
    bucket: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_ACCESS_KEY)
    monkeypatch.setenv("AWS_SESSION_TOKEN", SESSION_TOKEN)
    monkeypatch.setenv("EVACLIP_S3_ENDPOINT", proxy.endpoint)
    caplog.set_level(logging.DEBUG)
    st = Storage.from_env(
        StorageSpec(),
        cache_dir=tmp_path / "cache",
        transfer_attempts=2,
        max_attempts=2,
        backoff=0.01,
        progress_interval=0.0,
    )
    assert st.endpoint == proxy.endpoint
    texts = [repr(st), str(vars(st))]
    uri = f"s3://{bucket}/w.bin"
    st.write_bytes(uri, os.urandom(10_000))
    st.fetch(uri)
    st.publish(st.fetch_tree(f"s3://{bucket}/"), f"s3://{bucket}/out")
    proxy.fail(1, "reset", methods=["GET"])
    st.read_bytes(uri)  # retried once, with a warning
    for call in (
        lambda: st.read_bytes(f"s3://{bucket}/missing"),
        lambda: st.check_writable("s3://evaclip-missing-bucket/x"),
    ):
        with pytest.raises(UserError) as err:
            call()
        texts.append(str(err.value))
    proxy.storm(1.0, kinds=["500"])
    with pytest.raises(StorageError) as err:
        st.read_bytes(uri)
    texts.append(str(err.value))
    texts.append(repr(err.value.__cause__))
    proxy.calm()

    texts += [r.getMessage() for r in caplog.records]
    assert any("Retrying read" in t for t in texts)  # logging was really captured
    assert len(caplog.records) > 5
    leaked = [t for t in texts for secret in SECRETS if secret in t]
    assert leaked == []


def test_endpoint_must_be_a_url(monkeypatch: pytest.MonkeyPatch) -> None:
    # The spec refuses such an endpoint itself; one from the environment or a caller is
    # checked by the storage layer.
    with pytest.raises(ValueError, match="http:// or https:// URL"):
        StorageSpec(endpoint="minio:9000")
    with pytest.raises(UserError, match=r"^storage\.endpoint: got 'minio:9000'; an S3 endpoint"):
        Storage(endpoint="minio:9000")
    monkeypatch.setenv("EVACLIP_S3_ENDPOINT", "http://127.0.0.1:9/")
    assert Storage().endpoint == "http://127.0.0.1:9"


def test_download_larger_than_free_space_fails_before_transfer(
    s3: EmbeddedS3, proxy: FaultProxy, proxied: Storage, bucket: str, tmp_path: Path, monkeypatch
) -> None:
    import shutil

    proxied.write_bytes(f"s3://{bucket}/w.bin", b"x" * 4096)
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda _p: usage._replace(free=1000))
    with pytest.raises(StorageError, match=r"not enough disk space .* needs 4\.0 KiB"):
        proxied.fetch(f"s3://{bucket}/w.bin")
    assert proxy.count("GET", f"/{bucket}/w.bin") == 0


def test_explicit_credentials_stay_hidden_and_storage_pickles(
    s3: EmbeddedS3, bucket: str, tmp_path: Path
) -> None:
    import pickle

    st = Storage(
        StorageSpec(endpoint=s3.endpoint),
        credentials={
            "aws_access_key_id": ACCESS_KEY_ID,
            "aws_secret_access_key": SECRET_ACCESS_KEY,
        },
        cache_dir=tmp_path / "cache",
    )
    st.write_bytes(f"s3://{bucket}/k", b"v")
    shown = repr(st) + str(vars(st)) + repr(vars(st))
    assert not [s for s in SECRETS if s in shown]
    clone = pickle.loads(pickle.dumps(st))  # e.g. into a spawned data-loading worker
    assert clone.read_bytes(f"s3://{bucket}/k") == b"v"


def test_endpoint_with_credentials_is_refused_without_echoing_them() -> None:
    with pytest.raises(UserError) as err:
        Storage(StorageSpec(endpoint=f"https://{ACCESS_KEY_ID}:{SECRET_ACCESS_KEY}@minio:9000"))
    assert str(err.value).startswith("storage.endpoint: credentials are never accepted")
    assert not [s for s in SECRETS if s in str(err.value)]


@pytest.mark.parametrize(
    ("method", "permission"),
    [("PUT", "s3:PutObject"), ("HEAD", "s3:GetObject"), ("DELETE", "s3:DeleteObject")],
)
def test_check_writable_names_the_missing_permission(
    proxy: FaultProxy, proxied: Storage, bucket: str, method: str, permission: str
) -> None:
    proxy.fail(1, "403", methods=[method])
    with pytest.raises(UserError) as err:
        proxied.check_writable(f"s3://{bucket}/runs/r1")
    assert str(err.value).startswith("output: access denied to ")
    assert f"s3://{bucket}/runs/r1; grant the job's credentials {permission} there" in str(
        err.value
    )
    assert proxy.faults["403"] == 1


def test_denied_read_is_a_user_error_and_not_retried(
    proxy: FaultProxy, proxied: Storage, bucket: str
) -> None:
    proxied.write_bytes(f"s3://{bucket}/labels.csv", b"a,b")
    proxy.fail(5, "403", methods=["GET"])
    with pytest.raises(UserError, match=r"^data\.labels: access denied to read .*s3:GetObject"):
        proxied.read_bytes(f"s3://{bucket}/labels.csv", field="data.labels")
    assert proxy.faults["403"] == 1


def test_unusable_cache_dir_is_named(s3: EmbeddedS3, bucket: str, tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    st = s3.storage(cache_dir=tmp_path / "file" / "cache")
    st.write_bytes(f"s3://{bucket}/w.bin", b"w")
    with pytest.raises(
        StorageError, match=r"cannot use the cache at .*file/cache .*EVACLIP_CACHE_DIR"
    ):
        st.fetch(f"s3://{bucket}/w.bin")
