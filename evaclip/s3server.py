"""An S3 store on 127.0.0.1 for local runs and tests, and a proxy that injects faults.

``EmbeddedS3`` runs moto's S3 server in a thread of this process::

    with EmbeddedS3(buckets=["data"]) as s3:
        os.environ.update(s3.env())          # endpoint + fixed local credentials
        Storage(StorageSpec(endpoint=s3.endpoint)).write_bytes("s3://data/x", b"...")

moto keeps its objects in process-global memory: every EmbeddedS3 of one process serves the
same buckets, and everything is gone when the process ends. That is what a local run and a
test need, and why nothing of value should be kept there.

``FaultProxy`` sits in front of any endpoint and breaks the real HTTP path on demand: error
responses (503 SlowDown, 500 InternalError) and connections reset in the middle of a
response, by schedule (``fail``) or at random (``storm``), counting what it saw. Only
127.0.0.1 is ever bound or contacted.
"""

from __future__ import annotations

import http.client
import logging
import random
import socket
import struct
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlparse

log = logging.getLogger("evaclip.s3server")

LOCALHOST = "127.0.0.1"


class EmbeddedS3:
    """moto's S3 server on 127.0.0.1 with fixed dummy credentials (a context manager)."""

    access_key_id = "evaclip-local"
    secret_access_key = "evaclip-local-secret"  # a dummy: moto accepts any key
    region = "us-east-1"

    def __init__(self, port: int = 0, buckets: Iterable[str] = ()) -> None:
        self._port = port
        self._buckets = list(buckets)
        self._server: Any = None
        self._clients: dict[str, Any] = {}
        self.endpoint = ""

    def start(self) -> EmbeddedS3:
        """Start the server (port 0 picks a free port) and create the requested buckets."""
        from moto.server import ThreadedMotoServer

        werkzeug_log = logging.getLogger("werkzeug")
        if werkzeug_log.level == logging.NOTSET:
            werkzeug_log.setLevel(logging.WARNING)  # one line per request otherwise
        self._server = ThreadedMotoServer(ip_address=LOCALHOST, port=self._port, verbose=False)
        self._server.start()
        host, port = self._server.get_host_and_port()
        self.endpoint = f"http://{host}:{port}"
        for name in self._buckets:
            self.ensure_bucket(name)
        log.info("Embedded S3 store listening on %s.", self.endpoint)
        return self

    def stop(self) -> None:
        """Stop serving; the objects stay in this process's memory until it exits."""
        if self._server is not None:
            self._server.stop()
            self._server = None

    def __enter__(self) -> EmbeddedS3:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"EmbeddedS3(endpoint={self.endpoint!r})"

    @property
    def credentials(self) -> dict[str, str]:
        """Keyword arguments for ``Storage(credentials=...)`` or a boto3 session."""
        return {
            "aws_access_key_id": self.access_key_id,
            "aws_secret_access_key": self.secret_access_key,
        }

    def env(self) -> dict[str, str]:
        """Environment for a run that should use this store through the standard chain."""
        return {
            "EVACLIP_S3_ENDPOINT": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.access_key_id,
            "AWS_SECRET_ACCESS_KEY": self.secret_access_key,
            "AWS_DEFAULT_REGION": self.region,
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def client(self, endpoint: str | None = None) -> Any:
        """A plain boto3 S3 client for this store (or for a proxy in front of it)."""
        import boto3
        from botocore.config import Config

        endpoint = endpoint or self.endpoint
        if endpoint not in self._clients:
            session = boto3.session.Session(**self.credentials, region_name=self.region)
            self._clients[endpoint] = session.client(
                "s3",
                endpoint_url=endpoint,
                config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1}),
            )
        return self._clients[endpoint]

    def ensure_bucket(self, name: str) -> None:
        """Create bucket ``name`` unless it exists."""
        from evaclip.errors import UserError

        client = self.client()
        try:
            client.create_bucket(Bucket=name)
        except client.exceptions.BucketAlreadyOwnedByYou:
            pass
        except client.exceptions.ClientError as exc:
            if exc.response.get("Error", {}).get("Code") != "InvalidBucketName":
                raise
            raise UserError(
                f"s3://{name}: '{name}' is not a valid bucket name; use 3 to 63 lowercase "
                "letters, digits, dots and hyphens"
            ) from None

    def storage(self, endpoint: str | None = None, **kwargs: Any) -> Any:
        """An ``evaclip.storage.Storage`` for this store (or a proxy), with its credentials."""
        from evaclip.spec import StorageSpec
        from evaclip.storage import Storage

        spec = StorageSpec(endpoint=endpoint or self.endpoint, region=self.region)
        return Storage(spec, credentials=self.credentials, **kwargs)

    def reset(self) -> None:
        """Forget every bucket and object of every store in this process."""
        parsed = urlparse(self.endpoint)
        conn = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=30)
        try:
            conn.request("POST", "/moto-api/reset")
            conn.getresponse().read()
        finally:
            conn.close()


