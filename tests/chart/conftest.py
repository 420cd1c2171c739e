"""Render the evaclip-operator chart with the Helm engine (helm_python) for the chart tests."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import helm_python
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "evaclip-operator"
INSTALL_DOC = ROOT / "docs" / "install.md"
RELEASE = "evaclip-operator"
NAMESPACE = "evaclip-system"

Render = Callable[..., list[dict[str, Any]]]


def documented_values() -> dict[str, dict[str, Any]]:
    """The values files docs/install.md shows, by name.

    Each is a ```yaml block whose first line is `# values: <name>`; the tests render every
    one, so the documented variants cannot drift from the chart.
    """
    blocks = re.findall(r"```yaml\n# values: ([\w-]+)\n(.*?)```", INSTALL_DOC.read_text(), re.S)
    return {name: yaml.safe_load(body) or {} for name, body in blocks}


@pytest.fixture(scope="session")
def variants() -> dict[str, dict[str, Any]]:
    found = documented_values()
    assert found, f"{INSTALL_DOC} shows no `# values: <name>` blocks"
    return found


@pytest.fixture(scope="session")
def chart():
    with helm_python.Chart.load(CHART) as loaded:
        yield loaded


@pytest.fixture(scope="session")
def render(chart) -> Render:
    """render(values, namespace=...) -> every object the chart renders, parsed."""

    def _render(values: dict[str, Any] | None = None, namespace: str = NAMESPACE):
        manifests = chart.render(values=values or {}, name=RELEASE, namespace=namespace)
        objects = []
        for path, text in sorted(manifests.items()):
            if not path.endswith(".yaml"):
                continue
            for doc in yaml.safe_load_all(text):
                if doc:
                    objects.append(doc)
        return objects

    return _render


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Parametrize a `variant` argument with every values file docs/install.md shows."""
    if "variant" in metafunc.fixturenames:
        found = documented_values()
        metafunc.parametrize("variant", list(found.values()), ids=list(found))
