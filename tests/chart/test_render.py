"""The chart renders valid Kubernetes objects for its defaults and every documented variant."""

from __future__ import annotations

import copy
from pathlib import Path

import helm_python
import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import latest_version

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "evaclip-operator"
CRD_FILE = ROOT / "crds" / "training.evaclip.io_evaclipfinetunes.yaml"
CHART_CRD_FILE = CHART / "files" / CRD_FILE.name

# The oldest Kubernetes the chart supports, a common LTS one and the newest the schemas cover.
KUBE_VERSIONS = ("1.27.0", "1.30.0", latest_version())
# Kinds of third-party CRDs with no schema in kubernetes-validate; checked by hand below.
THIRD_PARTY = {("monitoring.coreos.com/v1", "ServiceMonitor")}


def _kind(objects, kind):
    return [o for o in objects if o["kind"] == kind]


def _one(objects, kind):
    found = _kind(objects, kind)
    assert len(found) == 1, f"expected one {kind}, got {[o['metadata']['name'] for o in found]}"
    return found[0]


def _validate(objects) -> None:
    for obj in objects:
        if (obj["apiVersion"], obj["kind"]) in THIRD_PARTY:
            continue
        for version in KUBE_VERSIONS:
            kubernetes_validate.validate(obj, version, strict=True)


def test_strict_validation_catches_a_bad_object(render) -> None:
    """Guards the checks below: the validator rejects a misspelt field of a rendered object."""
    deployment = copy.deepcopy(_one(render(), "Deployment"))
    deployment["spec"]["template"]["spec"]["containers"][0]["imagePullPolicy "] = "Always"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, latest_version(), strict=True)


def test_defaults_render_valid_objects(render) -> None:
    objects = render()
    _validate(objects)
    kinds = sorted(o["kind"] for o in objects)
    assert kinds == sorted([
        "CustomResourceDefinition", "Deployment", "ServiceAccount", "ClusterRole",
        "ClusterRoleBinding", "Service", "ServiceAccount", "Role", "RoleBinding",
    ])


def test_documented_variants_render_valid_objects(render, variant) -> None:
    _validate(render(variant))


@pytest.mark.parametrize("values", [{}, {"watchNamespaces": ["ml-team-a"]}])
def test_lint_is_clean(values) -> None:
    report = helm_python.lint(CHART, values, strict=True, namespace="evaclip-system")
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert not report["errors"] and not problems, report


def test_documented_variants_lint_clean(variant) -> None:
    report = helm_python.lint(CHART, variant, strict=True, namespace="evaclip-system")
    assert not report["errors"], report
    assert not [m for m in report["messages"] if m["severity"] >= 2], report


def test_packaged_chart_renders_the_same(tmp_path, render) -> None:
    """What `helm package` ships (files/ included) renders what the source tree does."""
    archive = helm_python.package(CHART, destination=tmp_path)
    with helm_python.Chart.load(archive) as packaged:
        out = packaged.render(values={}, name="evaclip-operator", namespace="evaclip-system")
        crds = packaged.crds
    objects = [d for path, text in sorted(out.items()) if path.endswith(".yaml")
               for d in yaml.safe_load_all(text) if d]
    assert objects == render()
    assert crds == []  # the CRD is a template, never in crds/ (see docs/install.md)


def test_chart_crd_is_the_generated_crd(render) -> None:
    assert CHART_CRD_FILE.read_bytes() == CRD_FILE.read_bytes(), (
        f"{CHART_CRD_FILE} differs from {CRD_FILE}: run `make crd` and commit both")
    rendered = _one(render(), "CustomResourceDefinition")
    metadata = rendered["metadata"]
    assert metadata.pop("annotations") == {"helm.sh/resource-policy": "keep"}
    assert metadata.pop("labels")["app.kubernetes.io/managed-by"] == "Helm"
    assert rendered == yaml.safe_load(CRD_FILE.read_text())


def test_crd_switches(render) -> None:
    assert not _kind(render({"crds": {"install": False}}), "CustomResourceDefinition")
    crd = _one(render({"crds": {"keep": False}}), "CustomResourceDefinition")
    assert "annotations" not in crd["metadata"]


def test_operator_pod_is_locked_down(render) -> None:
    deployment = _one(render(), "Deployment")
    spec = deployment["spec"]
    assert spec["replicas"] == 1 and spec["strategy"] == {"type": "Recreate"}
    pod = spec["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    (container,) = pod["containers"]
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"] == {"drop": ["ALL"]}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "emptyDir" in volumes[mounts["/tmp"]]
    assert container["resources"]["requests"] and container["resources"]["limits"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    for probe in ("livenessProbe", "readinessProbe"):
        get = container[probe]["httpGet"]
        assert get["path"] == "/healthz" and ports[get["port"]] == 8080


def test_metrics_service_selects_the_operator_pod(render) -> None:
    objects = render({"serviceMonitor": {"enabled": True, "labels": {"release": "prom"}}})
    service = _one(objects, "Service")
    pod = _one(objects, "Deployment")["spec"]["template"]
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    (port,) = service["spec"]["ports"]
    container_ports = {p["name"]: p["containerPort"] for p in pod["spec"]["containers"][0]["ports"]}
    assert port["targetPort"] in container_ports
    monitor = _one(objects, "ServiceMonitor")
    assert monitor["metadata"]["labels"]["release"] == "prom"
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector.items() <= service["metadata"]["labels"].items()
    assert monitor["spec"]["namespaceSelector"]["matchNames"] == [service["metadata"]["namespace"]]
    assert [e["port"] for e in monitor["spec"]["endpoints"]] == [port["name"]]
    assert not _kind(render(), "ServiceMonitor")


def test_custom_images_reach_the_pods(render) -> None:
    objects = render({
        "image": {"repository": "registry.example.com/op", "tag": "1.2.3"},
        "trainer": {"image": "registry.example.com/trainer:1.2.3",
                    "allowedImages": ["registry.example.com/trainer:*"]},
    })
    container = _one(objects, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == "registry.example.com/op:1.2.3"
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["EVACLIP_TRAINER_IMAGE"] == "registry.example.com/trainer:1.2.3"
    assert env["EVACLIP_ALLOWED_TRAINER_IMAGES"] == "registry.example.com/trainer:*"
    default = _one(render(), "Deployment")["spec"]["template"]["spec"]["containers"][0]
    assert default["image"] == "ghcr.io/evaclip/evaclip-operator:0.1.0"  # the appVersion
