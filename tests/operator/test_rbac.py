"""The exact API calls the operator makes, observed on the wire: what RBAC must grant."""

from __future__ import annotations

import json

import pytest
from ecf_harness import OPERATOR_API_CALLS, manifest

pytestmark = pytest.mark.asyncio


async def test_operator_api_calls_are_the_declared_set(cluster):
    # A ConfigMap left by an earlier, interrupted run (owned, stale) is adopted and updated.
    created = await cluster.create(manifest("rbac"))
    owner = {"apiVersion": "training.evaclip.io/v1alpha1", "kind": "EvaClipFinetune",
             "name": "rbac", "uid": created["metadata"]["uid"], "controller": True,
             "blockOwnerDeletion": True}
    await cluster.create({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {
        "name": "rbac-trainer-config", "namespace": "default", "ownerReferences": [owner]},
        "data": {"config.json": "{}"}})
    await cluster.start_operator()
    await cluster.wait(lambda: cluster.job("rbac"), what="job")
    # The stale ConfigMap is updated after the job's create; the status is written last.
    await cluster.wait_phase("Pending", "rbac")
    config = json.loads(cluster.config_map("rbac")["data"]["config.json"])
    assert config["metadata"]["name"] == "rbac", "the stale config was replaced"

    await cluster.job_status("rbac", [("Created", "True"), ("Running", "True")])
    await cluster.wait_phase("Running", "rbac")
    await cluster.patch_ecf("rbac", {"spec": {"suspend": True}})
    await cluster.wait_phase("Suspended", "rbac")
    await cluster.create(manifest("rbac-bad", trainingg={}))
    await cluster.wait_phase("Failed", "rbac-bad")
    await cluster.wait(lambda: len(cluster.events()) >= 3, what="events")

    assert cluster.operator_calls() == OPERATOR_API_CALLS
