"""Harness for the operator's tests and benchmark, all on 127.0.0.1.

`ApiServerEmulator` is kmock's KubernetesEmulator plus the few fields a real API server
fills in itself; `Cluster` wraps a running one with a kubeconfig, starts `evaclip
operator` against it as a subprocess (exactly as in production), acts as a user and as
the Kubeflow training operator, and waits on what the operator does. `api_calls` lists
the (verb, apiGroup, resource) triples the operator sent, for the chart's RBAC.

kmock 0.8 stores objects exactly as sent. Tests of an operator need what every real API
server provides, so the emulator adds it on the server side (never in the client):

* on create: a name from `generateName`, `metadata.uid`, `creationTimestamp`,
  `resourceVersion`, `generation: 1`;
* on patch: a new `resourceVersion`, and `generation + 1` when the spec changes;
* status-subresource semantics for resources that declare one: a patch of the main
  resource drops `status`, a patch of `/status` changes only `status`;
* a monotonic time for every request (`time_of`), which the scale benchmark reads;
* request matching that stays fast over thousands of requests (see `_handle`).

Garbage collection, admission and defaulting stay out: tests check owner references
instead of relying on cascading deletion.
"""

from __future__ import annotations

import asyncio
import copy
import itertools
import os
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import kmock
import yaml
from kmock import ResourceInfo

VERBS = {"get", "list", "watch", "create", "update", "patch", "delete", "deletecollection"}

ECF = "training.evaclip.io/v1alpha1/evaclipfinetunes"
PYTORCHJOBS = "kubeflow.org/v1/pytorchjobs"
CRDS = "apiextensions.k8s.io/v1/customresourcedefinitions"


class ApiServerEmulator(kmock.KubernetesEmulator):
    """The emulator with uid, resourceVersion, generation and status subresources."""

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self._rv = itertools.count(1)
        self._history: list[kmock.Request] = []
        self._times: dict[int, float] = {}
        # Plural name -> HTTP status with which its create requests fail, storing nothing.
        self.failing_creates: dict[str, int] = {}

    @property
    def requests(self) -> list[kmock.Request]:
        """Every request served so far, in arrival order."""
        return list(self._history)

    def time_of(self, request: kmock.Request) -> float:
        """When the server received `request` (time.monotonic)."""
        return self._times[id(request)]

    def _has_status(self, resource: Any) -> bool:
        return resource in self.resources and "status" in self.resources[resource].subresources

    async def _handle(self, request: kmock.Request) -> Any:
        self._times[id(request)] = time.monotonic()
        self._history.append(request)
        try:
            return await self._handle_request(request)
        finally:
            # kmock 0.8 matches every request against its whole request log, which makes
            # serving quadratic in the number of requests (minutes for a few thousand).
            # Its log keeps only requests in flight; the full history is self._history.
            self._requests[:] = [r for r in self._requests if r is not request]

    async def _handle_request(self, request: kmock.Request) -> Any:
        data = request.data
        if (request.action == kmock.action.CREATE and request.resource is not None
                and request.resource.plural in self.failing_creates):
            code = self.failing_creates[request.resource.plural]
            return await self._render_error(
                kmock.KubernetesError(status=code, reason="Refused", message=(
                    f"injected failure ({code}): {request.resource.plural} are refused"))
            )
        if request.resource is not None and isinstance(data, dict):
            if request.action == kmock.action.CREATE:
                meta = data.setdefault("metadata", {})
                if not meta.get("name") and meta.get("generateName"):
                    meta["name"] = meta["generateName"] + uuid.uuid4().hex[:5]
                meta.setdefault("uid", str(uuid.uuid4()))
                meta.setdefault(
                    "creationTimestamp", datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
                )
                meta["resourceVersion"] = str(next(self._rv))
                meta["generation"] = 1
                if self._has_status(request.resource):
                    data.pop("status", None)
            elif request.action == kmock.action.UPDATE and request.name is not None:
                self._prepare_patch(request, data)
        return await super()._handle(request)

    def _prepare_patch(self, request: kmock.Request, data: dict[str, Any]) -> None:
        key = (request.resource, request.namespace, request.name)
        stored = self.objects[key] if key in self.objects else None
        if stored is None or stored.deleted:
            return
        old = stored.raw
        if request.subresource == "status":
            for field in list(data):
                if field != "status":
                    del data[field]
        elif request.subresource is None and self._has_status(request.resource):
            data.pop("status", None)
        meta = data.setdefault("metadata", {})
        meta["resourceVersion"] = str(next(self._rv))
        if "spec" in data and request.subresource is None:
            merged = copy.deepcopy(old)
            stored_spec = merged.get("spec") or {}
            if _merged(stored_spec, data["spec"]) != stored_spec:
                meta["generation"] = int(old.get("metadata", {}).get("generation", 1)) + 1


