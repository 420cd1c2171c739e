"""Reading EvaClipFinetune manifests from files, text or API objects."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from evaclip.errors import SpecError, describe_validation_error
from evaclip.spec import API_VERSION, KIND, EvaClipFinetune


def parse_resource(obj: Any) -> EvaClipFinetune:
    """Validate one manifest mapping; raise SpecError naming the first bad field."""
    if not isinstance(obj, dict):
        raise SpecError(
            f"manifest must be a YAML mapping with apiVersion, kind, metadata and spec; "
            f"got {type(obj).__name__}"
        )
    if obj.get("apiVersion") != API_VERSION:
        raise SpecError(
            f"apiVersion: got {obj.get('apiVersion')!r}; expected {API_VERSION!r}",
            field="apiVersion",
        )
    if obj.get("kind") != KIND:
        raise SpecError(f"kind: got {obj.get('kind')!r}; expected {KIND!r}", field="kind")
    for key in ("metadata", "spec"):
        if not isinstance(obj.get(key), dict):
            raise SpecError(f"{key}: required mapping is missing", field=key)
    # Metadata written by the API server (uid, managedFields, ...) is not ours to check.
    meta = {k: v for k, v in obj["metadata"].items() if k in ("name", "namespace", "labels",
                                                            "annotations")}
    # Validate the JSON the API server would store, with its strict types: no "3" for an
    # integer, no "yes" for a boolean, so `evaclip validate`, `evaclip run` and the
    # operator accept exactly what the CRD accepts.
    document = json.dumps({**obj, "metadata": meta, "status": None}, default=str)
    try:
        return EvaClipFinetune.model_validate_json(document, strict=True)
    except ValidationError as err:
        raise describe_validation_error(err) from None


def load_text(text: str, source: str = "manifest") -> EvaClipFinetune:
    try:
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(err, "problem", err)
        raise SpecError(f"{source}: not valid YAML{where}: {problem}") from None
    if len(docs) != 1:
        raise SpecError(f"{source}: expected exactly one YAML document, found {len(docs)}")
    return parse_resource(docs[0])


def load_manifest(path: str | Path) -> EvaClipFinetune:
    """Load and validate a manifest file."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpecError(f"{p}: no such manifest file") from None
    except (OSError, UnicodeDecodeError) as err:
        raise SpecError(f"{p}: cannot read manifest: {err}") from None
    except ValueError as err:  # a path with a NUL byte, which no file system accepts
        raise SpecError(f"{str(path)!r}: cannot read manifest: {err}") from None
    return load_text(text, source=str(p))