# --------------------------------------------------------------------------- faults

FAULT_KINDS = ("503", "500", "reset")  # the transient ones, which storms draw from
ALL_FAULT_KINDS = (*FAULT_KINDS, "corrupt", "403")
_ERRORS = {
    "503": ("Service Unavailable", "SlowDown", "Please reduce your request rate."),
    "500": ("Internal Server Error", "InternalError", "We encountered an internal error."),
    "403": ("Forbidden", "AccessDenied", "Access Denied"),
}
_HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "te",
    "trailer",
    "upgrade",
    "expect",
    "content-length",
}


@dataclass
class _Rule:
    """Which requests a fault applies to, and how often."""

    kind: str
    methods: frozenset[str] | None
    path_contains: str | None
    remaining: int | None = None  # scheduled faults left; None for a storm rule
    probability: float = 1.0

    def matches(self, method: str, path: str) -> bool:
        if self.methods is not None and method not in self.methods:
            return False
        return self.path_contains is None or self.path_contains in path


@dataclass
class Seen:
    """One request the proxy received, and the fault it got (None: passed through)."""

    method: str
    path: str
    fault: str | None = None


@dataclass
class _State:
    rules: list[_Rule] = field(default_factory=list)
    storm: list[_Rule] = field(default_factory=list)
    seen: list[Seen] = field(default_factory=list)
    faults: Counter[str] = field(default_factory=Counter)


