"""Object storage for weights, data and outputs: s3:// URIs and local paths, one interface.

Every method takes either an ``s3://bucket/key`` URI or a local path (``/abs``, ``./rel``,
``file:///abs``) and means the same thing for both, so a run on a laptop and a run in a
cluster share one code path.

What a user can rely on:

* Whole-file transfers are verified (size, plus SHA-256 when the object carries the
  ``x-amz-meta-sha256`` that every upload from here sets, else the MD5 ETag of single-part,
  unencrypted-or-SSE-S3 objects) and land through a temporary file and a rename, so a failed
  or interrupted transfer never leaves a partial destination file. Objects uploaded
  elsewhere in several parts and without the SHA-256 metadata are checked by size only.
* ``fetch`` keeps a node-wide cache (``EVACLIP_CACHE_DIR``, default ``~/.cache/evaclip``).
  The ranks of one node share one copy: a file lock lets one process download while the
  others wait; a restarted worker finds the copy and the size and ETag recorded beside it.
* ``publish`` makes outputs count only once complete: the manifest is removed first and
  written last, after every file was uploaded and checked.
* Mistakes that are the user's (missing bucket or key, no permission, rejected keys) raise
  :class:`evaclip.errors.UserError` with one line naming the field and the URI. Transient
  failures (5xx, SlowDown, connection resets) are retried by botocore's adaptive mode and,
  for whole transfers, by a short outer retry with backoff; what still fails raises
  :class:`StorageError`.
* Credentials come from ``Storage(..., credentials=...)`` or the standard AWS chain
  (environment, web identity token with role ARN, profile). Their values never appear in
  reprs, exceptions or log records from this module; botocore's own DEBUG logs print request
  headers, so its loggers are held at INFO unless a level was set on them explicitly.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import random
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlparse

from evaclip.errors import UserError

if TYPE_CHECKING:
    from evaclip.spec import StorageSpec

log = logging.getLogger("evaclip.storage")

MiB = 1 << 20
MANIFEST_NAME = "_SUCCESS.json"
MANIFEST_FORMAT = "evaclip.io/published/v1"
ENDPOINT_ENV = "EVACLIP_S3_ENDPOINT"
CACHE_ENV = "EVACLIP_CACHE_DIR"
_TMP_PREFIX = ".evaclip-tmp-"
_SHA256_META = "sha256"
_BLOCK = 8 * MiB
_T = TypeVar("_T")

# Error codes that mean the user has something to fix; never retried.
_MISSING_CODES = {"NoSuchKey", "404", "NotFound"}
_DENIED_CODES = {"AccessDenied", "403", "Forbidden", "AllAccessDisabled", "AccountProblem"}
_BAD_KEY_CODES = {
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "ExpiredToken",
    "InvalidToken",
    "TokenRefreshRequired",
    "InvalidClientTokenId",
}
# Error codes worth another try even when botocore's own retries ran out.
_TRANSIENT_CODES = {
    "SlowDown",
    "Throttling",
    "ThrottlingException",
    "RequestTimeout",
    "RequestTimeoutException",
    "InternalError",
    "ServiceUnavailable",
    "RequestLimitExceeded",
    "BandwidthLimitExceeded",
    "PreconditionFailed",  # the object changed between HEAD and GET: start over
    "500",
    "502",
    "503",
    "504",
}


class StorageError(RuntimeError):
    """A transfer that kept failing for reasons outside the user's input (after retries)."""


class _IntegrityError(Exception):
    """What arrived differs from what the store says it holds; worth a fresh try."""


@dataclass(frozen=True)
class ObjectInfo:
    """One stored object (or local file) found by :meth:`Storage.list`.

    ``key`` is the full S3 key (or the local file path); ``relpath`` is the path relative
    to the listed prefix, with ``/`` separators. ``etag`` is None for local files.
    """

    uri: str
    key: str
    relpath: str
    size: int
    etag: str | None = None
    sha256: str | None = None  # known for files this process uploaded


@dataclass(frozen=True)
class _Head:
    """What a HEAD says about one object: enough to verify a download of it."""

    size: int
    etag: str
    sha256: str | None
    md5_based: bool  # no KMS or customer-key encryption: the ETag derives from MD5s

    @property
    def md5_etag(self) -> bool:
        """The ETag is the MD5 of the whole content (a single-part upload)."""
        return self.md5_based and len(self.etag) == 32 and "-" not in self.etag


# --------------------------------------------------------------------------- URIs


def is_s3(uri: str | os.PathLike[str]) -> bool:
    """True for ``s3://`` URIs; everything else is a local path."""
    return str(uri).startswith("s3://")


def join_uri(base: str | os.PathLike[str], *parts: str) -> str:
    """Join path parts onto a URI or local path with ``/`` (no normalisation of ``..``)."""
    text = str(base)
    parts = tuple(p.strip("/") for p in parts if p and p.strip("/"))
    if is_s3(text) or text.startswith("file://"):
        return "/".join([text.rstrip("/"), *parts]) if parts else text
    return str(Path(text).joinpath(*parts))


def _split_s3(uri: str) -> tuple[str, str]:
    """``s3://bucket/a/b`` -> ("bucket", "a/b")."""
    rest = uri[len("s3://") :]
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise UserError(f"{uri}: an s3:// URI needs a bucket name, as in s3://bucket/path")
    return bucket, key


def _local_path(uri: str | os.PathLike[str]) -> Path:
    text = str(uri)
    if text.startswith("file://"):
        parsed = urlparse(text)
        return Path(parsed.netloc + parsed.path) if parsed.netloc == "." else Path(parsed.path)
    if "://" in text:
        scheme = text.split("://", 1)[0]
        raise UserError(f"{text}: URI scheme {scheme}:// is not supported; use s3:// or a path")
    return Path(text).expanduser()


def _dir_prefix(key: str) -> str:
    """The key prefix of everything "inside" a key used as a folder."""
    return key if not key or key.endswith("/") else key + "/"


def _named(field: str | None, text: str) -> str:
    return f"{field}: {text}" if field else text


# --------------------------------------------------------------------------- digests