def _merged(base: Any, patch: Any) -> Any:
    """JSON merge patch (RFC 7386), as the emulator applies it."""
    if not isinstance(patch, dict):
        return patch
    out = dict(base) if isinstance(base, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = _merged(out.get(key), value)
    return out


def declare(emulator: kmock.KubernetesEmulator, *, pytorchjobs: bool = True) -> None:
    """Serve the built-in resources, EvaClipFinetunes and (optionally) PyTorchJobs."""
    emulator.resources.load_bundled()
    emulator.resources[ECF] = ResourceInfo(
        kind="EvaClipFinetune", singular="evaclipfinetune", namespaced=True, verbs=VERBS,
        shortnames={"ecf"}, categories={"evaclip", "training"}, subresources={"status"},
    )
    if pytorchjobs:
        declare_pytorchjobs(emulator)


def declare_pytorchjobs(emulator: kmock.KubernetesEmulator) -> None:
    emulator.resources[PYTORCHJOBS] = ResourceInfo(
        kind="PyTorchJob", singular="pytorchjob", namespaced=True, verbs=VERBS,
        subresources={"status", "scale"},
    )


OPERATOR_AGENTS = ("kopf/", "OpenAPI-Generator/")

_VERBS = {
    kmock.action.LIST: "list",
    kmock.action.WATCH: "watch",
    kmock.action.FETCH: "get",
    kmock.action.CREATE: "create",
    kmock.action.UPDATE: "patch",
    kmock.action.DELETE: "delete",
}


def api_calls(
    emulator: kmock.KubernetesEmulator, agents: tuple[str, ...] = OPERATOR_AGENTS
) -> set[tuple[str, str, str]]:
    """The (verb, apiGroup, resource[/subresource]) triples of requests sent by `agents`.

    Discovery (non-resource URLs such as /apis/kubeflow.org/v1) is left out: every
    authenticated client may read it. This is the set the operator's RBAC must cover.
    """
    calls: set[tuple[str, str, str]] = set()
    for request in emulator.requests:
        agent = request.headers.get("User-Agent", "")
        if not agent.startswith(agents) or request.resource is None:
            continue
        plural = request.resource.plural
        if not plural or request.action not in _VERBS:
            continue
        resource = f"{plural}/{request.subresource}" if request.subresource else plural
        calls.add((_VERBS[request.action], request.resource.group or "", resource))
    return calls


ROOT = Path(__file__).resolve().parents[2]
EVACLIP = ROOT / ".venv" / "bin" / "evaclip"
REFERENCE_CRD = Path("/work/shared/reference/kubeflow.org_pytorchjobs.v1.9.0.yaml")
OUR_CRD = ROOT / "crds" / "training.evaclip.io_evaclipfinetunes.yaml"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_kubeconfig(path: Path, url: str) -> Path:
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "emulator", "cluster": {"server": url}}],
        "users": [{"name": "tester", "user": {"token": "test-token"}}],
        "contexts": [{"name": "emulator", "context": {"cluster": "emulator", "user": "tester",
                                                      "namespace": "default"}}],
        "current-context": "emulator",
    }))
    return path


