"""Secrets and trust at the operator: what a platform allows, and what never leaves a Secret.

One operator, configured as a platform team would (allowed trainer images, allowed buckets
per namespace, remote code off, a default credentials Secret), runs against the emulated
API server. The tests check that

* manifests asking for remote model code, an image outside the allow-list, or a bucket
  outside their namespace's list end Failed with a condition naming the field, a Warning
  event, and nothing created; the same manifests pass when the platform allows them;
* credentials reach pods only as `secretKeyRef`s: the operator never reads a Secret, and
  the Secret's values (raw or base64) appear in no ConfigMap, job, event or status;
* every replica's pod runs as non-root, without privilege escalation, with all
  capabilities dropped, the default seccomp profile, and no host namespaces or paths.
"""

from __future__ import annotations

import base64
import json
import uuid
from typing import Any

import kmock
import pytest
import tally
from kube import PYTORCHJOBS, manifest

from evaclip.manifest import parse_resource
from evaclip.operator import render
from evaclip.operator.launcher import PyTorchJobLauncher
from evaclip.operator.settings import from_env

PLATFORM = {
    "EVACLIP_TRAINER_IMAGE": "registry.corp/evaclip-trainer:0.1.0",
    "EVACLIP_ALLOWED_TRAINER_IMAGES": "registry.corp/evaclip-trainer:*",
    "EVACLIP_ALLOWED_BUCKETS": json.dumps({"team-a": ["team-a-*"], "team-c": ["shared"]}),
    "EVACLIP_S3_CREDENTIALS_SECRET": "platform-s3",
}
GOOD = {"data": {"train": "s3://team-a-data/digits/train"},
        "output": "s3://team-a-runs/out/ok"}

# name -> (namespace, spec changes, reason, field the message must name)
REFUSED: dict[str, tuple[str, dict[str, Any], str, str]] = {
    "remote-code": ("team-a", {"model": {"preset": "eva-clip-18b-tiny", "trustRemoteCode": True}},
                    "RemoteCodeNotAllowed", "spec.model.trustRemoteCode"),
    "foreign-image": ("team-a", {"runtime": {"image": "docker.io/someone/trainer:latest"}},
                      "ImageNotAllowed", "spec.runtime.image"),
    "foreign-output": ("team-a", {"output": "s3://team-b-runs/stolen"},
                       "BucketNotAllowed", "spec.output"),
    "foreign-input": ("team-a", {"data": {"train": "s3://team-b-data/private"}},
                      "BucketNotAllowed", "spec.data.train"),
    "foreign-validation": ("team-a", {"data": {"train": "s3://team-a-data/t",
                                               "validation": "s3://team-b-data/v"}},
                           "BucketNotAllowed", "spec.data.validation"),
    "foreign-weights": ("team-a", {"model": {"preset": "eva-clip-18b-tiny",
                                             "weights": "s3://models-b/eva.pt"}},
                        "BucketNotAllowed", "spec.model.weights"),
    "unlisted-namespace": ("team-b", {}, "BucketNotAllowed", "spec.data.train"),
}


def _resource(name: str, namespace: str, changes: dict[str, Any]) -> dict[str, Any]:
    spec = {**GOOD, "resources": {"nodes": 2, "gpusPerNode": 1}}
    for key, value in changes.items():
        spec[key] = {**spec[key], **value} if isinstance(spec.get(key), dict) else value
    body = manifest(name, **spec)
    body["spec"]["model"]["precision"] = "bf16"  # GPU pods
    body["metadata"]["namespace"] = namespace
    return body


def _secret(namespace: str, name: str, values: dict[str, str]) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
            "metadata": {"name": name, "namespace": namespace},
            "data": {k: base64.b64encode(v.encode()).decode() for k, v in values.items()}}