def _digest(path: Path, *, md5: bool = False, sha256: bool = False, part_size: int = 0) -> dict:
    """Hash a file in one pass: MD5, SHA-256, and the multipart ETag for ``part_size`` parts."""
    h_md5 = hashlib.md5(usedforsecurity=False) if md5 else None
    h_sha = hashlib.sha256() if sha256 else None
    part_md5s: list[bytes] = []
    part = hashlib.md5(usedforsecurity=False) if part_size else None
    in_part = 0
    with open(path, "rb") as fh:
        while block := fh.read(_BLOCK if not part_size else min(_BLOCK, part_size - in_part)):
            if h_md5:
                h_md5.update(block)
            if h_sha:
                h_sha.update(block)
            if part is not None:
                part.update(block)
                in_part += len(block)
                if in_part == part_size:
                    part_md5s.append(part.digest())
                    part, in_part = hashlib.md5(usedforsecurity=False), 0
    out: dict[str, str] = {}
    if h_md5:
        out["md5"] = h_md5.hexdigest()
    if h_sha:
        out["sha256"] = h_sha.hexdigest()
    if part is not None:
        if in_part:
            part_md5s.append(part.digest())
        joined = hashlib.md5(b"".join(part_md5s), usedforsecurity=False).hexdigest()
        out["multipart_etag"] = f"{joined}-{len(part_md5s)}"
    return out


def _verify_local(path: Path, head: _Head) -> None:
    """Raise _IntegrityError unless ``path`` holds what ``head`` describes."""
    size = path.stat().st_size
    if size != head.size:
        raise _IntegrityError(f"got {size} bytes, expected {head.size}")
    if head.sha256:
        got = _digest(path, sha256=True)["sha256"]
        if got != head.sha256:
            raise _IntegrityError("SHA-256 differs from the object's recorded sha256")
    elif head.md5_etag:
        got = _digest(path, md5=True)["md5"]
        if got != head.etag:
            raise _IntegrityError("MD5 differs from the object's ETag")


def _head_of(resp: dict[str, Any]) -> _Head:
    """What a HEAD or GET response says about the object's size and content."""
    sse = resp.get("ServerSideEncryption") or ""
    return _Head(
        size=int(resp["ContentLength"]),
        etag=str(resp.get("ETag", "")).strip('"'),
        sha256=(resp.get("Metadata") or {}).get(_SHA256_META),
        md5_based=sse in ("", "AES256") and not resp.get("SSECustomerAlgorithm"),
    )


def _verify_bytes(data: bytes, head: _Head) -> None:
    """Raise _IntegrityError unless ``data`` is what ``head`` describes."""
    if len(data) != head.size:
        raise _IntegrityError(f"got {len(data)} bytes, expected {head.size}")
    if head.sha256 and hashlib.sha256(data).hexdigest() != head.sha256:
        raise _IntegrityError("SHA-256 differs from the object's recorded sha256")
    if not head.sha256 and head.md5_etag:
        if hashlib.md5(data, usedforsecurity=False).hexdigest() != head.etag:
            raise _IntegrityError("MD5 differs from the object's ETag")


def _fsync_replace(tmp: Path, dest: Path) -> None:
    with open(tmp, "rb+") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, dest)


def _tmp_beside(dest: Path) -> Path:
    return dest.with_name(f"{_TMP_PREFIX}{dest.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}")


