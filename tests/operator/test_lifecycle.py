"""Status follows the PyTorchJob's conditions; suspend, spec changes, deletion, restarts."""

from __future__ import annotations

import urllib.request

import pytest
from ecf_harness import ECF, PYTORCHJOBS, manifest, schema_problems

pytestmark = pytest.mark.asyncio


def _metric(port: int, name: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and not line.startswith("#"):
            total += float(line.rsplit(" ", 1)[1])
    return total


async def test_condition_sequences_map_to_phases(cluster, ecf_schema):
    op = await cluster.start_operator()
    for name in ("ok", "crash", "paused", "queued"):
        runtime = {"queueName": "team-a"} if name == "queued" else {}
        await cluster.create(manifest(name, runtime=runtime))
    for name in ("ok", "crash", "paused", "queued"):
        await cluster.wait(lambda n=name: cluster.job(n), what=f"job {name}")
        await cluster.wait_phase("Pending", name)

    # Created -> Running -> Succeeded.
    await cluster.job_status("ok", [("Created", "True")])
    await cluster.wait(lambda: cluster.condition("ok", "Created"), what="Created mirrored")
    assert cluster.phase("ok") == "Pending"
    await cluster.job_status("ok", [("Created", "True"), ("Running", "True")],
                             startTime="2026-12-04T10:00:00Z")
    await cluster.wait_phase("Running", "ok")
    assert cluster.ecf("ok")["status"]["startTime"] == "2026-12-04T10:00:00Z"
    await cluster.job_status("ok", [("Created", "True"), ("Running", "False"),
                                    ("Succeeded", "True")],
                             startTime="2026-12-04T10:00:00Z",
                             completionTime="2026-12-04T11:00:00Z")
    await cluster.wait_phase("Succeeded", "ok")
    status = cluster.ecf("ok")["status"]
    assert status["completionTime"] == "2026-12-04T11:00:00Z"
    succeeded = next(c for c in status["conditions"] if c["type"] == "Succeeded")
    assert succeeded["status"] == "True" and succeeded["reason"] == "PyTorchJobSucceeded"
    assert {"Valid", "JobCreated", "Created", "Running"} <= {c["type"] for c in
                                                             status["conditions"]}

    # Running -> Restarting -> Failed: Restarting still reads Running, Failed wins.
    await cluster.job_status("crash", [("Created", "True"), ("Running", "True")])
    await cluster.wait_phase("Running", "crash")
    await cluster.job_status("crash", [("Created", "True"), ("Running", "False"),
                                       ("Restarting", "True")])
    await cluster.wait(lambda: (cluster.condition("crash", "Restarting") or {}).get("status")
                       == "True", what="Restarting mirrored")
    assert cluster.phase("crash") == "Running"
    await cluster.job_status("crash", [("Created", "True"), ("Running", "False"),
                                       ("Restarting", "False"), ("Failed", "True")])
    await cluster.wait_phase("Failed", "crash")
    assert "is failed" in cluster.ecf("crash")["status"]["message"]
    await cluster.wait(lambda: [e for e in cluster.events() if e["type"] == "Warning"
                                and e["involvedObject"]["name"] == "crash"],
                       what="a Warning event for the failed job")

    # spec.suspend: true suspends the job; false resumes it.
    await cluster.job_status("paused", [("Created", "True"), ("Running", "True")])
    await cluster.wait_phase("Running", "paused")
    await cluster.patch_ecf("paused", {"spec": {"suspend": True}})
    await cluster.wait(lambda: cluster.job("paused")["spec"]["runPolicy"]["suspend"] is True,
                       what="runPolicy.suspend true")
    await cluster.wait_phase("Suspended", "paused")
    await cluster.job_status("paused", [("Created", "True"), ("Running", "False"),
                                        ("Suspended", "True")])
    await cluster.patch_ecf("paused", {"spec": {"suspend": False}})
    await cluster.wait(lambda: cluster.job("paused")["spec"]["runPolicy"]["suspend"] is False,
                       what="runPolicy.suspend false")
    await cluster.job_status("paused", [("Created", "True"), ("Running", "True"),
                                        ("Suspended", "False")])
    await cluster.wait_phase("Running", "paused")
    assert cluster.condition("paused", "SpecApplied")["status"] == "True"

    # Kueue suspends a queued job until it is admitted: Queued, and the operator leaves
    # the suspension to Kueue (it only acts when spec.suspend changes).
    await cluster.request("PATCH", "/apis/kubeflow.org/v1/namespaces/default/pytorchjobs/queued",
                          {"spec": {"runPolicy": {"suspend": True}}})
    await cluster.job_status("queued", [("Created", "True"), ("Suspended", "True")])
    await cluster.wait_phase("Queued", "queued")
    assert cluster.job("queued")["spec"]["runPolicy"]["suspend"] is True

    # Everything the operator wrote is declared in the CRD (nothing would be pruned).
    for name in ("ok", "crash", "paused", "queued"):
        assert schema_problems(cluster.ecf(name), ecf_schema) == []

    health = urllib.request.urlopen(f"http://127.0.0.1:{op.liveness_port}/healthz", timeout=5)
    assert health.status == 200
    assert _metric(op.metrics_port, "evaclip_operator_jobs_created_total") == 4
    assert _metric(op.metrics_port, "evaclip_operator_jobs_succeeded_total") == 1
    assert _metric(op.metrics_port, "evaclip_operator_jobs_failed_total") == 1
    assert _metric(op.metrics_port, "evaclip_operator_reconcile_seconds_count") >= 4


async def test_spec_change_is_rejected_and_deleted_job_is_reported(cluster):
    await cluster.start_operator()
    await cluster.create(manifest("run"))
    job = await cluster.wait(lambda: cluster.job("run"), what="job")
    await cluster.job_status("run", [("Created", "True"), ("Running", "True")])
    await cluster.wait_phase("Running", "run")

    await cluster.patch_ecf("run", {"spec": {"training": {"epochs": 50}}})
    rejected = await cluster.wait(
        lambda: (c := cluster.condition("run", "SpecApplied")) and c["status"] == "False" and c,
        what="SpecApplied False")
    assert rejected["reason"] == "SpecChangeRejected"
    assert "only spec.suspend" in rejected["message"]
    assert cluster.ecf("run")["status"]["observedGeneration"] == 2
    assert cluster.job("run")["spec"] == job["spec"], "the running job keeps its spec"
    await cluster.wait(lambda: any(e["reason"] == "SpecChangeRejected"
                                   and e["type"] == "Warning" for e in cluster.events()),
                       what="a SpecChangeRejected event")
    assert cluster.phase("run") == "Running"

    # Someone deletes the PyTorchJob while it runs: Failed, reason JobDeleted, no new job.
    await cluster.delete_job("run")
    await cluster.wait_phase("Failed", "run")
    gone = cluster.condition("run", "JobCreated")
    assert gone["status"] == "False" and gone["reason"] == "JobDeleted"
    assert cluster.creations(PYTORCHJOBS, "run") == 1
    assert cluster.job("run") is None


async def test_finished_job_removed_by_ttl_stays_succeeded(cluster):
    await cluster.start_operator()
    await cluster.create(manifest("done"))
    await cluster.wait(lambda: cluster.job("done"), what="job")
    await cluster.job_status("done", [("Created", "True"), ("Succeeded", "True")])
    await cluster.wait_phase("Succeeded", "done")
    await cluster.delete_job("done")  # as runPolicy.ttlSecondsAfterFinished does
    await cluster.wait(lambda: cluster.job("done") is None, what="job gone")
    await cluster.create(manifest("probe"))  # a later event proves the deletion was handled
    await cluster.wait(lambda: cluster.job("probe"), what="job probe")
    assert cluster.phase("done") == "Succeeded"


async def test_deletion_and_restarts_create_no_duplicates(cluster):
    # The first operator crashes after it wrote the ConfigMap but before the job existed.
    cluster.emulator.failing_creates["pytorchjobs"] = 500
    first = await cluster.start_operator()
    created = await cluster.create(manifest("twice"))
    await cluster.wait(lambda: cluster.config_map("twice"), what="ConfigMap")
    await cluster.wait(lambda: any(r.resource == PYTORCHJOBS and r.method == "POST"
                                   for r in cluster.emulator.requests), what="a job create")
    first.crash()
    cluster.emulator.failing_creates.clear()

    second = await cluster.start_operator()
    job = await cluster.wait(lambda: cluster.job("twice"), what="job after the restart")
    await cluster.wait_phase("Pending", "twice")
    await second.stop()
    await cluster.start_operator()
    await cluster.job_status("twice", [("Created", "True"), ("Running", "True")])
    await cluster.wait_phase("Running", "twice")
    assert cluster.creations(PYTORCHJOBS, "twice") == 2  # the failed one and the real one
    assert cluster.creations("v1/configmaps", "twice-trainer-config") == 2  # 2nd adopted
    assert cluster.job("twice")["metadata"]["uid"] == job["metadata"]["uid"]

    # A job that exists before its resource was ever handled (the operator died between
    # creating it and recording that) is adopted, not created again.
    adopted_uid = "0c0ffee0-0000-4000-8000-000000000001"
    leftover = {"apiVersion": "kubeflow.org/v1", "kind": "PyTorchJob", "metadata": {
        "name": "adopt", "namespace": "default",
        "labels": {"app.kubernetes.io/managed-by": "evaclip-operator",
                   "training.evaclip.io/finetune": "adopt"},
        "ownerReferences": [{"apiVersion": "training.evaclip.io/v1alpha1",
                             "kind": "EvaClipFinetune", "name": "adopt", "uid": adopted_uid,
                             "controller": True, "blockOwnerDeletion": True}]},
        "spec": {"pytorchReplicaSpecs": {"Master": {"replicas": 1}}}}
    await cluster.create(leftover)
    await cluster.create({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {
        "name": "adopt-trainer-config", "namespace": "default",
        "ownerReferences": leftover["metadata"]["ownerReferences"]},
        "data": {"config.json": '{"the": "config the leftover job was made with"}'}})
    resource = manifest("adopt")
    resource["metadata"]["uid"] = adopted_uid  # the emulator keeps a uid it is given
    await cluster.create(resource)
    await cluster.wait(lambda: (cluster.ecf("adopt").get("status") or {}).get("jobName"),
                       what="the adopted job in the status")
    assert cluster.creations(PYTORCHJOBS, "adopt") == 2  # the leftover, and one refused
    assert cluster.job("adopt")["spec"] == leftover["spec"]
    # The adopted job keeps the config it was made with.
    assert "leftover" in cluster.config_map("adopt")["data"]["config.json"]

    # Deleting the resource: both children name it as their controlling owner, which is
    # what lets the garbage collector delete them (the emulator has none, so we do).
    uid = created["metadata"]["uid"]
    for child in (cluster.job("twice"), cluster.config_map("twice")):
        [ref] = child["metadata"]["ownerReferences"]
        assert ref["uid"] == uid and ref["controller"] and ref["blockOwnerDeletion"]
    await cluster.delete_ecf("twice")
    await cluster.delete_job("twice")
    await cluster.request("DELETE", "/api/v1/namespaces/default/configmaps/twice-trainer-config")
    await cluster.create(manifest("after"))
    await cluster.wait(lambda: cluster.job("after"), what="job after")
    assert cluster.get(ECF, "twice") is None
    assert cluster.job("twice") is None and cluster.config_map("twice") is None
    assert cluster.creations(PYTORCHJOBS, "twice") == 2