@pytest.mark.asyncio
async def test_platform_policy_refuses_and_secrets_stay_in_secrets(cluster) -> None:
    mark = uuid.uuid4().hex
    secret_values = {"AWS_ACCESS_KEY_ID": f"AKIATRUST{mark[:11].upper()}",
                     "AWS_SECRET_ACCESS_KEY": f"trust-secret-{mark}"}
    cluster.emulator.resources["v1/secrets"] = kmock.ResourceInfo(
        kind="Secret", singular="secret", namespaced=True,
        verbs={"get", "list", "watch", "create", "patch", "delete"})
    for ns, name in (("team-a", "team-s3"), ("team-a", "platform-s3")):
        await cluster.request("POST", f"/api/v1/namespaces/{ns}/secrets",
                              _secret(ns, name, secret_values), "application/json")
    op = await cluster.start_operator(**PLATFORM)

    ok = _resource("ok", "team-a", {"storage": {"credentialsSecret": {"name": "team-s3"}}})
    defaulted = _resource("defaulted", "team-a", {})  # gets the platform's Secret
    for body in (ok, defaulted):
        await cluster.create(body)
    for name, (namespace, changes, _, _) in REFUSED.items():
        await cluster.create(_resource(name, namespace, changes))

    problems: list[str] = []
    for name, (namespace, _, reason, field) in REFUSED.items():
        path = f"/apis/training.evaclip.io/v1alpha1/namespaces/{namespace}/evaclipfinetunes/{name}"
        obj = await cluster.wait(lambda p=path: _phase_failed(cluster, p), timeout=30,
                                 what=f"{name} Failed")
        valid = next(c for c in obj["status"]["conditions"] if c["type"] == "Valid")
        if valid["reason"] != reason or field not in valid["message"]:
            problems.append(f"{name}: {valid}")
        if any(r.action == kmock.action.CREATE and r.namespace == namespace
               and isinstance(r.data, dict) and r.data["metadata"].get("name", "").startswith(name)
               and r.resource is not None and r.resource.plural in ("pytorchjobs", "configmaps")
               for r in cluster.emulator.requests):
            problems.append(f"{name}: something was created")
        try:
            await cluster.wait(lambda n=name, r=reason: any(
                e["type"] == "Warning" and e["reason"] == r and e["involvedObject"]["name"] == n
                for e in _all(cluster, "v1/events")), what=f"a Warning event for {name}")
        except AssertionError:
            problems.append(f"{name}: no Warning event")

    jobs = {}
    for name in ("ok", "defaulted"):
        jobs[name] = await cluster.wait(lambda n=name: cluster.get(PYTORCHJOBS, n, "team-a"),
                                        timeout=30, what=f"the job of {name}")
    await cluster.wait(lambda: (cluster.get("training.evaclip.io/v1alpha1/evaclipfinetunes",
                                            "ok", "team-a") or {}).get("status", {}).get("phase")
                       == "Pending", timeout=30, what="ok Pending")

    # The same refused manifests pass where the platform allows them.
    allowing = from_env({**PLATFORM, "EVACLIP_ALLOW_REMOTE_CODE": "true",
                         "EVACLIP_ALLOWED_TRAINER_IMAGES": "registry.corp/*,docker.io/someone/*",
                         "EVACLIP_ALLOWED_BUCKETS": json.dumps({"*": ["*"]})})
    launcher = PyTorchJobLauncher(None, allowing)  # rendering needs no API client
    owner = render.owner_reference("x", "00000000-0000-4000-8000-000000000000")
    allowed = 0
    for name, (namespace, changes, _, _) in REFUSED.items():
        launcher.render(parse_resource(_resource(name, namespace, changes)), allowing,
                        owner=owner)
        allowed += 1

    leaks = _secret_leaks(cluster, secret_values)
    secret_reads = [r for r in cluster.emulator.requests
                    if r.resource is not None and r.resource.plural == "secrets"
                    and r.headers.get("User-Agent", "").startswith(("kopf/", "OpenAPI"))]
    refs = _secret_refs(jobs)
    tally.record("trust-policy", runs=len(REFUSED) * 2,
                 survived=len(REFUSED) - len(problems) + allowed, leaks=len(problems))
    tally.record("secrets-operator", survived=int(not leaks and not secret_reads),
                 leaks=len(leaks) + len(secret_reads), places=len(_scanned(cluster)))

    assert op.proc.poll() is None, op.output()[-3000:]
    assert not problems, "\n".join(problems)
    assert allowed == len(REFUSED)
    assert not secret_reads, [str(r.url) for r in secret_reads]
    assert not leaks, leaks
    # The scan did cover the children: the Secret's *name* is there, its values are not.
    assert any(b"team-s3" in data for data in _scanned(cluster).values())
    assert refs == {"ok": {"team-s3"}, "defaulted": {"platform-s3"}}, refs


