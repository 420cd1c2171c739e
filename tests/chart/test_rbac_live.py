"""The real operator runs a resource's whole life with exactly the chart's permissions.

`evaclip operator` runs as a subprocess against the emulated API server of tests/operator
(kmock on 127.0.0.1), extended here to enforce RBAC as the API server would: a request
of the operator that the Role or ClusterRole the chart renders does not grant is answered
403 Forbidden. A resource is then created, runs, is suspended and resumed, has a spec
change refused and succeeds; another asks for an image the platform does not allow; a
third loses its job to someone else. The operator must handle all of it, and the only
requests refused must be the optional scans kopf goes on without (test_rbac.py,
kopf_optional_calls).
"""

from __future__ import annotations

import importlib.util
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp.web
import kmock
import pytest
import pytest_asyncio
import yaml

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "operator"))

from ecf_harness import (  # noqa: E402
    OPERATOR_AGENTS,
    OUR_CRD,
    ApiServerEmulator,
    Cluster,
    declare,
    manifest,
)

Call = tuple[str, str, str]
# A real operator is watching within seconds; kopf retrying refused requests takes minutes.
READY_TIMEOUT = 15.0
_WRITE_VERBS = {"POST": "create", "PATCH": "patch", "PUT": "update"}


def _rbac_module():
    """tests/chart/test_rbac.py, for its derivation of the calls from the code."""
    spec = importlib.util.spec_from_file_location("chart_rbac", Path(__file__).with_name(
        "test_rbac.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def authorization_request(method: str, path: str, query) -> tuple[Call, str | None] | None:
    """((verb, group, resource), namespace) of a resource request; None for discovery.

    Parsed here rather than by kmock, which cannot parse a cluster-wide list of namespaces.
    """
    parts = path.strip("/").split("/")
    if parts[:1] == ["api"] and len(parts) >= 3:
        group, rest = "", parts[2:]
    elif parts[:1] == ["apis"] and len(parts) >= 4:
        group, rest = parts[1], parts[3:]
    else:
        return None
    namespace = None
    if rest[0] == "namespaces" and len(rest) >= 3:
        namespace, rest = rest[1], rest[2:]
    resource, name, sub = rest[0], (rest[1:2] or [None])[0], "/".join(rest[2:])
    if method == "GET":
        verb = "get" if name else ("watch" if query.get("watch") in ("true", "1") else "list")
    elif method == "DELETE":
        verb = "delete" if name else "deletecollection"
    else:
        verb = _WRITE_VERBS[method]
    return (verb, group, f"{resource}/{sub}" if sub else resource), namespace


class RbacEmulator(ApiServerEmulator):
    """The emulator, refusing the operator's requests its RBAC does not grant."""

    granted: set[Call]
    namespaces: set[str] | None  # Role namespaces; None for a ClusterRole

    def allow(self, granted: set[Call], namespaces: set[str] | None) -> None:
        self.granted, self.namespaces, self.forbidden = granted, namespaces, []

    async def __call__(self, raw: aiohttp.web.BaseRequest) -> aiohttp.web.StreamResponse:
        parsed = authorization_request(raw.method, raw.path, raw.query)
        operator = raw.headers.get("User-Agent", "").startswith(OPERATOR_AGENTS)
        if operator and parsed is not None:
            call, namespace = parsed
            in_scope = self.namespaces is None or namespace in self.namespaces
            if call not in self.granted or not in_scope:
                self.forbidden.append((call, namespace))
                return aiohttp.web.json_response(status=403, data={
                    "kind": "Status", "apiVersion": "v1", "status": "Failure",
                    "reason": "Forbidden", "code": 403,
                    "message": f"{call} in namespace {namespace} is forbidden",
                })
        return await super().__call__(raw)


@pytest_asyncio.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[Cluster]:
    emulator = RbacEmulator()
    declare(emulator)
    async with emulator, kmock.Server(emulator) as server:
        c = Cluster(emulator, server, tmp_path)
        await c.create(yaml.safe_load(OUR_CRD.read_text()))
        try:
            yield c
        finally:
            for op in c.operators:
                await op.stop()


async def _whole_life(cluster: Cluster) -> None:
    await cluster.create(manifest("a"))
    await cluster.wait(lambda: cluster.job("a"), what="the PyTorchJob of a")
    await cluster.job_status("a", [("Created", "True"), ("Running", "True")])
    await cluster.wait_phase("Running", "a")
    await cluster.patch_ecf("a", {"spec": {"suspend": True}})
    await cluster.wait(lambda: cluster.job("a")["spec"]["runPolicy"].get("suspend") is True,
                       what="the job of a to be suspended")
    await cluster.patch_ecf("a", {"spec": {"suspend": False}})
    await cluster.wait(lambda: cluster.job("a")["spec"]["runPolicy"].get("suspend") is False,
                       what="the job of a to resume")
    await cluster.patch_ecf("a", {"spec": {"training": {"epochs": 3}}})
    await cluster.job_status("a", [("Created", "True"), ("Succeeded", "True")])
    await cluster.wait_phase("Succeeded", "a")

    await cluster.create(manifest("b", runtime={"image": "docker.io/someone/else:1"}))
    await cluster.wait_phase("Failed", "b")

    await cluster.create(manifest("c"))
    await cluster.wait(lambda: cluster.job("c"), what="the PyTorchJob of c")
    await cluster.delete_job("c")
    await cluster.wait_phase("Failed", "c")
    await cluster.delete_ecf("a")


def _granted(objects) -> set[Call]:
    return {(verb, group, resource)
            for role in objects if role["kind"] in ("Role", "ClusterRole")
            and not role["metadata"]["name"].endswith("-trainer")
            for rule in role["rules"] for group in rule["apiGroups"]
            for resource in rule["resources"] for verb in rule["verbs"]}


def test_authorization_requests_are_parsed_like_the_api_server() -> None:
    assert authorization_request("GET", "/api/v1/namespaces", {}) == (
        ("list", "", "namespaces"), None)
    assert authorization_request(
        "PATCH", "/apis/training.evaclip.io/v1alpha1/namespaces/a/evaclipfinetunes/x/status",
        {}) == (("patch", "training.evaclip.io", "evaclipfinetunes/status"), "a")
    assert authorization_request("GET", "/apis/kubeflow.org/v1/pytorchjobs",
                                 {"watch": "true"}) == (("watch", "kubeflow.org", "pytorchjobs"),
                                                        None)
    assert authorization_request("GET", "/apis/kubeflow.org/v1", {}) is None


@pytest.mark.parametrize("mode", ["namespaced", "cluster-wide"])
@pytest.mark.asyncio
async def test_operator_works_with_exactly_the_chart_permissions(cluster, render, mode) -> None:
    """The operator, started with the Deployment's own args and variables, under its RBAC."""
    rbac = _rbac_module()
    # Release in "default", where the resources are, so that is a trainer namespace too.
    values = {"watchNamespaces": ["default"]} if mode == "namespaced" else {}
    objects = render(values, namespace="default")
    if mode == "namespaced":
        assert not [o for o in objects if o["kind"] in ("ClusterRole", "ClusterRoleBinding")]
    cluster.emulator.allow(_granted(objects), {"default"} if mode == "namespaced" else None)
    (deployment,) = [o for o in objects if o["kind"] == "Deployment"]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e["value"] for e in container["env"]
           if e["name"] not in ("EVACLIP_LIVENESS_ENDPOINT", "EVACLIP_METRICS_PORT")}

    op = await cluster.start_operator(*container["args"], ready=False, **env)
    started = time.monotonic()
    await cluster.wait_ready(op, timeout=READY_TIMEOUT)
    ready_after = time.monotonic() - started
    await _whole_life(cluster)
    await op.stop()

    optional = rbac.kopf_optional_calls(namespaced=mode == "namespaced")
    refused = {call for call, _ in cluster.emulator.forbidden}
    assert refused <= optional, f"the chart refuses calls the operator needs: {refused}"
    sent = cluster.operator_calls()
    assert ("create", "kubeflow.org", "pytorchjobs") in sent  # the recording works
    assert sent - optional <= rbac.operator_calls(), "test_rbac.py misses a call kopf makes"

    # The training pods run as the service account the chart binds to the trainer Role.
    pod = cluster.job("a")["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]
    (binding,) = [o for o in objects if o["kind"] == "RoleBinding"
                  and o["metadata"]["name"].endswith("-trainer")]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": pod["serviceAccountName"],
                                    "namespace": "default"}]
    assert ready_after < READY_TIMEOUT
