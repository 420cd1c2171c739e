"""The shipped fine-tuning examples load, say how to run them, and fit their plan."""

from __future__ import annotations

from pathlib import Path

import pytest

from evaclip.manifest import load_manifest
from evaclip.plan import require_fit

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.mark.parametrize("method", ["lora", "partial", "full"])
def test_example_is_valid_documented_and_fits(method) -> None:
    path = EXAMPLES / f"digits-{method}.yaml"
    resource = load_manifest(path)
    assert resource.spec.method.type == method
    header = path.read_text().split("apiVersion:")[0]
    assert "evaclip datasets digits .cache/datasets/digits" in header
    assert f"evaclip run examples/digits-{method}.yaml --local --nproc 2" in header
    assert "--stage .cache/datasets/digits=s3://evaclip-demo/digits" in header
    assert require_fit(resource).fits