def _phase_failed(cluster, path: str) -> dict[str, Any] | None:
    for (res, ns, name), obj in cluster.emulator.objects.items():
        if res == "training.evaclip.io/v1alpha1/evaclipfinetunes" and not obj.deleted \
                and path.endswith(f"/namespaces/{ns}/evaclipfinetunes/{name}"):
            raw = obj.raw
            return raw if (raw.get("status") or {}).get("phase") == "Failed" else None
    return None


def _all(cluster, resource: str) -> list[dict[str, Any]]:
    return [obj.raw for (res, _, _), obj in cluster.emulator.objects.items()
            if res == resource and not obj.deleted]


def _scanned(cluster) -> dict[str, bytes]:
    """Everything the operator wrote or touched: ConfigMaps, jobs, events, resources."""
    out: dict[str, bytes] = {}
    for res in ("v1/configmaps", "v1/events", PYTORCHJOBS,
                "training.evaclip.io/v1alpha1/evaclipfinetunes"):
        for obj in _all(cluster, res):
            meta = obj.get("metadata", {})
            out[f"{res}/{meta.get('namespace')}/{meta.get('name')}"] = json.dumps(obj).encode()
    for request in cluster.emulator.requests:  # and every body the operator sent
        if request.headers.get("User-Agent", "").startswith(("kopf/", "OpenAPI")):
            out[f"request {request.id}"] = json.dumps(request.data, default=str).encode()
    return out


def _secret_leaks(cluster, values: dict[str, str]) -> list[str]:
    needles = {}
    for key, value in values.items():
        needles[key] = value.encode()
        needles[f"{key} (base64)"] = base64.b64encode(value.encode())
    return [f"{where}: {name}" for where, data in _scanned(cluster).items()
            for name, needle in needles.items() if needle in data]


def _secret_refs(jobs: dict[str, dict[str, Any]]) -> dict[str, set[str]]:
    """Per job, the Secret names its pods read credentials from (every replica checked)."""
    refs: dict[str, set[str]] = {}
    for name, job in jobs.items():
        names: set[str] = set()
        for replica in job["spec"]["pytorchReplicaSpecs"].values():
            for container in replica["template"]["spec"]["containers"]:
                for env in container.get("env", []):
                    if env["name"].startswith("AWS_") and "KEY" in env["name"]:
                        assert "value" not in env, env  # never a literal credential
                        names.add(env["valueFrom"]["secretKeyRef"]["name"])
        refs[name] = names
    return refs


def test_every_replica_runs_unprivileged() -> None:
    config = from_env(PLATFORM)
    body = _resource("secure", "team-a", {})
    objects = PyTorchJobLauncher(None, config).render(
        parse_resource(body), config,
        owner=render.owner_reference("secure", "00000000-0000-4000-8000-000000000001"))
    job = next(o for o in objects if o["kind"] == "PyTorchJob")
    replicas = job["spec"]["pytorchReplicaSpecs"]
    problems: list[str] = []
    for role, replica in replicas.items():
        pod = replica["template"]["spec"]
        if pod.get("securityContext", {}).get("runAsNonRoot") is not True:
            problems.append(f"{role}: pod may run as root")
        for flag in ("hostNetwork", "hostPID", "hostIPC"):
            if pod.get(flag):
                problems.append(f"{role}: {flag}")
        if any("hostPath" in v for v in pod.get("volumes", [])):
            problems.append(f"{role}: hostPath volume")
        for container in pod["containers"] + pod.get("initContainers", []):
            sc = container.get("securityContext", {})
            expected = {"allowPrivilegeEscalation": False, "privileged": False,
                        "runAsNonRoot": True}
            for key, value in expected.items():
                if sc.get(key) is not value:
                    problems.append(f"{role}/{container['name']}: {key}={sc.get(key)!r}")
            if sc.get("capabilities", {}).get("drop") != ["ALL"] or \
                    sc.get("capabilities", {}).get("add"):
                problems.append(f"{role}/{container['name']}: {sc.get('capabilities')}")
            if sc.get("seccompProfile", {}).get("type") != "RuntimeDefault":
                problems.append(f"{role}/{container['name']}: seccomp {sc.get('seccompProfile')}")
    tally.record("pod-security", runs=len(replicas), survived=len(replicas) - len(
        {p.split(":")[0].split("/")[0] for p in problems}))
    assert set(replicas) == {"Master", "Worker"}
    assert not problems, problems