class FaultProxy:
    """A reverse proxy on 127.0.0.1 that breaks chosen requests to ``upstream``.

    ``fail(n, kind)`` breaks the next ``n`` matching requests; ``storm(p, kinds)`` breaks
    each matching request with probability ``p`` until ``calm()``. Kinds: ``"503"``
    (SlowDown), ``"500"`` (InternalError), ``"reset"`` (forward the request, then send half
    of the response and reset the connection; with no body to halve, reset at once),
    ``"corrupt"`` (flip one byte in the middle of an object's content in a GET response;
    other responses pass unchanged and the fault is not counted), and ``"403"``
    (AccessDenied, to play a missing permission). Storms draw from the first three unless
    told otherwise.
    ``requests``/``count()`` tell what arrived and ``faults`` how many of each were injected;
    ``max_in_flight`` is the most requests handled at once (parallel transfers show there).
    ``latency`` seconds are added before forwarding each request.
    """

    def __init__(self, upstream: str, port: int = 0, seed: int = 0, latency: float = 0.0) -> None:
        parsed = urlparse(upstream)
        if parsed.hostname not in (LOCALHOST, "localhost"):
            raise ValueError(f"FaultProxy only fronts servers on {LOCALHOST}, not {upstream}")
        self.upstream = (parsed.hostname, parsed.port or 80)
        self._port = port
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._state = _State()
        self.latency = latency
        self._in_flight = 0
        self.max_in_flight = 0
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.endpoint = ""

    # ----------------------------------------------------------------- lifecycle

    def start(self) -> FaultProxy:
        server = ThreadingHTTPServer((LOCALHOST, self._port), _ProxyHandler)
        server.daemon_threads = True
        server.proxy = self  # type: ignore[attr-defined]
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        self.endpoint = f"http://{LOCALHOST}:{server.server_address[1]}"
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ----------------------------------------------------------------- configuring faults

    def fail(
        self,
        count: int,
        kind: str = "503",
        *,
        methods: Iterable[str] | None = None,
        path_contains: str | None = None,
    ) -> None:
        """Break the next ``count`` requests that match (method and path substring)."""
        rule = _Rule(_kind(kind), _methods(methods), path_contains, remaining=count)
        with self._lock:
            self._state.rules.append(rule)

    def storm(
        self,
        probability: float,
        kinds: Iterable[str] = FAULT_KINDS,
        *,
        methods: Iterable[str] | None = None,
        path_contains: str | None = None,
    ) -> None:
        """Break each matching request with ``probability``, kind chosen at random."""
        kinds = [_kind(k) for k in kinds]
        rules = [
            _Rule(k, _methods(methods), path_contains, probability=probability / len(kinds))
            for k in kinds
        ]
        with self._lock:
            self._state.storm.extend(rules)

    def calm(self) -> None:
        """Stop injecting faults (scheduled ones not yet used are dropped)."""
        with self._lock:
            self._state.rules.clear()
            self._state.storm.clear()

    def reset_counters(self) -> None:
        with self._lock:
            self._state.seen.clear()
            self._state.faults.clear()
            self.max_in_flight = 0

    # ----------------------------------------------------------------- counters

    @property
    def requests(self) -> list[Seen]:
        with self._lock:
            return list(self._state.seen)

    @property
    def faults(self) -> Counter[str]:
        with self._lock:
            return Counter(self._state.faults)

    def count(
        self,
        method: str | None = None,
        path_contains: str | None = None,
        where: Callable[[Seen], bool] | None = None,
    ) -> int:
        """How many received requests match the method, path substring and predicate."""
        return sum(
            1
            for s in self.requests
            if (method is None or s.method == method)
            and (path_contains is None or path_contains in s.path)
            and (where is None or where(s))
        )

    # ----------------------------------------------------------------- used by the handler

    def _enter(self) -> None:
        with self._lock:
            self._in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self._in_flight)

    def _leave(self) -> None:
        with self._lock:
            self._in_flight -= 1

    def _choose(self, method: str, path: str) -> Seen:
        with self._lock:
            fault = None
            for rule in self._state.rules:
                if rule.remaining and rule.matches(method, path):
                    rule.remaining -= 1
                    fault = rule.kind
                    break
            if fault is None:
                draw = self._rng.random()
                for rule in self._state.storm:
                    if not rule.matches(method, path):
                        continue
                    if draw < rule.probability:
                        fault = rule.kind
                        break
                    draw -= rule.probability
            seen = Seen(method, path, fault)
            self._state.seen.append(seen)
            if fault:
                self._state.faults[fault] += 1
            return seen

    def _corrupted(
        self, seen: Seen, status: int, headers: list[tuple[str, str]], data: bytes
    ) -> bytes:
        """``data`` with one byte flipped when it is object content; else unchanged."""
        kind = next((v for k, v in headers if k.lower() == "content-type"), "")
        if seen.method != "GET" or status not in (200, 206) or not data or "xml" in kind:
            with self._lock:
                self._state.faults["corrupt"] -= 1
                seen.fault = None
            return data
        middle = len(data) // 2
        return data[:middle] + bytes([data[middle] ^ 0xFF]) + data[middle + 1 :]

    def _forward(
        self, method: str, path: str, headers: list[tuple[str, str]], body: bytes
    ) -> tuple[int, list[tuple[str, str]], bytes]:
        conn = http.client.HTTPConnection(*self.upstream, timeout=120)
        try:
            conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
            for name, value in headers:
                if name.lower() not in _HOP_BY_HOP:
                    conn.putheader(name, value)
            if body or method in ("PUT", "POST"):
                conn.putheader("Content-Length", str(len(body)))
            conn.endheaders(body or None)
            resp = conn.getresponse()
            data = resp.read()
            return resp.status, resp.getheaders(), data
        finally:
            conn.close()


