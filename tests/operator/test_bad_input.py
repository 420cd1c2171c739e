"""User mistakes create nothing and say what to fix; a missing job API is retried slowly."""

from __future__ import annotations

import kmock
import pytest
import yaml
from ecf_harness import PYTORCHJOBS, REFERENCE_CRD, declare_pytorchjobs, manifest

pytestmark = pytest.mark.asyncio

BAD = {
    # name: (spec changes, expected reason, text the message must contain)
    "bad-blocks": ({"method": {"type": "partial", "partial": {"trainableBlocks": 99}}},
                   "InvalidSpec", "method.partial.trainableBlocks"),
    "bad-field": ({"trainingg": {"epochs": 3}}, "InvalidSpec", "spec.trainingg"),
    "bad-image": ({"runtime": {"image": "docker.io/someone/miner:latest"}},
                  "ImageNotAllowed", "spec.runtime.image"),
    "bad-code": ({"model": {"preset": "eva-clip-18b-tiny", "trustRemoteCode": True}},
                 "RemoteCodeNotAllowed", "spec.model.trustRemoteCode"),
    # Full fine-tuning of the 18B tower without ZeRO on one 24 GiB GPU cannot fit.
    "too-big": ({"model": {"preset": "eva-clip-18b"}, "method": {"type": "full"},
                 "resources": {"nodes": 1, "gpusPerNode": 1, "gpuMemoryGib": 24},
                 "deepspeed": {"zeroStage": 0}},
                "PlanDoesNotFit", "spec.resources.gpuMemoryGib"),
}


def _messages(log: str) -> list[str]:
    """The message part of each operator log line ("<time> <level> <logger>: <message>")."""
    return [line.split(": ", 1)[1] for line in log.splitlines() if ": " in line]


async def test_invalid_specs_create_nothing_and_warn(cluster):
    # With the memory planner on (it loads torch at start-up, about 10 s).
    await cluster.start_operator(EVACLIP_PLAN_CHECK="on")
    for name, (changes, _, _) in BAD.items():
        await cluster.create(manifest(name, **changes))
    for name, (_, reason, field) in BAD.items():
        await cluster.wait_phase("Failed", name)
        valid = cluster.condition(name, "Valid")
        assert valid["status"] == "False" and valid["reason"] == reason, valid
        assert field in valid["message"] and "\n" not in valid["message"]
        assert cluster.ecf(name)["status"]["message"] == valid["message"]
        await cluster.wait(lambda n=name, r=reason: any(
            e["type"] == "Warning" and e["reason"] == r and e["involvedObject"]["name"] == n
            for e in cluster.events()), what=f"a Warning event for {name}")
        assert cluster.job(name) is None and cluster.config_map(name) is None
        # The operator's log says which resource failed, and why, on one line.
        await cluster.wait(lambda n=name, f=field: any(
            line.startswith(f"[default/{n}] Handler 'create' failed permanently") and f in line
            for line in _messages(cluster.operators[0].output())), what=f"the log of {name}")
    assert cluster.creations(PYTORCHJOBS, "bad-image") == 0

    # A restarted operator re-checks them (resume) without repeating the warnings.
    def warnings_for(name):
        return sum(1 for e in cluster.events() if e["involvedObject"]["name"] == name)

    before = {name: warnings_for(name) for name in BAD}
    await cluster.operators[0].stop()
    seen = len(cluster.emulator.requests)
    await cluster.start_operator(EVACLIP_PLAN_CHECK="on")
    await cluster.wait(lambda: {r.url.path.rsplit("/", 1)[-1] for r in
                                cluster.emulator.requests[seen:] if r.method == "GET"}
                       >= set(BAD), what="the resumed resources to be read")
    await cluster.create(manifest("probe"))
    await cluster.wait(lambda: cluster.job("probe"), what="a later job")
    assert {name: warnings_for(name) for name in BAD} == before

    # Fixing the manifest runs it.
    await cluster.patch_ecf("bad-image", {"spec": {"runtime": {"image": None}}})
    await cluster.wait(lambda: cluster.job("bad-image"), what="the job once fixed")
    await cluster.wait_phase("Pending", "bad-image")
    assert cluster.condition("bad-image", "Valid")["status"] == "True"