@contextlib.contextmanager
def _temp_for(dest: Path) -> Iterator[Path]:
    """A temporary path beside ``dest``, removed unless the caller renamed it into place."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_beside(dest)
    try:
        yield tmp
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def _local_io(uri: str, field: str | None, action: str) -> Iterator[None]:
    """Turn local file-system failures into a UserError (path, permissions) or StorageError."""
    try:
        yield
    except (UserError, StorageError, _IntegrityError):
        raise
    except FileNotFoundError:
        raise UserError(_named(field, f"{uri} does not exist; check the path")) from None
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        user_side = (PermissionError, IsADirectoryError, NotADirectoryError)
        if isinstance(exc, user_side) or exc.errno == errno.EROFS:
            raise UserError(
                _named(
                    field, f"cannot {action} {uri} ({reason}); check the path and its permissions"
                )
            ) from None
        raise StorageError(_named(field, f"could not {action} {uri}: {reason}")) from exc


def _copy_hashed(src: Path, tmp: Path) -> str:
    """Copy ``src`` to ``tmp`` and return its SHA-256, reading it once."""
    sha = hashlib.sha256()
    with open(src, "rb") as fin, open(tmp, "wb") as fout:
        while block := fin.read(_BLOCK):
            sha.update(block)
            fout.write(block)
    return sha.hexdigest()


def _local_files(root: Path) -> list[tuple[str, Path]]:
    """Files under ``root`` as (relpath with /, path), sorted; temp files skipped."""
    if root.is_file():
        return [(root.name, root)]
    found = []
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            if name.startswith(_TMP_PREFIX):
                continue
            path = Path(dirpath) / name
            found.append((path.relative_to(root).as_posix(), path))
    return sorted(found)


def _run_parallel(calls: list[Callable[[], _T]], workers: int, name: str) -> list[_T]:
    """Run calls on a thread pool; on the first failure drop the queued ones and raise it."""
    with concurrent.futures.ThreadPoolExecutor(workers, name) as pool:
        futures = [pool.submit(call) for call in calls]
        try:
            return [f.result() for f in futures]
        except BaseException:
            for future in futures:
                future.cancel()
            raise


_warned_no_flock = False
_loader: Any = None
_loader_lock = threading.Lock()


def _core_session() -> Any:
    """A new botocore session sharing one loader of service models per process.

    Each session keeps its own credentials; only the parsed API descriptions are shared,
    which makes a new client about ten times cheaper.
    """
    import botocore.loaders
    import botocore.session

    global _loader
    with _loader_lock:
        if _loader is None:
            _loader = botocore.loaders.create_loader()
    core = botocore.session.get_session()
    core.register_component("data_loader", _loader)
    return core


def _flock(fh: Any, uri: str, quiet: bool) -> bool:
    """Take an exclusive lock on ``fh``, waiting for its holder; False where unsupported."""
    global _warned_no_flock
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        level = logging.DEBUG if quiet else logging.INFO
        log.log(level, "Waiting for another process on this node to fetch %s.", uri)
        fcntl.flock(fh, fcntl.LOCK_EX)
        return True
    except OSError as exc:
        if not _warned_no_flock:
            _warned_no_flock = True
            log.warning(
                "The cache's file system does not support locks (%s); ranks fetch on their own.",
                exc.strerror,
            )
        return False


# --------------------------------------------------------------------------- progress


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


class _Progress:
    """Byte-count callback for transfers; logs rate and ETA at most every ``interval`` s."""

    def __init__(self, verb: str, uri: str, total: int, interval: float) -> None:
        self.verb, self.uri, self.total, self.interval = verb, uri, total, interval
        self.done = 0
        self.start = self.last = time.monotonic()
        self._lock = threading.Lock()

    def __call__(self, amount: int) -> None:
        with self._lock:
            self.done += amount
            now = time.monotonic()
            if now - self.last < self.interval or not self.total:
                return
            self.last = now
            elapsed = now - self.start
        rate = self.done / max(elapsed, 1e-6)
        eta = (self.total - self.done) / rate if rate > 0 else float("inf")
        log.info(
            "%s %s: %s of %s (%.0f%%, %s/s, ETA %s).",
            self.verb,
            self.uri,
            _human(self.done),
            _human(self.total),
            100 * self.done / self.total,
            _human(rate),
            _duration(eta),
        )

    def finished(self) -> None:
        elapsed = time.monotonic() - self.start
        if elapsed >= self.interval:
            log.info(
                "%s %s finished: %s in %s (%s/s).",
                self.verb,
                self.uri,
                _human(self.total),
                _duration(elapsed),
                _human(self.total / max(elapsed, 1e-6)),
            )


# --------------------------------------------------------------------------- errors


def _error_code(exc: BaseException) -> tuple[str, int]:
    from botocore.exceptions import ClientError

    if isinstance(exc, ClientError):
        err = exc.response.get("Error", {})
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        return str(err.get("Code", "")), int(status or 0)
    return "", 0


def _unwrap(exc: BaseException) -> BaseException:
    """boto3 wraps upload failures in S3UploadFailedError; find the error underneath."""
    from boto3.exceptions import S3UploadFailedError

    while isinstance(exc, S3UploadFailedError) and (exc.__cause__ or exc.__context__):
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    return exc


def _is_transient(exc: BaseException) -> bool:
    """Errors a fresh attempt may get past: server trouble, throttling, broken connections."""
    import botocore.exceptions as bex
    import urllib3.exceptions as uex
    from s3transfer.exceptions import RetriesExceededError

    exc = _unwrap(exc)
    code, status = _error_code(exc)
    if code or status:
        return code in _TRANSIENT_CODES or status >= 500
    transient = (
        _IntegrityError,
        bex.ConnectionError,
        bex.HTTPClientError,
        bex.ResponseStreamingError,
        bex.IncompleteReadError,
        uex.ProtocolError,
        uex.ReadTimeoutError,
        RetriesExceededError,
        ConnectionError,
        TimeoutError,
    )
    return isinstance(exc, transient)


def _is_storage_failure(exc: BaseException) -> bool:
    """Errors raised by the SDK, the network or a check: reported as StorageError."""
    import boto3.exceptions as b3ex
    import botocore.exceptions as bex
    from s3transfer.exceptions import RetriesExceededError

    kinds = (
        bex.BotoCoreError,
        bex.ClientError,
        b3ex.Boto3Error,
        RetriesExceededError,
        OSError,
        _IntegrityError,
    )
    return _is_transient(exc) or isinstance(exc, kinds)


def _brief(exc: BaseException) -> str:
    """One line about an error, free of request details."""
    exc = _unwrap(exc)
    code, status = _error_code(exc)
    if code or status:
        message = getattr(exc, "response", {}).get("Error", {}).get("Message", "")
        return f"{code or status} ({status})" + (f": {message}" if message else "")
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


# The IAM permission each action needs, for access-denied messages.
_PERMISSIONS = {
    "read": "s3:GetObject",
    "download": "s3:GetObject",
    "look up": "s3:GetObject",
    "read back": "s3:GetObject",
    "list": "s3:ListBucket",
    "write": "s3:PutObject",
    "write to": "s3:PutObject",
    "upload to": "s3:PutObject",
    "delete": "s3:DeleteObject",
    "delete from": "s3:DeleteObject",
    "delete under": "s3:DeleteObject",
}


def _user_error(exc: BaseException, uri: str, field: str | None, action: str) -> UserError | None:
    """The one-line UserError for an error that is the user's to fix, else None."""
    import botocore.exceptions as bex

    exc = _unwrap(exc)
    if isinstance(exc, bex.NoCredentialsError | bex.PartialCredentialsError):
        return UserError(
            f"storage.credentialsSecret: no S3 credentials found to {action} {uri}; name a "
            "Secret with the access keys or give the pod a workload identity"
        )
    code, _status = _error_code(exc)
    bucket = _split_s3(uri)[0] if is_s3(uri) else ""
    if code == "NoSuchBucket":
        return UserError(
            _named(field, f"bucket '{bucket}' of {uri} does not exist; create it or fix the URI")
        )
    if code in _MISSING_CODES:
        return UserError(_named(field, f"{uri} does not exist; check the URI"))
    if code in _DENIED_CODES:
        permission = _PERMISSIONS.get(action, "that permission")
        return UserError(
            _named(
                field,
                f"access denied to {action} {uri}; grant the job's credentials {permission} "
                "there or choose another URI",
            )
        )
    if code in _BAD_KEY_CODES:
        return UserError(
            f"storage.credentialsSecret: the S3 credentials were rejected ({code}) while trying "
            f"to {action} {uri}; check the access keys in the Secret"
        )
    if code == "InvalidBucketName":
        return UserError(_named(field, f"'{bucket}' in {uri} is not a valid bucket name"))
    return None


# --------------------------------------------------------------------------- logging hygiene

_NOISY_LOGGERS = ("botocore", "boto3", "s3transfer", "urllib3")


def _quiet_sdk_loggers() -> None:
    """Hold the AWS SDK loggers at INFO (their DEBUG lines print request headers)."""
    for name in _NOISY_LOGGERS:
        logger = logging.getLogger(name)
        if logger.level == logging.NOTSET:
            logger.setLevel(logging.INFO)


# --------------------------------------------------------------------------- Storage


def _endpoint(given: str | None) -> str | None:
    """The endpoint to use: given, else EVACLIP_S3_ENDPOINT, else boto3's own variables."""
    for source, value in (
        ("storage.endpoint", given),
        (ENDPOINT_ENV, os.environ.get(ENDPOINT_ENV)),
        ("AWS_ENDPOINT_URL_S3", os.environ.get("AWS_ENDPOINT_URL_S3")),
        ("AWS_ENDPOINT_URL", os.environ.get("AWS_ENDPOINT_URL")),
    ):
        if value and value.strip():
            value = value.strip().rstrip("/")
            parsed = urlparse(value)
            if "@" in value:
                raise UserError(
                    f"{source}: credentials are never accepted in the endpoint URL; put them in "
                    "a Secret and set storage.credentialsSecret"
                )
            if parsed.scheme not in ("http", "https") or not parsed.hostname:
                raise UserError(
                    f"{source}: got {value!r}; an S3 endpoint is an http:// or https:// URL, "
                    "as in https://minio.example:9000"
                )
            return value
    return None