def _kind(kind: str) -> str:
    kind = str(kind)
    if kind not in ALL_FAULT_KINDS:
        raise ValueError(f"fault kind {kind!r} is not one of {', '.join(ALL_FAULT_KINDS)}")
    return kind


def _methods(methods: Iterable[str] | None) -> frozenset[str] | None:
    return frozenset(m.upper() for m in methods) if methods is not None else None


class _ProxyHandler(BaseHTTPRequestHandler):
    """Forwards one request at a time over keep-alive connections, or breaks it."""

    protocol_version = "HTTP/1.1"
    server: Any

    def do_GET(self) -> None:
        self._handle()

    do_HEAD = do_PUT = do_POST = do_DELETE = do_GET

    def log_message(self, format: str, *args: Any) -> None:
        """Keep quiet: the proxy's counters say what happened."""

    def _handle(self) -> None:
        proxy: FaultProxy = self.server.proxy
        proxy._enter()
        try:
            self._handle_one(proxy)
        finally:
            proxy._leave()

    def _handle_one(self, proxy: FaultProxy) -> None:
        body = self._read_body()
        if proxy.latency:
            time.sleep(proxy.latency)
        seen = proxy._choose(self.command, self.path)
        fault = seen.fault
        if fault in _ERRORS:
            self._send_error(fault)
            return
        try:
            status, headers, data = proxy._forward(
                self.command, self.path, list(self.headers.items()), body
            )
        except OSError:
            self._reset()
            return
        if fault == "reset":
            self._send_then_reset(status, headers, data)
        elif fault == "corrupt":
            self._send(status, headers, proxy._corrupted(seen, status, headers, data))
        else:
            self._send(status, headers, data)

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _head_lines(self, status: int, headers: list[tuple[str, str]], length: int) -> None:
        self.send_response_only(status)
        keep_length = self.command == "HEAD"
        for name, value in headers:
            low = name.lower()
            if low in _HOP_BY_HOP and not (keep_length and low == "content-length"):
                continue
            self.send_header(name, value)
        if not keep_length:
            self.send_header("Content-Length", str(length))
        self.end_headers()

    def _send(self, status: int, headers: list[tuple[str, str]], data: bytes) -> None:
        self._head_lines(status, headers, len(data))
        if self.command != "HEAD" and data:
            self.wfile.write(data)
        self.wfile.flush()

    def _send_error(self, kind: str) -> None:
        reason, code, message = _ERRORS[kind]
        request_id = uuid.uuid4().hex[:16].upper()
        body = (
            '<?xml version="1.0" encoding="UTF-8"?>\n'
            f"<Error><Code>{code}</Code><Message>{message}</Message>"
            f"<RequestId>{request_id}</RequestId></Error>"
        ).encode()
        self.send_response_only(int(kind), reason)
        self.send_header("Content-Type", "application/xml")
        self.send_header("x-amz-request-id", request_id)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
        self.wfile.flush()

    def _send_then_reset(self, status: int, headers: list[tuple[str, str]], data: bytes) -> None:
        if self.command == "HEAD" or len(data) < 2:
            self._reset()
            return
        self._head_lines(status, headers, len(data))
        self.wfile.write(data[: len(data) // 2])
        self.wfile.flush()
        self._reset()

    def _reset(self) -> None:
        """Abort the connection with a TCP reset, as a failing load balancer would."""
        self.close_connection = True
        try:
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.close()
        except OSError:
            pass

    def finish(self) -> None:
        try:
            super().finish()
        except (OSError, ValueError):
            pass  # the connection was reset on purpose