def manifest(name: str = "digits", **spec_changes: Any) -> dict[str, Any]:
    """A small valid EvaClipFinetune; keyword arguments replace top-level spec fields."""
    spec: dict[str, Any] = {
        "model": {"preset": "eva-clip-18b-tiny", "precision": "fp32"},
        "data": {"train": "s3://evaclip-demo/digits/train"},
        "method": {"type": "linearProbe"},
        "resources": {"nodes": 1, "gpusPerNode": 0},
        "output": f"s3://evaclip-demo/runs/{name}",
    }
    spec.update(spec_changes)
    return {
        "apiVersion": "training.evaclip.io/v1alpha1",
        "kind": "EvaClipFinetune",
        "metadata": {"name": name, "namespace": "default"},
        "spec": spec,
    }


class Operator:
    """`evaclip operator` in a subprocess; its log is kept for failing tests."""

    def __init__(self, proc: subprocess.Popen[bytes], log: Path, metrics_port: int) -> None:
        self.proc = proc
        self.log = log
        self.metrics_port = metrics_port
        self.liveness_port = 0
        self.stopped = False

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    async def stop(self, grace: float = 10.0, sig: int = signal.SIGTERM) -> int:
        """Stop as Kubernetes stops a pod: SIGTERM, then SIGKILL after `grace` seconds.

        Returns the exit code. An operator that was running must exit by itself within
        `grace` with code 0; otherwise it is killed and this raises AssertionError, so no
        test can pass over an operator that ignores SIGTERM. Waits without blocking the
        event loop: the emulator must keep serving the operator's last requests while it
        shuts down.
        """
        self.stopped = True
        if self.proc.poll() is not None:
            return int(self.proc.returncode)  # it had exited already (tests check why)
        self.proc.send_signal(sig)
        deadline = time.monotonic() + grace
        while self.proc.poll() is None and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(
                f"the operator was still running {grace} s after {signal.Signals(sig).name}; "
                f"killed it:\n{self.output()[-3000:]}"
            )
        code = int(self.proc.returncode)
        if code != 0:
            raise AssertionError(
                f"the operator exited with {code} after {signal.Signals(sig).name}:\n"
                f"{self.output()[-3000:]}"
            )
        return code

    def crash(self) -> None:
        """Die at once, mid-work, as an OOM-killed or evicted pod does."""
        self.stopped = True
        self.proc.kill()
        self.proc.wait()