def _free_space_check(dest: Path, size: int, uri: str) -> None:
    """Fail early, before a long download, when the destination's disk cannot hold it."""
    folder = dest.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    free = shutil.disk_usage(folder).free
    if size > free:
        raise StorageError(
            f"not enough disk space for {uri} at {dest.parent}: it needs {_human(size)}, "
            f"{_human(free)} is free; free space or point {CACHE_ENV} to a larger volume"
        )


def _remove_stale_temps(dest: Path) -> None:
    """Drop temp files of earlier attempts at ``dest`` that were killed before renaming.

    Only called while holding the cache lock of ``dest``, when no one else writes them.
    """
    if dest.parent.is_dir():
        for stale in dest.parent.glob(f"{_TMP_PREFIX}{dest.name}.*"):
            stale.unlink(missing_ok=True)


class _Credentials(dict):
    """Access keys handed to boto3; shown as hidden in every repr."""

    def __repr__(self) -> str:
        return "<credentials hidden>"

    __str__ = __repr__


def _env_number(name: str, default: float, kind: type = float) -> Any:
    value = os.environ.get(name, "").strip()
    if not value:
        return default
    try:
        number = kind(value)
    except ValueError:
        number = -1
    if number <= 0 and not (kind is float and number == 0):
        raise UserError(f"{name}: got {value!r}; set a positive {kind.__name__} or unset it")
    return number


def _env_int(name: str, default: int) -> int:
    return _env_number(name, default, int)


def _env_float(name: str, default: float) -> float:
    return _env_number(name, default, float)