async def test_allowed_images_and_platform_defaults(cluster):
    await cluster.start_operator(
        EVACLIP_ALLOWED_TRAINER_IMAGES="registry.corp/evaclip-trainer:*",
        EVACLIP_TRAINER_IMAGE="registry.corp/evaclip-trainer:0.1.0",
        EVACLIP_S3_ENDPOINT="http://minio.corp:9000",
        EVACLIP_S3_CREDENTIALS_SECRET="platform-s3",
        EVACLIP_GPU_RESOURCE_NAME="amd.com/gpu",
        EVACLIP_TRAINER_SERVICE_ACCOUNT="evaclip-trainer",
        EVACLIP_DEFAULT_TOLERATIONS='[{"key": "gpu", "operator": "Exists"}]',
    )
    await cluster.create(manifest("pinned", runtime={"image": "registry.corp/evaclip-trainer:0.2"},
                                  resources={"gpusPerNode": 2}))
    job = await cluster.wait(lambda: cluster.job("pinned"), what="job")
    pod = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]
    [container] = pod["containers"]
    assert container["image"] == "registry.corp/evaclip-trainer:0.2"
    assert container["resources"]["limits"] == {"amd.com/gpu": 2}
    assert pod["serviceAccountName"] == "evaclip-trainer"
    assert pod["tolerations"] == [{"key": "gpu", "operator": "Exists"}]
    env = {e["name"]: e for e in container["env"]}
    assert env["EVACLIP_S3_ENDPOINT"]["value"] == "http://minio.corp:9000"
    assert env["AWS_ACCESS_KEY_ID"]["valueFrom"]["secretKeyRef"]["name"] == "platform-s3"
    config = yaml.safe_load(cluster.config_map("pinned")["data"]["config.json"])
    assert config["spec"]["storage"]["endpoint"] == "http://minio.corp:9000"

    # The default image is refused once it is outside the allowed pattern.
    await cluster.create(manifest("elsewhere", runtime={"image": "ghcr.io/x/y:1"}))
    await cluster.wait_phase("Failed", "elsewhere")
    assert "registry.corp/evaclip-trainer:*" in cluster.condition("elsewhere", "Valid")["message"]


async def test_missing_pytorchjob_api_is_a_condition_then_recovers(bare_cluster):
    cluster = bare_cluster
    op = await cluster.start_operator()
    await cluster.create(manifest("early"))
    waiting = await cluster.wait(
        lambda: (c := cluster.condition("early", "JobCreated")) and c, what="JobCreated")
    assert waiting["status"] == "False" and waiting["reason"] == "LauncherUnavailable"
    assert "kubeflow.org/v1 PyTorchJob" in waiting["message"]
    assert cluster.phase("early") == "Pending"
    await cluster.wait(lambda: any(e["reason"] == "LauncherUnavailable"
                                   for e in cluster.events()), what="a Warning event")
    # Retried, slowly, without crashing: a few discovery probes over a few seconds.
    probes = lambda: sum(1 for r in cluster.emulator.requests  # noqa: E731
                         if r.url.path == "/apis/kubeflow.org/v1"
                         and r.headers.get("User-Agent", "").startswith("OpenAPI"))
    await cluster.wait(lambda: probes() >= 3, timeout=10, what="retries")
    assert op.proc.poll() is None
    assert cluster.creations("v1/configmaps", "early-trainer-config") == 0

    # The training operator gets installed: its CRD appears and the job follows.
    declare_pytorchjobs(cluster.emulator)
    await cluster.create(yaml.safe_load(REFERENCE_CRD.read_text()))
    await cluster.wait(lambda: cluster.job("early"), timeout=20, what="the job")
    await cluster.wait(lambda: cluster.condition("early", "JobCreated")["status"] == "True",
                       what="JobCreated True")
    await cluster.wait(lambda: "pytorchjobs" in {
        r.resource.plural for r in cluster.emulator.requests
        if r.action == kmock.action.WATCH and r.resource is not None}, what="a PyTorchJob watch")
    await cluster.job_status("early", [("Created", "True"), ("Running", "True")])
    await cluster.wait_phase("Running", "early")


async def test_job_refused_by_the_api_server_is_reported(cluster):
    # As an admission policy (Gatekeeper, Kyverno) refusing the pod template would.
    cluster.emulator.failing_creates["pytorchjobs"] = 422
    await cluster.start_operator()
    await cluster.create(manifest("refused"))
    await cluster.wait_phase("Failed", "refused")
    refused = cluster.condition("refused", "JobCreated")
    assert refused["status"] == "False" and refused["reason"] == "JobRejected"
    assert "pytorchjobs are refused" in refused["message"]
    await cluster.wait(lambda: any(e["reason"] == "JobRejected" for e in cluster.events()),
                       what="a JobRejected event")
    assert cluster.job("refused") is None


async def test_named_namespace_operator_restarts_for_a_new_job_api(bare_cluster):
    """Without CRD scans, kopf serves only the APIs found at start: the operator restarts."""
    cluster = bare_cluster
    op = await cluster.start_operator("--namespace", "default")
    await cluster.create(manifest("late"))
    await cluster.wait(lambda: (cluster.condition("late", "JobCreated") or {}).get("reason")
                       == "LauncherUnavailable", what="LauncherUnavailable")
    declare_pytorchjobs(cluster.emulator)
    await cluster.create(yaml.safe_load(REFERENCE_CRD.read_text()))
    op.stopped = True  # it is expected to exit now
    await cluster.wait(lambda: op.proc.poll() is not None, timeout=20, what="the restart")
    assert op.proc.returncode == 75, op.output()[-2000:]
    assert "appeared after start-up" in op.output()

    await cluster.start_operator("--namespace", "default")  # as the Deployment would
    await cluster.wait(lambda: cluster.job("late"), what="the job")
    await cluster.job_status("late", [("Created", "True"), ("Running", "True")])
    await cluster.wait_phase("Running", "late")  # job events reach the status again
