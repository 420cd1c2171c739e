"""The CRD is generated from the spec models and stays structural and documented."""

from __future__ import annotations

from pathlib import Path

import yaml

from evaclip.crd import crd, crd_yaml

ROOT = Path(__file__).resolve().parents[2]
CRD_FILE = ROOT / "crds" / "training.evaclip.io_evaclipfinetunes.yaml"


def _schema() -> dict:
    return crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def _walk(node: dict, path: str):
    yield path, node
    for name, child in node.get("properties", {}).items():
        yield from _walk(child, f"{path}.{name}")
    if "items" in node:
        yield from _walk(node["items"], f"{path}[]")


def test_committed_crd_is_current() -> None:
    assert CRD_FILE.read_text() == crd_yaml(), "crds/ is stale: run `make crd` and commit"


def test_names_are_the_published_ones() -> None:
    obj = yaml.safe_load(CRD_FILE.read_text())
    names = obj["spec"]["names"]
    assert obj["spec"]["group"] == "training.evaclip.io"
    assert obj["spec"]["scope"] == "Namespaced"
    assert (names["kind"], names["plural"], names["shortNames"]) == (
        "EvaClipFinetune", "evaclipfinetunes", ["ecf"])
    version = obj["spec"]["versions"][0]
    assert version["name"] == "v1alpha1" and version["subresources"] == {"status": {}}
    columns = [c["name"] for c in version["additionalPrinterColumns"]]
    assert columns == ["Phase", "Method", "Preset", "Progress", "Val-Top1", "Age"]


def test_every_field_is_typed_and_described() -> None:
    for section in ("spec", "status"):
        for path, node in _walk(_schema()["properties"][section], section):
            assert "description" in node or path.endswith("[]"), f"{path} has no description"
            typed = "type" in node or node.get("x-kubernetes-preserve-unknown-fields")
            assert typed, f"{path} has no type (not structural)"
            assert not ({"anyOf", "oneOf", "allOf", "$ref"} & node.keys()), path


def test_defaults_enums_and_bounds_reach_the_schema() -> None:
    spec = _schema()["properties"]["spec"]["properties"]
    assert spec["method"]["properties"]["type"]["enum"] == [
        "linearProbe", "lora", "partial", "full"]
    assert spec["method"]["properties"]["type"]["default"] == "linearProbe"
    assert "eva-clip-18b" in spec["model"]["properties"]["preset"]["enum"]
    epochs = spec["training"]["properties"]["epochs"]
    assert epochs["minimum"] == 1 and epochs["default"] == 10
    assert spec["deepspeed"]["properties"]["zeroStage"]["maximum"] == 3
    # Objects with only defaulted fields default to {} so the API server fills them in.
    assert spec["training"]["default"] == {}
    assert set(_schema()["required"]) == {"spec"}
    assert set(spec) >= {"model", "data", "method", "training", "resources", "output",
                         "storage"}
