"""Pure parts of the operator: phases, conditions, rendering, settings, the schema check."""

from __future__ import annotations

import copy

import pytest
import yaml
from ecf_harness import REFERENCE_CRD, manifest, schema_problems

from evaclip.errors import UserError
from evaclip.manifest import parse_resource
from evaclip.operator import render
from evaclip.operator import status as st
from evaclip.operator.launcher import PyTorchJobLauncher
from evaclip.operator.settings import ENV_VARS, from_env


def T(*types: str) -> list[dict[str, str]]:
    return [{"type": t, "status": "True"} for t in types]


@pytest.mark.parametrize(("conditions", "kwargs", "phase"), [
    ([], {}, "Pending"),
    (T("Created"), {}, "Pending"),
    (T("Created", "Running"), {}, "Running"),
    (T("Created", "Restarting"), {}, "Running"),
    (T("Created", "Running", "Succeeded"), {}, "Succeeded"),
    (T("Created", "Running", "Failed"), {}, "Failed"),
    (T("Created", "Suspended"), {"user_suspended": True}, "Suspended"),
    (T("Created"), {"suspended": True, "user_suspended": True}, "Suspended"),
    (T("Created", "Suspended"), {"suspended": True, "queued": True}, "Queued"),
    (T("Created", "Suspended"), {"suspended": True, "queued": True, "user_suspended": True},
     "Suspended"),
    (T("Created", "Suspended"), {"suspended": True}, "Suspended"),
    (T("Suspended", "Succeeded"), {"suspended": True, "queued": True}, "Succeeded"),
    ([{"type": "Running", "status": "False"}, {"type": "Created", "status": "True"}], {},
     "Pending"),
])
def test_phase_from_true_conditions(conditions, kwargs, phase):
    assert st.job_phase(conditions, **kwargs)[0] == phase


def test_conditions_keep_transition_time_until_status_changes():
    c = st.set_condition([], "Valid", "True", "Validated", at="2026-01-01T00:00:00Z")
    c = st.set_condition(c, "Valid", "True", "Validated", "again", at="2026-02-01T00:00:00Z")
    assert c[0]["lastTransitionTime"] == "2026-01-01T00:00:00Z" and c[0]["message"] == "again"
    c = st.set_condition(c, "Valid", "False", "InvalidSpec", at="2026-03-01T00:00:00Z")
    assert c == [{"type": "Valid", "status": "False", "reason": "InvalidSpec", "message": "",
                  "lastTransitionTime": "2026-03-01T00:00:00Z"}]
    merged = st.merge_job_conditions(c, [{"type": "Running", "status": "True",
                                          "lastUpdateTime": "x", "reason": "R"}])
    assert [m["type"] for m in merged] == ["Valid", "Running"]
    assert "lastUpdateTime" not in merged[1]


def _job(body, env=None):
    config = from_env(env or {})
    resource = parse_resource(body)
    owner = render.owner_reference(resource.name, "uid-1")
    return PyTorchJobLauncher(None, config).render(resource, config, owner=owner)


def test_cpu_job_runs_one_process_without_gpu_requests(pytorchjob_schema):
    cm, job = _job(manifest("cpu"))
    assert job["spec"]["nprocPerNode"] == "1"
    container = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in str(container["resources"])
    assert schema_problems(job, pytorchjob_schema) == []
    assert cm["metadata"]["name"] == "cpu-trainer-config"


def test_schema_check_catches_typos_and_wrong_types(pytorchjob_schema):
    _, job = _job(manifest("typo"))
    bad = copy.deepcopy(job)
    bad["spec"]["runPolicy"]["backofLimit"] = 3
    assert any("backofLimit" in p for p in schema_problems(bad, pytorchjob_schema))
    bad = copy.deepcopy(job)
    bad["spec"]["nprocPerNode"] = 1
    assert any("nprocPerNode" in p for p in schema_problems(bad, pytorchjob_schema))


def test_spec_hash_ignores_suspend_and_platform_defaults():
    a = parse_resource(manifest("h"))
    b = parse_resource(manifest("h", suspend=True))
    c = parse_resource(manifest("h", training={"epochs": 3}))
    assert render.spec_hash(a) == render.spec_hash(b) != render.spec_hash(c)
    _, job1 = _job(manifest("h"))
    _, job2 = _job(manifest("h"), {"EVACLIP_S3_ENDPOINT": "http://s3.local"})
    assert (job1["metadata"]["annotations"][render.ANNOTATION_SPEC_HASH]
            == job2["metadata"]["annotations"][render.ANNOTATION_SPEC_HASH])


def test_credentials_reach_pods_only_as_secret_references():
    body = manifest("s", storage={"credentialsSecret": {"name": "creds"}})
    cm, job = _job(body)
    for role in job["spec"]["pytorchReplicaSpecs"].values():
        env = role["template"]["spec"]["containers"][0]["env"]
        secret_vars = [e for e in env if e["name"] in
                       ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")]
        assert len(secret_vars) == 2
        assert all("value" not in e and e["valueFrom"]["secretKeyRef"]["name"] == "creds"
                   for e in secret_vars)
    assert "valueFrom" not in cm["data"]["config.json"]
    assert '"name": "creds"' in cm["data"]["config.json"]


def _pod_spec(job):
    return job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]


