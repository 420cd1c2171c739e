"""The Deployment starts `evaclip operator` with flags it accepts and settings it reads.

The rendered command and args go through the real `evaclip` argument parser and the
rendered environment through the operator's own `settings.from_env`, so a renamed flag or
variable on either side fails here instead of being ignored in a cluster.
"""

from __future__ import annotations

import helm_python
import pytest

from evaclip.cli import build_parser
from evaclip.operator.settings import ENV_VARS, from_env
from evaclip.spec import DEFAULT_TRAINER_IMAGE

CUSTOM = {
    "logLevel": "debug",
    "trainer": {
        "image": "registry.example.com/evaclip/trainer:1.0",
        "allowedImages": ["registry.example.com/evaclip/trainer:*", "ghcr.io/acme/t:2"],
        "gpuResourceName": "amd.com/gpu",
        "nodeSelector": {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"},
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists",
                         "effect": "NoSchedule"}],
        "allowRemoteCode": True,
        "serviceAccount": {"name": "gpu-trainer"},
    },
    "storage": {"endpoint": "https://minio.example.com:9000", "region": "eu-west-1",
                "credentialsSecret": "team-s3"},
    "health": {"port": 8181},
    "metrics": {"port": 9191, "service": {"port": 9191}},
}


def _deployment(objects):
    (deployment,) = [o for o in objects if o["kind"] == "Deployment"]
    return deployment


def _container(objects):
    (container,) = _deployment(objects)["spec"]["template"]["spec"]["containers"]
    return container


def _env(objects) -> dict[str, str]:
    return {e["name"]: e["value"] for e in _container(objects)["env"]}


def test_command_and_args_parse_as_the_operator_command(render) -> None:
    for values, level in (({}, "INFO"), (CUSTOM, "DEBUG"),
                          ({"watchNamespaces": ["a", "b"]}, "INFO")):
        container = _container(render(values))
        assert container["command"] == ["evaclip", "operator"]
        args = build_parser().parse_args([*container["command"][1:], *container["args"]])
        assert args.func.__module__ == "evaclip.operator.commands"
        assert args.log_level == level


def test_every_variable_is_one_the_operator_reads(render) -> None:
    for values in ({}, CUSTOM, {"watchNamespaces": ["a"]}):
        unknown = {n for n in _env(render(values)) if n.startswith("EVACLIP_")} - set(ENV_VARS)
        assert not unknown, f"the operator reads no {sorted(unknown)}"


def test_values_become_the_operator_configuration(render) -> None:
    objects = render(CUSTOM)
    config = from_env(_env(objects))
    trainer = CUSTOM["trainer"]
    assert config.trainer_image == trainer["image"]
    assert config.allowed_images == tuple(trainer["allowedImages"])
    assert config.image_for("registry.example.com/evaclip/trainer:1.1")  # the glob matches
    assert config.gpu_resource == "amd.com/gpu"
    assert dict(config.default_node_selector) == trainer["nodeSelector"]
    assert [dict(t) for t in config.default_tolerations] == trainer["tolerations"]
    assert config.allow_remote_code is True
    assert config.trainer_service_account == "gpu-trainer"
    assert (config.default_s3_endpoint, config.default_s3_region,
            config.default_credentials_secret) == (
        "https://minio.example.com:9000", "eu-west-1", "team-s3")
    assert config.all_namespaces and not config.namespaces

    container = _container(objects)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    probe = container["livenessProbe"]["httpGet"]
    assert config.liveness_endpoint == f"http://0.0.0.0:{ports[probe['port']]}{probe['path']}"
    assert config.metrics_port == ports["metrics"] == 9191


def test_watched_namespaces_reach_the_operator(render) -> None:
    config = from_env(_env(render({"watchNamespaces": ["ml-team-a", "ml-team-b"]})))
    assert config.namespaces == ("ml-team-a", "ml-team-b") and not config.all_namespaces


def test_defaults_are_the_products_defaults(render) -> None:
    objects = render()
    config = from_env(_env(objects))
    assert config.trainer_image == DEFAULT_TRAINER_IMAGE
    assert config.allowed_images == ()
    assert config.allow_remote_code is False
    assert config.gpu_resource == "nvidia.com/gpu"
    assert config.default_s3_endpoint is None and config.default_credentials_secret is None
    trainer_accounts = [o["metadata"]["name"] for o in objects if o["kind"] == "ServiceAccount"
                        and o["metadata"]["labels"].get("app.kubernetes.io/component")
                        == "trainer"]
    assert trainer_accounts == [config.trainer_service_account] == ["evaclip-operator-trainer"]


def test_extra_env_reaches_the_operator(render) -> None:
    extra = [{"name": "EVACLIP_MAX_WORKERS", "value": "4"},
             {"name": "EVACLIP_PLAN_CHECK", "value": "off"}]
    config = from_env(_env(render({"extraEnv": extra})))
    assert config.max_workers == 4 and config.plan_check == "off"


def test_extra_env_may_not_repeat_a_variable_the_chart_sets(chart, render) -> None:
    """Every variable the Deployment sets from the values is refused in extraEnv."""
    set_by_chart = set(_env(render())) | set(_env(render({"watchNamespaces": ["a"]})))
    for name in sorted(set_by_chart):
        values = {"extraEnv": [{"name": "OTHER", "value": "1"}, {"name": name, "value": "x"}]}
        with pytest.raises(helm_python.HelmRenderError) as err:
            chart.render(values=values, name="evaclip-operator", namespace="x")
        assert "extraEnv[1].name must not be a variable the chart sets" in str(err.value)
        assert str(err.value).endswith(f"got {name}"), str(err.value)
    render({"extraEnv": [{"name": "EVACLIP_RESTART_POLICY", "value": "OnFailure"}]})