class Cluster:
    """The emulator, a client for it, and helpers to wait on what the operator does."""

    def __init__(self, emulator: ApiServerEmulator, server: kmock.Server, tmp: Path) -> None:
        self.emulator = emulator
        self.server = server
        self.tmp = tmp
        self.url = str(server.url).rstrip("/")
        self.kubeconfig = write_kubeconfig(tmp / "kubeconfig", self.url)
        self.operators: list[Operator] = []

    # --- the operator -------------------------------------------------------------------

    async def start_operator(self, *args: str, ready: bool = True, **env: str) -> Operator:
        log = self.tmp / f"operator-{len(self.operators)}.log"
        metrics_port = free_port()
        environ = {k: v for k, v in os.environ.items() if not k.startswith("KUBERNETES_")}
        environ.update(
            KUBECONFIG=str(self.kubeconfig),
            EVACLIP_LAUNCHER_RETRY_SECONDS="1",
            EVACLIP_API_RETRY_SECONDS="1",
            # The planner imports torch (seconds, ~800 MB); only its own test turns it on.
            EVACLIP_PLAN_CHECK="off",
            PYTHONUNBUFFERED="1",
        )
        environ.update(env)
        liveness_port = free_port()
        argv = [str(EVACLIP), "operator", *(args or ("--all-namespaces",)),
                "--liveness-port", str(liveness_port), "--metrics-port", str(metrics_port)]
        with open(log, "wb") as out:
            proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=environ)
        op = Operator(proc, log, metrics_port)
        op.liveness_port = liveness_port
        self.operators.append(op)
        if ready:
            await self.wait_ready(op)
        return op

    async def wait_ready(self, op: Operator, timeout: float = 30.0) -> None:
        """Until the operator watches EvaClipFinetunes (and PyTorchJobs when served)."""
        wanted = {"evaclipfinetunes"}
        if PYTORCHJOBS in self.emulator.resources:
            wanted.add("pytorchjobs")

        def watching() -> bool:
            seen = {r.resource.plural for r in self.emulator.requests
                    if r.action == kmock.action.WATCH and r.resource is not None}
            return wanted <= seen

        await self.wait(watching, timeout, what="the operator to start watching", op=op)

    # --- acting as users and as the training operator -------------------------------------

    async def request(self, method: str, path: str, body: Any = None,
                      content_type: str = "application/merge-patch+json") -> Any:
        headers = {"Content-Type": content_type} if body is not None else {}
        async with self.server.client.request(
            method, path, json=body, headers=headers
        ) as response:
            payload = await response.json(content_type=None)
            if response.status >= 400:
                raise AssertionError(f"{method} {path}: HTTP {response.status}: {payload}")
            return payload

    async def create(self, obj: dict[str, Any]) -> dict[str, Any]:
        api = obj["apiVersion"]
        ns = obj["metadata"].get("namespace")
        plural = {"EvaClipFinetune": "evaclipfinetunes", "PyTorchJob": "pytorchjobs",
                  "CustomResourceDefinition": "customresourcedefinitions",
                  "Namespace": "namespaces", "ConfigMap": "configmaps"}[obj["kind"]]
        prefix = "/api/v1" if api == "v1" else f"/apis/{api}"
        path = f"{prefix}/namespaces/{ns}/{plural}" if ns else f"{prefix}/{plural}"
        return await self.request("POST", path, copy.deepcopy(obj), "application/json")

    async def patch_ecf(self, name: str, patch: dict[str, Any], ns: str = "default") -> Any:
        path = f"/apis/training.evaclip.io/v1alpha1/namespaces/{ns}/evaclipfinetunes/{name}"
        return await self.request("PATCH", path, patch)

    async def delete_ecf(self, name: str, ns: str = "default") -> Any:
        path = f"/apis/training.evaclip.io/v1alpha1/namespaces/{ns}/evaclipfinetunes/{name}"
        return await self.request("DELETE", path)

    async def delete_job(self, name: str, ns: str = "default") -> Any:
        path = f"/apis/kubeflow.org/v1/namespaces/{ns}/pytorchjobs/{name}"
        return await self.request("DELETE", path)

    async def job_status(self, name: str, conditions: list[tuple[str, str]],
                         ns: str = "default", **extra: Any) -> None:
        """Write PyTorchJob status as the training operator would: (type, status) pairs."""
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        status = {
            "conditions": [
                {"type": t, "status": s, "reason": f"PyTorchJob{t}",
                 "message": f"PyTorchJob {name} is {t.lower()}.",
                 "lastUpdateTime": now, "lastTransitionTime": now}
                for t, s in conditions
            ],
            **extra,
        }
        path = f"/apis/kubeflow.org/v1/namespaces/{ns}/pytorchjobs/{name}/status"
        await self.request("PATCH", path, {"status": status})

    # --- reading the emulator ---------------------------------------------------------------

    def get(self, resource: str, name: str, ns: str | None = "default") -> dict[str, Any] | None:
        key = (kmock.resource(resource), ns, name)
        if key not in self.emulator.objects or self.emulator.objects[key].deleted:
            return None
        return copy.deepcopy(self.emulator.objects[key].raw)

    def ecf(self, name: str = "digits") -> dict[str, Any] | None:
        return self.get(ECF, name)

    def job(self, name: str = "digits") -> dict[str, Any] | None:
        return self.get(PYTORCHJOBS, name)

    def config_map(self, name: str = "digits") -> dict[str, Any] | None:
        return self.get("v1/configmaps", f"{name}-trainer-config")

    def events(self, ns: str = "default") -> list[dict[str, Any]]:
        return [obj.raw for (res, n, _), obj in self.emulator.objects.items()
                if res == "v1/events" and n == ns and not obj.deleted]

    def creations(self, resource: str, name: str) -> int:
        """How many create requests reached the server for this object."""
        return sum(1 for r in self.emulator.requests
                   if r.action == kmock.action.CREATE and r.resource == resource
                   and isinstance(r.data, dict)
                   and r.data.get("metadata", {}).get("name") == name)

    def phase(self, name: str = "digits") -> str | None:
        return ((self.ecf(name) or {}).get("status") or {}).get("phase")

    def condition(self, name: str, type_: str) -> dict[str, Any] | None:
        for c in ((self.ecf(name) or {}).get("status") or {}).get("conditions", []):
            if c["type"] == type_:
                return c
        return None

    def operator_calls(self) -> set[tuple[str, str, str]]:
        return api_calls(self.emulator)

    async def wait(self, predicate: Callable[[], Any], timeout: float = 30.0, *,
                   what: str = "the condition", op: Operator | None = None) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            result = predicate()
            if result:
                return result
            ops = [op] if op else [o for o in self.operators if not o.stopped]
            for o in ops:
                if o.proc.poll() is not None:
                    raise AssertionError(f"the operator exited while waiting for {what}:\n"
                                         f"{o.output()[-4000:]}")
            if time.monotonic() > deadline:
                logs = "\n".join(o.output()[-3000:] for o in ops)
                raise AssertionError(f"timed out after {timeout} s waiting for {what}\n{logs}")
            await asyncio.sleep(0.05)

    async def wait_phase(self, phase: str, name: str = "digits", timeout: float = 30.0) -> None:
        await self.wait(lambda: self.phase(name) == phase, timeout,
                        what=f"phase {phase} (now {self.phase(name)})")




