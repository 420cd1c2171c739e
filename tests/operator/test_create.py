"""Creating an EvaClipFinetune gives a ConfigMap and a PyTorchJob with every field set."""

from __future__ import annotations

import json

import kubernetes_validate
import pytest
from ecf_harness import ECF, OPERATOR_AGENTS, PYTORCHJOBS, manifest, schema_problems

pytestmark = pytest.mark.asyncio


async def test_create_renders_config_map_and_pytorchjob(cluster, pytorchjob_schema):
    await cluster.start_operator()
    body = manifest(
        "big",
        resources={"nodes": 3, "gpusPerNode": 8, "cpu": "32", "memory": "400Gi",
                   "shmSize": "64Gi"},
        storage={"endpoint": "http://minio.storage:9000", "region": "eu-west-1",
                 "credentialsSecret": {"name": "s3-creds", "sessionTokenKey": "TOKEN"}},
        runtime={
            "serviceAccountName": "trainer",
            "nodeSelector": {"gpu": "h100"},
            "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists",
                             "effect": "NoSchedule"}],
            "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [{"matchExpressions": [
                    {"key": "zone", "operator": "In", "values": ["a"]}]}]}}},
            "priorityClassName": "training",
            "queueName": "team-a-queue",
            "backoffLimit": 5,
            "activeDeadlineSeconds": 7200,
            "ttlSecondsAfterFinished": 600,
        },
    )
    created = await cluster.create(body)
    uid = created["metadata"]["uid"]
    job = await cluster.wait(lambda: cluster.job("big"), what="the PyTorchJob")
    cm = cluster.config_map("big")
    assert cm is not None

    # Both children are owned by the resource, so deleting it deletes them.
    owner = {"apiVersion": "training.evaclip.io/v1alpha1", "kind": "EvaClipFinetune",
             "name": "big", "uid": uid, "controller": True, "blockOwnerDeletion": True}
    assert job["metadata"]["ownerReferences"] == [owner]
    assert cm["metadata"]["ownerReferences"] == [owner]

    # The ConfigMap holds the rendered trainer config with secret names only.
    config = json.loads(cm["data"]["config.json"])
    assert config["spec"]["storage"]["credentialsSecret"]["name"] == "s3-creds"
    assert config["spec"]["resources"]["gpusPerNode"] == 8

    assert not schema_problems(job, pytorchjob_schema)
    # The ConfigMap, and each replica's pod as the training operator will create it, are
    # valid core objects (Kubernetes 1.30 schemas, unknown fields refused).
    kubernetes_validate.validate(cm, "1.30", strict=True)
    for role, replica in job["spec"]["pytorchReplicaSpecs"].items():
        template = replica["template"]
        pod = {"apiVersion": "v1", "kind": "Pod",
               "metadata": {**template["metadata"], "name": f"big-{role.lower()}-0"},
               "spec": template["spec"]}
        kubernetes_validate.validate(pod, "1.30", strict=True)
    spec = job["spec"]
    assert spec["nprocPerNode"] == "8"
    assert spec["runPolicy"] == {"cleanPodPolicy": "Running", "backoffLimit": 5,
                                 "suspend": False, "activeDeadlineSeconds": 7200,
                                 "ttlSecondsAfterFinished": 600}
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a-queue"
    replicas = spec["pytorchReplicaSpecs"]
    assert replicas["Master"]["replicas"] == 1
    assert replicas["Worker"]["replicas"] == 2
    for role in ("Master", "Worker"):
        assert replicas[role]["restartPolicy"] in ("OnFailure", "ExitCode")
        template = replicas[role]["template"]
        assert template["metadata"]["annotations"]["sidecar.istio.io/inject"] == "false"
        pod = template["spec"]
        assert pod["serviceAccountName"] == "trainer"
        assert pod["nodeSelector"] == {"gpu": "h100"}
        assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists",
                                       "effect": "NoSchedule"}]
        assert pod["affinity"] == body["spec"]["runtime"]["affinity"]
        assert pod["priorityClassName"] == "training"
        assert pod["securityContext"]["runAsNonRoot"] is True
        [container] = pod["containers"]
        assert container["name"] == "pytorch"
        assert container["image"] == "ghcr.io/evaclip/evaclip-trainer:0.1.0"
        assert container["resources"]["requests"]["nvidia.com/gpu"] == 8
        assert container["resources"]["limits"]["nvidia.com/gpu"] == 8
        sc = container["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False
        assert sc["capabilities"] == {"drop": ["ALL"]}
        assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
        env = {e["name"]: e for e in container["env"]}
        assert env["EVACLIP_CONFIG"]["value"] == "/etc/evaclip/config.json"
        assert env["EVACLIP_STATUS_RESOURCE"]["value"] == "default/big"
        assert env["EVACLIP_S3_ENDPOINT"]["value"] == "http://minio.storage:9000"
        assert env["AWS_REGION"]["value"] == "eu-west-1"
        assert env["AWS_ACCESS_KEY_ID"]["valueFrom"] == {
            "secretKeyRef": {"name": "s3-creds", "key": "AWS_ACCESS_KEY_ID"}}
        assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"] == {
            "secretKeyRef": {"name": "s3-creds", "key": "AWS_SECRET_ACCESS_KEY"}}
        assert env["AWS_SESSION_TOKEN"]["valueFrom"] == {
            "secretKeyRef": {"name": "s3-creds", "key": "TOKEN"}}
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert volumes[mounts["/etc/evaclip"]]["configMap"]["name"] == "big-trainer-config"
        assert volumes[mounts["/dev/shm"]]["emptyDir"] == {"medium": "Memory",
                                                          "sizeLimit": "64Gi"}

    await cluster.wait(lambda: cluster.phase("big") == "Pending", what="phase Pending")
    status = cluster.ecf("big")["status"]
    assert status["jobName"] == "big"
    assert status["configMapName"] == "big-trainer-config"
    assert status["observedGeneration"] == 1
    types = {c["type"]: c["status"] for c in status["conditions"]}
    assert types["Valid"] == "True" and types["JobCreated"] == "True"


async def test_named_namespaces_only(cluster):
    await cluster.start_operator("--namespace", "team-a")
    elsewhere = manifest("elsewhere")
    mine = manifest("mine")
    mine["metadata"]["namespace"] = "team-a"
    await cluster.create(elsewhere)
    await cluster.create(mine)
    job = await cluster.wait(lambda: cluster.get(PYTORCHJOBS, "mine", "team-a"), what="job")
    assert job["metadata"]["namespace"] == "team-a"
    assert cluster.get("v1/configmaps", "mine-trainer-config", "team-a") is not None
    await cluster.wait(lambda: (cluster.get(ECF, "mine", "team-a").get("status") or {})
                       .get("phase") == "Pending", what="phase Pending")
    assert cluster.job("elsewhere") is None and not cluster.ecf("elsewhere").get("status")
    # Served as named: no cluster-wide scan of namespaces or CRDs.
    paths = {r.url.path for r in cluster.emulator.requests
             if r.headers.get("User-Agent", "").startswith(OPERATOR_AGENTS)}
    assert "/api/v1/namespaces" not in paths
    assert "/apis/apiextensions.k8s.io/v1/customresourcedefinitions" not in paths