def test_pods_write_only_to_their_scratch_volume(pytorchjob_schema):
    import kubernetes_validate

    _, job = _job(manifest("scratch"), {"EVACLIP_SCRATCH_SIZE": "200Gi"})
    pod = _pod_spec(job)
    [container] = pod["containers"]
    # Every path the trainer and its libraries write to lies in a mounted volume, so the
    # root filesystem can be (and is) read-only.
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    scratch = mounts["/tmp"]
    assert volumes[scratch["name"]]["emptyDir"] == {}  # node disk, not memory
    assert not scratch.get("readOnly")
    env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
    for var in ("EVACLIP_WORKDIR", "EVACLIP_CACHE_DIR", "XDG_CACHE_HOME", "TRITON_HOME",
                "MPLCONFIGDIR"):
        assert env[var].startswith("/tmp"), var
    assert env["EVACLIP_WORKDIR"] != env["EVACLIP_CACHE_DIR"]
    assert container["resources"]["requests"]["ephemeral-storage"] == "200Gi"
    assert "ephemeral-storage" not in container["resources"].get("limits", {})
    assert schema_problems(job, pytorchjob_schema) == []
    kubernetes_validate.validate({"apiVersion": "v1", "kind": "Pod",
                                  "metadata": {"name": "scratch-master-0"}, "spec": pod},
                                 "1.30", strict=True)

    # Without a platform size there is no request, and the volume is still there.
    _, job = _job(manifest("scratch"))
    [container] = _pod_spec(job)["containers"]
    assert "ephemeral-storage" not in str(container["resources"])
    assert "/tmp" in {m["mountPath"] for m in container["volumeMounts"]}
    with pytest.raises(UserError, match="EVACLIP_SCRATCH_SIZE: got '200 GB'"):
        from_env({"EVACLIP_SCRATCH_SIZE": "200 GB"})


def test_settings_from_env_and_their_errors():
    config = from_env({"EVACLIP_ALLOWED_TRAINER_IMAGES": "a/b:*, c/d:1",
                       "EVACLIP_DEFAULT_NODE_SELECTOR": '{"pool": "gpu"}',
                       "EVACLIP_ALLOW_REMOTE_CODE": "true", "EVACLIP_METRICS_PORT": "0"},
                      namespaces=("x", "y"))
    assert config.allowed_images == ("a/b:*", "c/d:1")
    assert config.image_for("a/b:2") == "a/b:2"
    assert config.default_node_selector == {"pool": "gpu"}
    assert config.allow_remote_code and config.metrics_port is None
    assert config.namespaces == ("x", "y")
    with pytest.raises(UserError, match="spec.runtime.image: got 'e/f:1'"):
        config.image_for("e/f:1")
    with pytest.raises(UserError, match="EVACLIP_DEFAULT_TOLERATIONS: must be a JSON list"):
        from_env({"EVACLIP_DEFAULT_TOLERATIONS": "{}"})
    with pytest.raises(UserError, match="EVACLIP_ALLOW_REMOTE_CODE: got 'maybe'"):
        from_env({"EVACLIP_ALLOW_REMOTE_CODE": "maybe"})
    with pytest.raises(UserError, match="--all-namespaces and --namespace"):
        from_env({}, namespaces=("a",), all_namespaces=True)
    assert "EVACLIP_TRAINER_IMAGE" in ENV_VARS


def test_reference_crd_is_the_v1_9_pytorchjob():
    crd = yaml.safe_load(REFERENCE_CRD.read_text())
    assert crd["spec"]["names"]["kind"] == "PyTorchJob"
    assert [v["name"] for v in crd["spec"]["versions"]] == ["v1"]


def test_operator_flags_override_the_environment():
    from evaclip.cli import build_parser
    from evaclip.operator.commands import config_from_args

    parse = build_parser().parse_args
    env = {"EVACLIP_WATCH_NAMESPACES": "ignored", "EVACLIP_METRICS_PORT": "9100"}
    config = config_from_args(parse(["operator", "-n", "team-a", "--namespace", "team-b",
                                     "--liveness", "8081"]), env)
    assert config.namespaces == ("team-a", "team-b") and not config.all_namespaces
    assert config.liveness_endpoint == "http://0.0.0.0:8081/healthz"
    assert config.metrics_port == 9100
    config = config_from_args(parse(["operator", "--all-namespaces", "--metrics-port", "0",
                                     "--liveness", "off"]), env)
    assert config.all_namespaces and config.metrics_port is None
    assert config.liveness_endpoint is None
    with pytest.raises(SystemExit):
        parse(["operator", "-n", "a", "--all-namespaces"])