def schema_problems(obj: Any, schema: dict[str, Any], path: str = "") -> list[str]:
    """Everything a structural CRD schema refuses in `obj`, as 'path: problem' lines.

    jsonschema checks types, enums, required fields and bounds; on top of that this walk
    reports fields the schema does not declare (which the API server would silently
    prune, or refuse with fieldValidation=Strict), so a misspelt field cannot pass.
    """
    import jsonschema

    problems = [
        f"{'.'.join(str(p) for p in e.absolute_path) or '<root>'}: {e.message}"
        for e in jsonschema.Draft7Validator(schema).iter_errors(obj)
    ]
    return problems + _unknown_fields(obj, schema, path)


def _unknown_fields(obj: Any, schema: dict[str, Any], path: str) -> list[str]:
    if schema.get("x-kubernetes-preserve-unknown-fields"):
        return []
    out: list[str] = []
    if isinstance(obj, dict):
        props = schema.get("properties")
        extra = schema.get("additionalProperties")
        for key, value in obj.items():
            here = f"{path}.{key}" if path else key
            if props is not None and key in props:
                out += _unknown_fields(value, props[key], here)
            elif isinstance(extra, dict):
                out += _unknown_fields(value, extra, here)
            elif props is not None:
                out.append(f"{here}: field not declared in the schema")
    elif isinstance(obj, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(obj):
            out += _unknown_fields(item, schema["items"], f"{path}[{i}]")
    return out


# Every (verb, apiGroup, resource) the operator sends when it runs cluster-wide, as
# observed by tests/operator/test_rbac.py; the Helm chart's ClusterRole must grant these.
OPERATOR_API_CALLS = frozenset({
    # kopf: watching our resource, its bookkeeping annotations, and Events
    ("list", "training.evaclip.io", "evaclipfinetunes"),
    ("watch", "training.evaclip.io", "evaclipfinetunes"),
    ("patch", "training.evaclip.io", "evaclipfinetunes"),
    ("create", "", "events"),
    # kopf: noticing CRDs installed later (the PyTorchJob API), read-only
    ("list", "apiextensions.k8s.io", "customresourcedefinitions"),
    ("watch", "apiextensions.k8s.io", "customresourcedefinitions"),
    # the reconciler: status, children, job events
    ("get", "training.evaclip.io", "evaclipfinetunes"),
    ("patch", "training.evaclip.io", "evaclipfinetunes/status"),
    ("create", "", "configmaps"),
    ("get", "", "configmaps"),
    ("patch", "", "configmaps"),
    ("list", "kubeflow.org", "pytorchjobs"),
    ("watch", "kubeflow.org", "pytorchjobs"),
    ("get", "kubeflow.org", "pytorchjobs"),
    ("create", "kubeflow.org", "pytorchjobs"),
    ("patch", "kubeflow.org", "pytorchjobs"),
})
