"""Generate the EvaClipFinetune CustomResourceDefinition from the pydantic models.

pydantic writes JSON Schema; Kubernetes wants a structural OpenAPI v3 schema. The
conversion inlines references, turns `X | None` into `nullable`, keeps descriptions,
defaults, enums and bounds, and marks free-form objects with
`x-kubernetes-preserve-unknown-fields`. Objects whose fields all have defaults get
`default: {}` so the API server fills in their defaults too.
"""

from __future__ import annotations

import copy
from typing import Any

import yaml

from evaclip import spec as s

_KEEP = {
    "type", "description", "default", "enum", "minimum", "maximum", "minLength",
    "maxLength", "minItems", "maxItems", "pattern", "items", "properties", "required",
    "additionalProperties", "nullable", "format", "x-kubernetes-preserve-unknown-fields",
}

PRINTER_COLUMNS = [
    {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
    {"name": "Method", "type": "string", "jsonPath": ".spec.method.type"},
    {"name": "Preset", "type": "string", "jsonPath": ".spec.model.preset"},
    {"name": "Progress", "type": "string", "jsonPath": ".status.progress.percentText"},
    {"name": "Val-Top1", "type": "number", "jsonPath": ".status.metrics.valTop1"},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]


def _convert(node: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    node = dict(node)
    if "$ref" in node:
        target = copy.deepcopy(defs[node.pop("$ref").split("/")[-1]])
        target.update({k: v for k, v in node.items() if k in ("description", "default")})
        return _convert(target, defs)
    if "allOf" in node and len(node["allOf"]) == 1:
        inner = node.pop("allOf")[0]
        return _convert({**inner, **node}, defs)
    if "anyOf" in node:
        branches = [b for b in node.pop("anyOf") if b.get("type") != "null"]
        if len(branches) != 1:
            raise ValueError(f"cannot express a union of {branches} structurally")
        merged = _convert({**branches[0], **node}, defs)
        merged["nullable"] = True
        return merged
    if "const" in node:
        node["enum"] = [node.pop("const")]
    for bound, plain in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
        if bound in node:
            node[plain] = node.pop(bound)
            node[bound] = True
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key == "properties":
            out[key] = {k: _convert(v, defs) for k, v in value.items()}
        elif key == "items":
            out[key] = _convert(value, defs)
        elif key == "additionalProperties":
            if isinstance(value, dict) and value:
                out[key] = _convert(value, defs)
            elif node.get("properties") is None and value is not False:
                out["x-kubernetes-preserve-unknown-fields"] = True
        elif key in _KEEP or key in ("exclusiveMinimum", "exclusiveMaximum"):
            out[key] = value
    if out.get("type") == "object" and "properties" not in out and "additionalProperties" \
            not in out:
        out["x-kubernetes-preserve-unknown-fields"] = True
    if out.get("default", 0) is None:
        del out["default"]
    if out.get("type") == "object" and "properties" in out:
        for name, prop in out["properties"].items():
            if name not in out.get("required", []) and prop.get("type") == "object" \
                    and "properties" in prop and not prop.get("required") \
                    and "default" not in prop:
                prop["default"] = {}
    return out


def openapi_schema(model: type) -> dict[str, Any]:
    """The structural OpenAPI v3 schema of one pydantic model, by wire names."""
    raw = model.model_json_schema(by_alias=True, mode="validation")  # type: ignore[attr-defined]
    return _convert(raw, raw.get("$defs", {}))


def crd() -> dict[str, Any]:
    """The whole CustomResourceDefinition object."""
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{s.PLURAL}.{s.GROUP}"},
        "spec": {
            "group": s.GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": s.KIND,
                "listKind": f"{s.KIND}List",
                "plural": s.PLURAL,
                "singular": s.SINGULAR,
                "shortNames": list(s.SHORT_NAMES),
                "categories": ["evaclip", "training"],
            },
            "versions": [{
                "name": s.VERSION,
                "served": True,
                "storage": True,
                "subresources": {"status": {}},
                "additionalPrinterColumns": PRINTER_COLUMNS,
                "schema": {"openAPIV3Schema": {
                    "type": "object",
                    "description": "EvaClipFinetune fine-tunes an EVA-CLIP vision tower on "
                    "labelled images and publishes a classifier head, adapters or weights, "
                    "and metrics to object storage.",
                    "required": ["spec"],
                    "properties": {
                        "apiVersion": {"type": "string", "description": "API version."},
                        "kind": {"type": "string", "description": "Kind of the resource."},
                        "metadata": {"type": "object"},
                        "spec": openapi_schema(s.EvaClipFinetuneSpec),
                        "status": openapi_schema(s.EvaClipFinetuneStatus),
                    },
                }},
            }],
        },
    }


HEADER = (
    "# Generated by `evaclip crd` from evaclip/spec.py; do not edit by hand.\n"
    "# Regenerate with: make crd\n"
)


def crd_yaml() -> str:
    return HEADER + yaml.safe_dump(crd(), sort_keys=False, width=100)
