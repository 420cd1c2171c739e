"""Property-based fuzzing: no manifest and no argument list ends in a traceback."""

from __future__ import annotations

import copy
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from evaclip.cli import main
from evaclip.errors import SpecError
from evaclip.manifest import load_text, parse_resource

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "reliability"))
import tally  # noqa: E402

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "digits-linear-probe.yaml"
BASE = yaml.safe_load(EXAMPLE.read_text())

@pytest.fixture(autouse=True)
def _count_in_the_tally(request: pytest.FixtureRequest) -> Iterator[None]:
    """Each property below is one row entry of docs/reliability.md: passed or not."""
    failed_before = request.session.testsfailed
    yield
    if hasattr(request.function, "hypothesis"):
        tally.record("fuzz", survived=int(request.session.testsfailed == failed_before))


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


# --- run and plan: mutated manifests and argument lists, never a job -------------------------

# `run` checks the manifest, the memory plan and then its --stage folders before it creates
# anything; a --stage folder that does not exist therefore guarantees no job starts, while
# everything before it (argument parsing, manifest, plan, --nproc) is exercised.
NO_JOB = ["--stage", "/nonexistent-evaclip-stage=s3://evaclip-demo/x"]
run_flags = st.lists(
    st.sampled_from(["--local", "--nproc", "0", "-1", "2", "abc", "--copy-to", "--workdir",
                     "--stage", "x=y", "=", "a=s3://b/c", "--help", "--", ""])
    | st.text(max_size=8),
    max_size=5,
)


def _one_line_error_or_usage(argv: list[str], capsys: pytest.CaptureFixture[str]) -> int | str:
    try:
        code = main(argv)
    except SystemExit as done:
        assert done.code in (0, 2), done.code
        capsys.readouterr()
        return "usage"
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    if code == 1:
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), err
    return code


@settings(max_examples=120, deadline=None, suppress_health_check=[
    HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(argv=run_flags)
def test_run_arguments_fail_cleanly_without_starting(argv: list[str], tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    work = tmp_path / "work"
    code = _one_line_error_or_usage(
        ["run", str(EXAMPLE), *argv, "--workdir", str(work), *NO_JOB], capsys)
    assert code in ("usage", 1)
    assert not (work / "config.json").exists()


@settings(max_examples=120, deadline=None, suppress_health_check=[
    HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(doc=mutated_manifests())
def test_run_and_plan_of_mutated_manifests_fail_cleanly(doc: object, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]
                                                        ) -> None:
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(doc))
    work = tmp_path / "work"
    assert _one_line_error_or_usage(
        ["run", str(path), "--local", "--workdir", str(work), *NO_JOB], capsys) == 1
    assert not (work / "config.json").exists()
    assert _one_line_error_or_usage(["plan", str(path)], capsys) in (0, 1)
