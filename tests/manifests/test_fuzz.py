"""Property-based fuzzing: no manifest and no argument list ends in a traceback."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from evaclip.cli import main
from evaclip.errors import SpecError
from evaclip.manifest import load_text, parse_resource

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "digits-linear-probe.yaml"
BASE = yaml.safe_load(EXAMPLE.read_text())

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10**12, 10**12) | st.floats(allow_nan=True)
    | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=12,
)


def _paths(node: object, prefix: tuple = ()) -> list[tuple]:
    out = [prefix]
    if isinstance(node, dict):
        for key, value in node.items():
            out += _paths(value, prefix + (key,))
    return out


PATHS = [p for p in _paths(BASE) if p]
FIELD_NAMES = sorted({p[-1] for p in PATHS} | {"lora", "partial", "zeroStage", "type"})


@st.composite
def mutated_manifests(draw: st.DrawFn) -> object:
    doc = copy.deepcopy(BASE)
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(PATHS))
        parent = doc
        for key in path[:-1]:
            if not isinstance(parent, dict) or key not in parent:
                break
            parent = parent[key]
        else:
            if isinstance(parent, dict):
                if draw(st.booleans()):
                    parent[path[-1]] = draw(json_values)
                else:
                    parent[draw(st.sampled_from(FIELD_NAMES))] = draw(json_values)
    return doc


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated_manifests())
def test_mutated_manifests_validate_or_fail_cleanly(doc: object) -> None:
    try:
        parse_resource(doc)
    except SpecError as err:
        message = str(err)
        assert "\n" not in message and message


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=200))
def test_arbitrary_text_validates_or_fails_cleanly(text: str) -> None:
    try:
        load_text(text)
    except SpecError as err:
        assert str(err)


args = st.lists(
    st.sampled_from(["validate", "render", "crd", "--help", "-x", "--version", "", "--",
                     str(EXAMPLE), "/nonexistent.yaml", "/", "--local"])
    | st.text(max_size=10),
    max_size=4,
)


@settings(max_examples=150, deadline=None)
@given(args)
def test_cli_arguments_never_raise(argv: list[str]) -> None:
    # argparse exits with status 2 on usage errors; anything else must be a return code.
    if argv[:1] and argv[0] not in ("validate", "render", "crd"):
        argv = ["validate", *argv]
    try:
        code = main(argv)
    except SystemExit as done:
        assert done.code in (0, 2)
    else:
        assert code in (0, 1)


def test_directory_instead_of_file_is_a_clean_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", "/"]) == 1
    assert "cannot read manifest" in capsys.readouterr().err
