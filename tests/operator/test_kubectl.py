"""The README path: `kubectl apply -f examples/...` against the cluster yields a valid job."""

from __future__ import annotations

import asyncio
import json

import pytest
from ecf_harness import ROOT, schema_problems

pytestmark = pytest.mark.asyncio

KUBECTL = ROOT / ".venv" / "bin" / "kubectl"
EXAMPLE = ROOT / "examples" / "digits-linear-probe.yaml"


async def kubectl(cluster, *args: str) -> str:
    proc = await asyncio.create_subprocess_exec(
        str(KUBECTL), "--kubeconfig", str(cluster.kubeconfig), *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout=60)
    assert proc.returncode == 0, f"kubectl {' '.join(args)}: {err.decode()}"
    return out.decode()


async def test_kubectl_apply_example_gives_a_valid_pytorchjob(cluster, pytorchjob_schema):
    await cluster.start_operator()
    out = await kubectl(cluster, "apply", "--validate=false", "-f", str(EXAMPLE))
    assert "digits-linear-probe" in out and "created" in out
    job = await cluster.wait(lambda: cluster.job("digits-linear-probe"), what="the job")
    assert schema_problems(job, pytorchjob_schema) == []
    assert job["spec"]["nprocPerNode"] == "1"
    assert job["spec"]["pytorchReplicaSpecs"]["Master"]["replicas"] == 1
    assert "Worker" not in job["spec"]["pytorchReplicaSpecs"]

    await cluster.wait_phase("Pending", "digits-linear-probe")
    shown = json.loads(await kubectl(cluster, "get", "evaclipfinetune",
                                     "digits-linear-probe", "-o", "json"))
    assert shown["status"]["jobName"] == "digits-linear-probe"
    assert shown["status"]["phase"] == "Pending"
    fetched = json.loads(await kubectl(cluster, "get", "pytorchjobs.kubeflow.org",
                                       "digits-linear-probe", "-o", "json"))
    assert fetched["metadata"]["ownerReferences"][0]["uid"] == shown["metadata"]["uid"]
