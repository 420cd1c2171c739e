"""The README path: `kubectl apply -f examples/...` against the cluster yields a valid job."""

from __future__ import annotations

import asyncio
import json

import pytest
import yaml
from ecf_harness import PYTORCHJOBS, ROOT, schema_problems

pytestmark = pytest.mark.asyncio

KUBECTL = ROOT / ".venv" / "bin" / "kubectl"
EXAMPLE = ROOT / "examples" / "digits-linear-probe.yaml"
NS = "ml-team-a"  # the quickstart's namespace


async def kubectl(cluster, *args: str) -> str:
    proc = await asyncio.create_subprocess_exec(
        str(KUBECTL), "--kubeconfig", str(cluster.kubeconfig), *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout=60)
    assert proc.returncode == 0, f"kubectl {' '.join(args)}: {err.decode()}"
    return out.decode()


@pytest.mark.parametrize("example", sorted((ROOT / "examples").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_examples_name_no_namespace(example):
    # `kubectl -n NS apply -f` refuses a manifest that names another namespace.
    assert "namespace" not in yaml.safe_load(example.read_text())["metadata"]


async def test_kubectl_apply_example_gives_a_valid_pytorchjob(cluster, pytorchjob_schema):
    await cluster.start_operator()
    # The quickstart's command, in a namespace other than the kubeconfig's default.
    out = await kubectl(cluster, "-n", NS, "apply", "--validate=false", "-f", str(EXAMPLE))
    assert "digits-linear-probe" in out and "created" in out
    job = await cluster.wait(lambda: cluster.get(PYTORCHJOBS, "digits-linear-probe", NS),
                             what="the job")
    assert schema_problems(job, pytorchjob_schema) == []
    assert job["spec"]["nprocPerNode"] == "1"
    assert job["spec"]["pytorchReplicaSpecs"]["Master"]["replicas"] == 1
    assert "Worker" not in job["spec"]["pytorchReplicaSpecs"]
    assert cluster.get("v1/configmaps", "digits-linear-probe-trainer-config", NS)

    def phase():
        resource = cluster.get("training.evaclip.io/v1alpha1/evaclipfinetunes",
                               "digits-linear-probe", NS) or {}
        return (resource.get("status") or {}).get("phase")

    await cluster.wait(lambda: phase() == "Pending", what="phase Pending")
    shown = json.loads(await kubectl(cluster, "-n", NS, "get", "evaclipfinetune",
                                     "digits-linear-probe", "-o", "json"))
    assert shown["status"]["jobName"] == "digits-linear-probe"
    assert shown["status"]["phase"] == "Pending"
    fetched = json.loads(await kubectl(cluster, "-n", NS, "get", "pytorchjobs.kubeflow.org",
                                       "digits-linear-probe", "-o", "json"))
    assert fetched["metadata"]["ownerReferences"][0]["uid"] == shown["metadata"]["uid"]


@pytest.mark.parametrize("values, namespace", [
    ({"watchNamespaces": [NS, "team-b"]}, NS),
    ({"trainer": {"namespaces": [NS]}}, NS),
    ({}, "evaclip-system"),  # cluster-wide, trainer pods in the release namespace
])
def test_chart_notes_apply_the_example_where_training_pods_may_run(values, namespace):
    import helm_python

    with helm_python.Chart.load(ROOT / "charts" / "evaclip-operator") as chart:
        rendered = chart.render(values=values, name="evaclip-operator",
                                namespace="evaclip-system")
    notes = next(text for path, text in rendered.items() if path.endswith("NOTES.txt"))
    assert f"kubectl -n {namespace} apply -f examples/digits-linear-probe.yaml" in notes