class Storage:
    """Read, write, cache and publish objects under s3:// URIs or local paths.

    ``spec`` is the manifest's ``spec.storage`` (endpoint, region, maxConcurrency); the
    endpoint falls back to ``EVACLIP_S3_ENDPOINT``. ``credentials`` is an optional mapping
    with ``aws_access_key_id``, ``aws_secret_access_key`` and ``aws_session_token``; without
    it boto3's standard chain is used. Tunables (keyword or environment):
    ``multipart_threshold``/``multipart_chunksize`` (``EVACLIP_S3_MULTIPART_THRESHOLD_MIB``,
    ``EVACLIP_S3_MULTIPART_CHUNKSIZE_MIB``, default 64 MiB each), ``max_attempts`` of
    botocore (``EVACLIP_S3_MAX_ATTEMPTS``, 8), ``transfer_attempts`` of the outer retry
    (``EVACLIP_S3_TRANSFER_ATTEMPTS``, 4), ``backoff`` base seconds (1.0),
    ``connect_timeout``/``read_timeout`` (10 s / 60 s), ``cache_dir`` and
    ``progress_interval`` (``EVACLIP_PROGRESS_INTERVAL``, 10 s).
    """

    def __init__(
        self,
        spec: StorageSpec | None = None,
        *,
        credentials: dict[str, str] | None = None,
        endpoint: str | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
        multipart_threshold: int | None = None,
        multipart_chunksize: int | None = None,
        max_attempts: int | None = None,
        transfer_attempts: int | None = None,
        backoff: float = 1.0,
        connect_timeout: float = 10.0,
        read_timeout: float = 60.0,
        progress_interval: float | None = None,
    ) -> None:
        from evaclip.spec import StorageSpec

        self.spec = spec if spec is not None else StorageSpec()
        self.endpoint = _endpoint(endpoint or self.spec.endpoint)
        self.region = self.spec.region
        self.max_concurrency = self.spec.max_concurrency
        self._credentials = _Credentials(credentials) if credentials else None
        self.cache_dir = Path(
            cache_dir or os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "evaclip"
        ).expanduser()
        self.multipart_threshold = multipart_threshold or (
            _env_int("EVACLIP_S3_MULTIPART_THRESHOLD_MIB", 64) * MiB
        )
        self.multipart_chunksize = multipart_chunksize or (
            _env_int("EVACLIP_S3_MULTIPART_CHUNKSIZE_MIB", 64) * MiB
        )
        self.max_attempts = max_attempts or _env_int("EVACLIP_S3_MAX_ATTEMPTS", 8)
        self.transfer_attempts = transfer_attempts or _env_int("EVACLIP_S3_TRANSFER_ATTEMPTS", 4)
        self.backoff = backoff
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.progress_interval = (
            progress_interval
            if progress_interval is not None
            else _env_float("EVACLIP_PROGRESS_INTERVAL", 10.0)
        )
        self._client_obj: Any = None
        self._client_pid = 0
        self._client_lock = threading.Lock()

    @classmethod
    def from_env(cls, spec: StorageSpec | None = None, **kwargs: Any) -> Storage:
        """A Storage with credentials from the standard AWS chain and env overrides.

        The chain covers ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``/``AWS_SESSION_TOKEN``
        (as a Secret mounted into the pod sets them), ``AWS_WEB_IDENTITY_TOKEN_FILE`` with
        ``AWS_ROLE_ARN`` (IRSA) and profiles. ``EVACLIP_S3_ENDPOINT`` names the endpoint when
        the spec does not.
        """
        return cls(spec, **kwargs)

    def __repr__(self) -> str:
        where = self.endpoint or "AWS"
        return f"Storage(endpoint={where!r}, region={self.region!r})"

    # ----------------------------------------------------------------- boto3 plumbing

    def __getstate__(self) -> dict[str, Any]:
        """Pickle without the client and its lock (for worker processes started by spawn)."""
        state = dict(self.__dict__)
        state.update(_client_obj=None, _client_pid=0, _client_lock=None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._client_lock = threading.Lock()

    @property
    def _client(self) -> Any:
        """The S3 client of this process (a forked child makes its own: sockets don't fork)."""
        with self._client_lock:
            if self._client_obj is None or self._client_pid != os.getpid():
                self._client_obj = self._make_client()
                self._client_pid = os.getpid()
            return self._client_obj

    def _make_client(self) -> Any:
        import boto3
        from botocore.config import Config

        _quiet_sdk_loggers()
        options: dict[str, Any] = {
            "region_name": self.region,
            "retries": {"mode": "adaptive", "max_attempts": self.max_attempts},
            "connect_timeout": self.connect_timeout,
            "read_timeout": self.read_timeout,
            "max_pool_connections": max(10, 2 * self.max_concurrency),
            "user_agent_extra": "evaclip-operator",
        }
        if self.endpoint:
            # S3-compatible stores (MinIO, Ceph) want path-style URLs and often reject the
            # newer default request checksums.
            options["s3"] = {"addressing_style": "path"}
            options["request_checksum_calculation"] = "when_required"
            options["response_checksum_validation"] = "when_required"
        session = boto3.session.Session(
            **(self._credentials or {}), region_name=self.region, botocore_session=_core_session()
        )
        return session.client("s3", endpoint_url=self.endpoint, config=Config(**options))

    def _transfer_config(self) -> Any:
        from boto3.s3.transfer import TransferConfig

        return TransferConfig(
            multipart_threshold=self.multipart_threshold,
            multipart_chunksize=self.multipart_chunksize,
            max_concurrency=self.max_concurrency,
            use_threads=True,
            # The same transfer code everywhere (the CRT client would ignore these settings
            # and the progress callbacks on some hosts).
            preferred_transfer_client="classic",
        )

    def _expected_etag_kind(self, size: int) -> tuple[bool, int]:
        """(multipart?, part size) that an upload of ``size`` bytes from here will use."""
        from s3transfer.utils import ChunksizeAdjuster

        if size < self.multipart_threshold:
            return False, 0
        return True, ChunksizeAdjuster().adjust_chunksize(self.multipart_chunksize, size)

    def _attempt(self, what: str, fn: Callable[[], _T], attempts: int | None = None) -> _T:
        """Run ``fn``, trying again with backoff while it fails transiently."""
        attempts = attempts or self.transfer_attempts
        for attempt in range(1, attempts + 1):
            try:
                return fn()
            except Exception as exc:
                if attempt == attempts or not _is_transient(exc):
                    raise
                delay = self.backoff * 2 ** (attempt - 1) * (0.5 + random.random() / 2)
                log.warning(
                    "Retrying %s in %.1f s after %s (attempt %d of %d).",
                    what,
                    delay,
                    _brief(exc),
                    attempt,
                    attempts,
                )
                time.sleep(min(delay, 30.0))
        raise AssertionError("unreachable")

    def _call(
        self,
        action: str,
        uri: str,
        fn: Callable[[], _T],
        *,
        field: str | None = None,
        attempts: int | None = None,
    ) -> _T:
        """Run one storage step with retries; turn what still fails into a clear error."""
        try:
            return self._attempt(f"{action} {uri}", fn, attempts)
        except (UserError, StorageError):
            raise
        except Exception as exc:
            user = _user_error(exc, uri, field, action)
            if user is not None:
                raise user from None
            if not _is_storage_failure(exc):
                raise
            where = f" at {self.endpoint}" if self.endpoint else ""
            raise StorageError(
                _named(field, f"could not {action} {uri}{where}: {_brief(exc)}")
            ) from exc

    def _head(self, bucket: str, key: str) -> _Head:
        return _head_of(self._client.head_object(Bucket=bucket, Key=key))

    def _list_s3(self, uri: str) -> list[ObjectInfo]:
        bucket, key = _split_s3(uri)
        prefix = _dir_prefix(key)
        found = []
        for page in self._client.get_paginator("list_objects_v2").paginate(
            Bucket=bucket, Prefix=prefix
        ):
            for obj in page.get("Contents", []):
                if obj["Key"].endswith("/"):
                    continue  # folder markers made by consoles
                found.append(
                    ObjectInfo(
                        uri=f"s3://{bucket}/{obj['Key']}",
                        key=obj["Key"],
                        relpath=obj["Key"][len(prefix) :],
                        size=int(obj["Size"]),
                        etag=str(obj.get("ETag", "")).strip('"'),
                    )
                )
        if not found and key and not key.endswith("/"):
            try:
                head = self._head(bucket, key)
            except Exception as exc:
                if _error_code(exc)[0] not in _MISSING_CODES:
                    raise
            else:
                name = key.rsplit("/", 1)[-1]
                found.append(ObjectInfo(uri, key, name, head.size, head.etag))
        return sorted(found, key=lambda o: o.relpath)

    # ----------------------------------------------------------------- listing and bytes

    def list(self, uri: str, *, field: str | None = None) -> list[ObjectInfo]:
        """Every object under ``uri`` taken as a folder, recursively, sorted by relpath.

        When nothing lies under it and ``uri`` names one object (or file), that object is
        the only entry, with its base name as relpath. A missing prefix lists as empty.
        """
        if is_s3(uri):
            return self._call("list", uri, lambda: self._list_s3(uri), field=field)
        root = _local_path(uri)
        if not root.exists():
            return []
        single = root.is_file()
        return [
            ObjectInfo(uri if single else join_uri(uri, rel), str(path), rel, path.stat().st_size)
            for rel, path in _local_files(root)
        ]

    def exists(self, uri: str, *, field: str | None = None) -> bool:
        """True when ``uri`` names an object or a non-empty prefix (or an existing path)."""
        if not is_s3(uri):
            return _local_path(uri).exists()
        bucket, key = _split_s3(uri)

        def probe() -> bool:
            if key and not key.endswith("/"):
                try:
                    self._head(bucket, key)
                    return True
                except Exception as exc:
                    if _error_code(exc)[0] not in _MISSING_CODES:
                        raise
            resp = self._client.list_objects_v2(Bucket=bucket, Prefix=_dir_prefix(key), MaxKeys=1)
            return bool(resp.get("KeyCount") or resp.get("Contents"))

        return self._call("look up", uri, probe, field=field)

    def read_bytes(self, uri: str, *, field: str | None = None) -> bytes:
        """The whole content of one object or file."""
        if not is_s3(uri):
            with _local_io(uri, field, "read"):
                return _local_path(uri).read_bytes()
        bucket, key = _split_s3(uri)

        def get() -> bytes:
            resp = self._client.get_object(Bucket=bucket, Key=key)
            data = resp["Body"].read()
            _verify_bytes(data, _head_of(resp))
            return data

        return self._call("read", uri, get, field=field)

    def write_bytes(self, uri: str, data: bytes, *, field: str | None = None) -> None:
        """Store ``data`` at ``uri``; local writes go through a temp file and a rename."""
        if not is_s3(uri):
            dest = _local_path(uri)
            with _local_io(uri, field, "write"), _temp_for(dest) as tmp:
                tmp.write_bytes(data)
                _fsync_replace(tmp, dest)
            return
        bucket, key = _split_s3(uri)
        meta = {_SHA256_META: hashlib.sha256(data).hexdigest()}

        def put() -> None:
            self._client.put_object(Bucket=bucket, Key=key, Body=data, Metadata=meta)

        self._call("write", uri, put, field=field)

    # ----------------------------------------------------------------- whole files

    def download(self, uri: str, dest: str | os.PathLike[str], *, field: str | None = None) -> Path:
        """Copy one object to ``dest`` (verified; temp file + rename). Returns ``dest``."""
        dest = Path(dest)
        if not is_s3(uri):
            src = _local_path(uri)
            if not src.is_file():
                raise UserError(_named(field, f"{uri} does not exist or is not a file"))
            with _local_io(str(dest), field, "write"):
                self._copy_local(src, dest)
            return dest
        self._download_s3(uri, dest, field=field)
        return dest

    def _download_s3(self, uri: str, dest: Path, *, field: str | None = None) -> _Head:
        bucket, key = _split_s3(uri)
        result: dict[str, _Head] = {}

        def once() -> None:
            head = self._head(bucket, key)
            _free_space_check(dest, head.size, uri)
            progress = _Progress("Downloading", uri, head.size, self.progress_interval)
            with _temp_for(dest) as tmp:
                self._client.download_file(
                    bucket,
                    key,
                    str(tmp),
                    Callback=progress,
                    Config=self._transfer_config(),
                )
                _verify_local(tmp, head)
                _fsync_replace(tmp, dest)
            progress.finished()
            result["head"] = head

        self._call("download", uri, once, field=field)
        return result["head"]

    @staticmethod
    def _copy_local(src: Path, dest: Path) -> str:
        """Copy through a temp file and a rename; returns the SHA-256 of the content."""
        if dest.exists() and src.resolve() == dest.resolve():
            return _digest(src, sha256=True)["sha256"]
        with _temp_for(dest) as tmp:
            sha = _copy_hashed(src, tmp)
            if tmp.stat().st_size != src.stat().st_size:
                raise StorageError(f"copy of {src} to {dest} came out short")
            _fsync_replace(tmp, dest)
        return sha

    def upload_file(
        self, path: str | os.PathLike[str], uri: str, *, field: str | None = None
    ) -> ObjectInfo:
        """Store one local file at ``uri``, verified by size and ETag after upload."""
        path = Path(path)
        if not path.is_file():
            raise UserError(_named(field, f"{path} does not exist or is not a file"))
        size = path.stat().st_size
        if not is_s3(uri):
            with _local_io(uri, field, "write"):
                sha = self._copy_local(path, _local_path(uri))
            return ObjectInfo(uri, str(_local_path(uri)), path.name, size, sha256=sha)
        multipart, part_size = self._expected_etag_kind(size)
        digest = _digest(path, md5=not multipart, sha256=True, part_size=part_size)
        expected = digest.get("multipart_etag") or digest["md5"]
        etag = self._upload_s3(path, uri, size, digest["sha256"], expected, field=field)
        return ObjectInfo(uri, _split_s3(uri)[1], path.name, size, etag, digest["sha256"])

    def _upload_s3(
        self, path: Path, uri: str, size: int, sha256: str, expected_etag: str, *, field: str | None
    ) -> str:
        bucket, key = _split_s3(uri)

        def once() -> str:
            progress = _Progress("Uploading", uri, size, self.progress_interval)
            self._client.upload_file(
                str(path),
                bucket,
                key,
                ExtraArgs={"Metadata": {_SHA256_META: sha256}},
                Callback=progress,
                Config=self._transfer_config(),
            )
            head = self._head(bucket, key)
            if head.size != size or head.sha256 != sha256:
                raise _IntegrityError(f"stored object differs from {path} after upload")
            if head.md5_based and head.etag != expected_etag:
                raise _IntegrityError(f"ETag of the stored object differs from {path}")
            progress.finished()
            return head.etag

        return self._call("upload to", uri, once, field=field)

    def upload_tree(
        self, local_dir: str | os.PathLike[str], uri: str, *, field: str | None = None
    ) -> list[ObjectInfo]:
        """Store every file under ``local_dir`` below ``uri`` (same relative paths)."""
        root = Path(local_dir)
        if not root.is_dir():
            raise UserError(_named(field, f"{root} is not a directory"))
        files = _local_files(root)
        return self._upload_many([(rel, path, join_uri(uri, rel)) for rel, path in files], field)

    def _upload_many(
        self, items: list[tuple[str, Path, str]], field: str | None
    ) -> list[ObjectInfo]:
        """Upload (relpath, local path, URI) items, a few files at a time."""
        workers = max(1, min(4, len(items)))
        calls = [
            lambda p=path, d=dest: self.upload_file(p, d, field=field) for _, path, dest in items
        ]
        infos = _run_parallel(calls, workers, "evaclip-upload")
        return [
            ObjectInfo(info.uri, info.key, rel, info.size, info.etag, info.sha256)
            for info, (rel, _, _) in zip(infos, items, strict=True)
        ]

    # ----------------------------------------------------------------- deleting

    def delete(self, uri: str, *, field: str | None = None) -> None:
        """Remove one object or file; a missing one is not an error."""
        if not is_s3(uri):
            with _local_io(uri, field, "delete"):
                _local_path(uri).unlink(missing_ok=True)
            return
        bucket, key = _split_s3(uri)
        self._call(
            "delete", uri, lambda: self._client.delete_object(Bucket=bucket, Key=key), field=field
        )

    def delete_prefix(self, uri: str, *, field: str | None = None) -> int:
        """Remove every object under ``uri`` taken as a folder; returns how many."""
        if not is_s3(uri):
            return self._delete_local_tree(_local_path(uri), uri, field)
        bucket, _ = _split_s3(uri)
        keys = [o.key for o in self.list(uri, field=field)]
        for start in range(0, len(keys), 1000):
            batch = {"Objects": [{"Key": k} for k in keys[start : start + 1000]], "Quiet": True}
            self._call(
                "delete under",
                uri,
                lambda b=batch: self._delete_batch(bucket, b),
                field=field,
            )
        return len(keys)

    def _delete_batch(self, bucket: str, batch: dict[str, Any]) -> None:
        from botocore.exceptions import ClientError

        errors = self._client.delete_objects(Bucket=bucket, Delete=batch).get("Errors") or []
        if errors:
            first = errors[0]
            response = {"Error": {"Code": first.get("Code", ""), "Message": first.get("Message")}}
            raise ClientError(response, "DeleteObjects")  # type: ignore[arg-type]

    @staticmethod
    def _delete_local_tree(path: Path, uri: str, field: str | None) -> int:
        with _local_io(uri, field, "delete"):
            if path.is_dir():
                count = len(_local_files(path))
                shutil.rmtree(path)
                return count
            if path.exists():
                path.unlink()
                return 1
            return 0

    # ----------------------------------------------------------------- checks

    def check_writable(self, uri: str, *, field: str = "output") -> None:
        """Raise UserError naming ``field`` and ``uri`` unless this store can publish there.

        Exercises what :meth:`publish` needs on a small probe object: write it, read it
        back, list the prefix and delete it (s3:PutObject, s3:GetObject, s3:ListBucket,
        s3:DeleteObject). Cheap, so run it before any long download.
        """
        if not is_s3(uri):
            self._check_local_writable(_local_path(uri), uri, field)
            return
        probe = join_uri(uri, f".evaclip-write-check-{uuid.uuid4().hex[:12]}")
        bucket, key = _split_s3(probe)
        client = self._client
        self._call(
            "write to",
            uri,
            lambda: client.put_object(Bucket=bucket, Key=key, Body=b""),
            field=field,
        )
        try:
            self._call("read back", uri, lambda: self._head(bucket, key), field=field)
            self._call(
                "list",
                uri,
                lambda: client.list_objects_v2(
                    Bucket=bucket, Prefix=_dir_prefix(_split_s3(uri)[1]), MaxKeys=1
                ),
                field=field,
            )
        finally:
            self._call(
                "delete from",
                uri,
                lambda: client.delete_object(Bucket=bucket, Key=key),
                field=field,
            )

    @staticmethod
    def _check_local_writable(path: Path, uri: str, field: str) -> None:
        try:
            path.mkdir(parents=True, exist_ok=True)
            probe = path / f"{_TMP_PREFIX}write-check-{uuid.uuid4().hex[:8]}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            reason = exc.strerror or type(exc).__name__
            raise UserError(
                f"{field}: cannot write to {uri} ({reason}); choose a writable directory"
            ) from None

    # ----------------------------------------------------------------- cache

    def _cache_paths(self, bucket: str, key: str) -> tuple[Path, Path, Path]:
        """(data path, metadata path, lock path) of one cached object."""
        host = urlparse(self.endpoint).netloc.replace(":", "_") if self.endpoint else "aws"
        parts = [p for p in key.split("/") if p]
        if any(p in (".", "..") for p in parts):
            raise UserError(f"s3://{bucket}/{key}: keys with '.' or '..' segments cannot be cached")
        rel = Path(host, bucket, *parts)
        data = self.cache_dir / "data" / rel
        meta = self.cache_dir / "meta" / rel.with_name(rel.name + ".json")
        lock = self.cache_dir / "locks" / (hashlib.sha1(str(rel).encode()).hexdigest() + ".lock")
        return data, meta, lock

    @contextlib.contextmanager
    def _locked(self, lock_path: Path, uri: str, quiet: bool = False) -> Iterator[None]:
        """Hold an exclusive file lock; others on this node wait for the holder to finish.

        On a file system without flock support the work goes ahead unlocked (with a
        warning): ranks may then download the same file twice, each through its own temp
        file, which costs time but never leaves a damaged copy.
        """
        try:
            lock_path.parent.mkdir(parents=True, exist_ok=True)
            fh = open(lock_path, "a+b")  # closed below, after unlocking
        except OSError as exc:
            raise StorageError(
                f"cannot use the cache at {self.cache_dir} ({exc.strerror}); "
                f"point {CACHE_ENV} to a writable directory"
            ) from exc
        with fh:
            locked = _flock(fh, uri, quiet)
            try:
                yield
            finally:
                if locked:
                    fcntl.flock(fh, fcntl.LOCK_UN)

    @staticmethod
    def _cached_ok(data: Path, meta_path: Path, uri: str, size: int, etag: str) -> bool:
        """True when the cached copy still matches the object (size, ETag, local file)."""
        try:
            meta = json.loads(meta_path.read_text())
            stat = data.stat()
        except (OSError, ValueError):
            return False
        if (meta.get("uri"), meta.get("size"), meta.get("etag")) != (uri, size, etag):
            return False
        if stat.st_size != size:
            return False
        if stat.st_mtime_ns == meta.get("mtime_ns"):
            return True
        # Touched since it was fetched: trust it only if its content still checks out.
        head = _Head(size, etag, meta.get("sha256"), bool(meta.get("md5_based")))
        if not (head.sha256 or head.md5_etag):
            return False
        try:
            _verify_local(data, head)
        except _IntegrityError:
            return False
        Storage._write_meta(meta_path, data, uri, head)
        return True

    @staticmethod
    def _write_meta(meta_path: Path, data: Path, uri: str, head: _Head) -> None:
        record = {
            "uri": uri,
            "size": head.size,
            "etag": head.etag,
            "sha256": head.sha256,
            "md5_based": head.md5_based,
            "mtime_ns": data.stat().st_mtime_ns,
            "fetched": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        with _temp_for(meta_path) as tmp:
            tmp.write_text(json.dumps(record, indent=1))
            os.replace(tmp, meta_path)

    def fetch(self, uri: str, *, field: str | None = None) -> Path:
        """A verified local copy of one object from the node cache, downloading if needed.

        A URI that names no object but a non-empty prefix (or ends in ``/``) is fetched as
        a tree, like :meth:`fetch_tree`. Local paths are returned as they are (after
        checking they exist).
        """
        if not is_s3(uri):
            path = _local_path(uri)
            if not path.exists():
                raise UserError(_named(field, f"{uri} does not exist; check the path"))
            return path
        bucket, key = _split_s3(uri)
        if not key or key.endswith("/"):
            return self.fetch_tree(uri, field=field)
        data, meta, lock = self._cache_paths(bucket, key)
        with self._locked(lock, uri):
            head = self._call("look up", uri, lambda: self._head_or_none(bucket, key), field=field)
            if head is None:
                tree = True
            elif self._cached_ok(data, meta, uri, head.size, head.etag):
                log.debug("Using the cached copy of %s.", uri)
                return data
            else:
                tree = False
                self._fetch_into_cache(uri, data, meta, field)
        return self.fetch_tree(uri, field=field) if tree else data

    def _head_or_none(self, bucket: str, key: str) -> _Head | None:
        """HEAD of an object, or None when there is no such object."""
        try:
            return self._head(bucket, key)
        except Exception as exc:
            if _error_code(exc)[0] in _MISSING_CODES:
                return None
            raise

    def _fetch_into_cache(
        self, uri: str, data: Path, meta: Path, field: str | None, quiet: bool = False
    ) -> None:
        meta.unlink(missing_ok=True)  # no record until the new copy is complete
        _remove_stale_temps(data)
        log.log(logging.DEBUG if quiet else logging.INFO, "Fetching %s into the cache.", uri)
        head = self._download_s3(uri, data, field=field)
        self._write_meta(meta, data, uri, head)

    def fetch_tree(self, uri: str, *, field: str | None = None) -> Path:
        """A verified local copy of every object under ``uri``, from the node cache.

        Returns the directory whose files mirror the prefix; files no longer under the
        prefix are removed from it, so it holds exactly what the store holds.
        """
        if not is_s3(uri):
            path = _local_path(uri)
            if not path.is_dir():
                raise UserError(_named(field, f"{uri} is not a directory; check the path"))
            return path
        bucket, key = _split_s3(uri)
        prefix = _dir_prefix(key)
        root, _, lock = self._cache_paths(bucket, prefix + "__tree__")
        root = root.parent
        with self._locked(lock, uri):
            objects = [o for o in self.list(uri, field=field) if o.key.startswith(prefix)]
            if not objects:
                raise UserError(_named(field, f"nothing is stored under {uri}; check the URI"))
            stale = [o for o in objects if not self._tree_member_ok(bucket, o)]
            if stale:
                self._fetch_members(uri, bucket, stale, len(objects), field)
            self._prune(root, {o.relpath for o in objects})
        return root

    def _fetch_members(
        self, uri: str, bucket: str, stale: list[ObjectInfo], total: int, field: str | None
    ) -> None:
        """Download the missing files of a tree in parallel, logging files, rate and ETA."""
        size = sum(o.size for o in stale)
        log.info(
            "Fetching %d of %d files (%s) under %s into the cache.",
            len(stale),
            total,
            _human(size),
            uri,
        )
        progress = _Progress(
            f"Fetching {len(stale)} files under", uri, size, self.progress_interval
        )
        workers = max(1, min(len(stale), max(4, self.max_concurrency)))

        def member(obj: ObjectInfo) -> None:
            self._fetch_member(bucket, obj, field)
            progress(obj.size)

        _run_parallel([lambda o=o: member(o) for o in stale], workers, "evaclip-fetch")
        progress.finished()

    def _tree_member_ok(self, bucket: str, obj: ObjectInfo) -> bool:
        data, meta, _ = self._cache_paths(bucket, obj.key)
        return self._cached_ok(data, meta, obj.uri, obj.size, obj.etag or "")

    def _fetch_member(self, bucket: str, obj: ObjectInfo, field: str | None) -> None:
        data, meta, lock = self._cache_paths(bucket, obj.key)
        with self._locked(lock, obj.uri, quiet=True):
            if not self._cached_ok(data, meta, obj.uri, obj.size, obj.etag or ""):
                self._fetch_into_cache(obj.uri, data, meta, field, quiet=True)

    @staticmethod
    def _prune(root: Path, keep: set[str]) -> None:
        for rel, path in _local_files(root):
            if rel not in keep:
                path.unlink(missing_ok=True)

    # ----------------------------------------------------------------- publishing

    def publish(
        self,
        local_dir: str | os.PathLike[str],
        output_uri: str,
        manifest_name: str = MANIFEST_NAME,
        extra: dict[str, Any] | None = None,
        *,
        field: str = "output",
        include_existing: bool = False,
    ) -> str:
        """Upload ``local_dir`` to ``output_uri`` so that it counts only once complete.

        Order: remove any old manifest, upload every file, check each stored object against
        the local file, then write the manifest (files with size, SHA-256 and ETag, plus
        ``extra``) last. A run that fails or is killed on the way leaves no manifest, so its
        output never looks complete. Returns the manifest's URI.

        Files already under ``output_uri`` that the new set does not contain are left alone
        and, by default, not listed: readers go by the manifest. With ``include_existing``
        they are listed too (size, ETag, and SHA-256 where the object records one), for
        outputs that other processes uploaded first, such as the shards of other nodes.
        """
        root = Path(local_dir)
        if not root.is_dir():
            raise UserError(_named(field, f"{root} is not a directory to publish"))
        manifest_uri = join_uri(output_uri, manifest_name)
        self.delete(manifest_uri, field=field)
        files = [(rel, p) for rel, p in _local_files(root) if rel != manifest_name]
        started = time.monotonic()
        uploaded = self._upload_many([(r, p, join_uri(output_uri, r)) for r, p in files], field)
        entries = self._verify_published(root, output_uri, uploaded, field)
        if include_existing:
            entries = self._with_existing(output_uri, entries, manifest_name, field)
        manifest = {
            "format": MANIFEST_FORMAT,
            "uri": output_uri,
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "files": entries,
            "extra": extra or {},
        }
        self.write_bytes(manifest_uri, json.dumps(manifest, indent=1).encode(), field=field)
        total = sum(e["size"] for e in entries)
        log.info(
            "Published %d files (%s) to %s in %s; manifest %s written last.",
            len(entries),
            _human(total),
            output_uri,
            _duration(time.monotonic() - started),
            manifest_name,
        )
        return manifest_uri

    def _verify_published(
        self, root: Path, output_uri: str, uploaded: list[ObjectInfo], field: str
    ) -> list[dict[str, Any]]:
        """Check every uploaded file is stored with its size and ETag; manifest entries."""
        stored = {o.relpath: o for o in self.list(output_uri, field=field)}
        entries = []
        for info in uploaded:
            got = stored.get(info.relpath)
            if got is None or got.size != info.size or got.etag != info.etag:
                raise StorageError(
                    _named(field, f"{info.uri} is not stored as uploaded; publish again")
                )
            sha = info.sha256 or _digest(root / info.relpath, sha256=True)["sha256"]
            entries.append(
                {"path": info.relpath, "size": info.size, "sha256": sha, "etag": info.etag}
            )
        return entries

    def _with_existing(
        self, output_uri: str, entries: list[dict[str, Any]], manifest_name: str, field: str
    ) -> list[dict[str, Any]]:
        """Add the objects under ``output_uri`` that this publish did not upload."""
        known = {e["path"] for e in entries} | {manifest_name}
        for obj in self.list(output_uri, field=field):
            if obj.relpath in known:
                continue
            if is_s3(obj.uri):
                bucket, key = _split_s3(obj.uri)
                head = self._call("look up", obj.uri, lambda b=bucket, k=key: self._head(b, k))
                sha = head.sha256
            else:
                sha = _digest(Path(obj.key), sha256=True)["sha256"]
            entries.append({"path": obj.relpath, "size": obj.size, "sha256": sha, "etag": obj.etag})
        return sorted(entries, key=lambda e: e["path"])

    def read_published(
        self, output_uri: str, manifest_name: str = MANIFEST_NAME, *, field: str | None = None
    ) -> dict[str, Any]:
        """The manifest of a complete publish under ``output_uri``; UserError if none."""
        manifest_uri = join_uri(output_uri, manifest_name)
        try:
            raw = self.read_bytes(manifest_uri, field=field)
        except UserError:
            raise UserError(
                _named(
                    field,
                    f"{output_uri} has no {manifest_name}: nothing was published there or the "
                    "run that wrote it did not finish; point to a completed output",
                )
            ) from None
        try:
            manifest = json.loads(raw)
        except ValueError:
            raise UserError(_named(field, f"{manifest_uri} is not valid JSON")) from None
        if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
            raise UserError(_named(field, f"{manifest_uri} is not a manifest written by evaclip"))
        return manifest
