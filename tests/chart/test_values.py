"""values.yaml explains itself and bad values fail rendering with a message naming the key."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import helm_python
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "evaclip-operator"


def _schema() -> dict:
    return json.loads((CHART / "values.schema.json").read_text())


def _closed_objects(node: dict, path: str = ""):
    """Every object node of the schema with declared properties, by dotted path."""
    if "properties" in node:
        yield path, node
        for name, child in node["properties"].items():
            yield from _closed_objects(child, f"{path}.{name}".lstrip("."))
    if "items" in node:
        yield from _closed_objects(node["items"], f"{path}[]")


@pytest.mark.parametrize(
    ("values", "key", "problem"),
    [
        ({"replicas": 2}, "''", "additional properties 'replicas' not allowed"),
        ({"trainer": {"imagee": "x"}}, "'/trainer'", "'imagee' not allowed"),
        ({"serviceMonitor": {"enable": True}}, "'/serviceMonitor'", "'enable' not allowed"),
        ({"watchNamespaces": "ml-team-a"}, "'/watchNamespaces'", "want array"),
        ({"metrics": {"port": "9090"}}, "'/metrics/port'", "want integer"),
        ({"crds": {"keep": "yes"}}, "'/crds/keep'", "want boolean"),
        ({"image": {"repository": ""}}, "'/image/repository'", "minLength"),
        ({"trainer": {"image": ""}}, "'/trainer/image'", "minLength"),
        ({"trainer": {"allowedImages": [""]}}, "'/trainer/allowedImages/0'", "minLength"),
        ({"watchNamespaces": ["Team_A"]}, "'/watchNamespaces/0'", "pattern"),
        ({"logLevel": "verbose"}, "'/logLevel'", "must be one of"),
        ({"extraEnv": [{"name": "EVACLIP_MAX_WORKERS", "value": 4}]}, "'/extraEnv/0/value'",
         "want string"),
        ({"extraEnv": [{"name": "1BAD", "value": "x"}]}, "'/extraEnv/0/name'", "pattern"),
        ({"trainer": {"tolerations": [{"key": "gpu", "efect": "NoSchedule"}]}},
         "'/trainer/tolerations/0'", "'efect' not allowed"),
    ],
)
def test_bad_values_fail_naming_the_key(chart, values, key, problem) -> None:
    with pytest.raises(helm_python.HelmValuesError) as err:
        chart.render(values=values, name="evaclip-operator", namespace="evaclip-system")
    message = str(err.value)
    assert f"at {key}" in message and problem in message, message


def test_every_schema_object_rejects_unknown_keys() -> None:
    for path, node in _closed_objects(_schema()):
        assert node.get("additionalProperties") is False, f"{path or 'values'} accepts unknown keys"


def test_schema_and_values_declare_the_same_keys(chart) -> None:
    def keys(values: dict, schema: dict, path: str):
        assert set(values) == set(schema["properties"]), f"{path or 'values'}: values.yaml " \
            f"has {sorted(values)}, the schema {sorted(schema['properties'])}"
        for name, value in values.items():
            child = schema["properties"][name]
            if isinstance(value, dict) and "properties" in child and name != "resources":
                keys(value, child, f"{path}.{name}".lstrip("."))

    keys(chart.values, _schema(), "")
    chart.validate_schema(chart.values)


def test_every_values_key_has_a_comment_naming_allowed_values() -> None:
    """Each key line is directly under a `# -- <sentence>; <allowed values>` comment."""
    lines = (CHART / "values.yaml").read_text().splitlines()
    declared = {p for p, _ in _closed_objects(_schema())}
    stack: list[tuple[int, str]] = []
    checked = 0
    for i, line in enumerate(lines):
        match = re.match(r"^( *)([A-Za-z][\w-]*):", line)
        if not match:
            continue
        indent, name = len(match.group(1)), match.group(2)
        stack = [(d, n) for d, n in stack if d < indent]
        parent = ".".join(n for _, n in stack)
        stack.append((indent, name))
        if parent not in declared:  # a free-form map's entries, e.g. resources.requests.cpu
            continue
        comment = lines[i - 1].strip()
        assert comment.startswith("# -- ") and ";" in comment, (
            f"values.yaml line {i + 1}: {name} needs a `# -- <what>; <allowed values>` comment "
            f"above it, got {comment!r}")
        checked += 1
    assert checked >= 40


@pytest.fixture(scope="module")
def chart_without_schema(tmp_path_factory):
    """The chart as `helm install --skip-schema-validation` sees it: templates check alone."""
    copy = tmp_path_factory.mktemp("chart") / "evaclip-operator"
    shutil.copytree(CHART, copy)
    (copy / "values.schema.json").unlink()
    with helm_python.Chart.load(copy) as loaded:
        yield loaded


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"image": {"repository": ""}}, 'image.repository must be a non-empty image reference'),
        ({"trainer": {"image": ""}}, 'trainer.image must be a non-empty image reference'),
        ({"trainer": {"allowedImages": ["ok:1", ""]}}, "trainer.allowedImages[1] must be a "),
        ({"watchNamespaces": ["Team_A"]}, 'watchNamespaces[0] must be a namespace name'),
        ({"watchNamespaces": ["a"], "trainer": {"namespaces": ["b"]}},
         "trainer.namespaces must be empty when watchNamespaces is set"),
    ],
)
def test_templates_fail_naming_the_key_without_the_schema(chart_without_schema, values,
                                                          message) -> None:
    with pytest.raises(helm_python.HelmRenderError) as err:
        chart_without_schema.render(values=values, name="evaclip-operator", namespace="x")
    assert message in str(err.value) and ", got " in str(err.value), str(err.value)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"serviceAccount": {"create": False}}, "serviceAccount.name must name an existing"),
        ({"trainer": {"serviceAccount": {"create": False}}},
         "trainer.serviceAccount.name must name a service account"),
        ({"watchNamespaces": ["a"], "trainer": {"namespaces": ["b"]}},
         "trainer.namespaces must be empty when watchNamespaces is set"),
    ],
)
def test_inconsistent_values_fail_naming_the_key(chart, values, message) -> None:
    """Combinations the schema cannot express fail in the templates, schema or not."""
    with pytest.raises(helm_python.HelmRenderError) as err:
        chart.render(values=values, name="evaclip-operator", namespace="x")
    assert message in str(err.value) and ", got " in str(err.value), str(err.value)


def test_values_yaml_is_the_documented_default(chart) -> None:
    assert chart.values == yaml.safe_load((CHART / "values.yaml").read_text())
