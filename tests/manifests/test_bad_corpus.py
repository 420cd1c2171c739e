"""Every malformed manifest in tests/manifests/bad/ is refused with one line naming the field.

Each file starts with `# expect: FIELD`, the field (or word) its error message must name.
Four surfaces refuse each one: `evaclip validate`, `evaclip run --local` (before anything
starts: no config written, no store, no torchrun), `evaclip plan`, and the operator (phase
Failed, a Valid=False condition naming the field, a Warning event, no ConfigMap and no
job). The CLI runs in-process through `evaclip.cli.main`; the operator runs as in
production against the emulated API server of tests/operator. Files that a real API server
could never hand to the operator (not one YAML mapping, wrong kind or apiVersion, no
metadata.name) are left out of the operator part only.
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import pytest
import yaml

from evaclip.cli import main
from evaclip.spec import API_VERSION, KIND

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "reliability"))

import tally  # noqa: E402
from kube import PYTORCHJOBS, emulated_cluster  # noqa: E402

BAD = sorted((Path(__file__).parent / "bad").glob("*.yaml"))
IDS = [p.stem for p in BAD]


def _expected(path: Path) -> str:
    first = path.read_text().splitlines()[0]
    assert first.startswith("# expect: "), f"{path.name} lacks its '# expect:' line"
    return first.removeprefix("# expect: ").strip()


def bad_input_class(field: str) -> str:
    """The class of mistake a corpus file stands for, from the field its error names."""
    if field in ("YAML", "manifest", "document"):
        return "not one YAML mapping"
    if field in ("apiVersion", "kind", "spec") or field.startswith("metadata"):
        return "identity and structure"
    section = field.removeprefix("spec.").split(".")[0].split("[")[0]
    return {
        "model": "model", "data": "data", "method": "method", "training": "hyperparameters",
        "deepspeed": "DeepSpeed", "resources": "resources", "runtime": "runtime",
        "storage": "storage and output", "output": "storage and output",
        "checkpoint": "checkpoints", "suspend": "lifecycle",
    }.get(section, "unknown fields")


def _refused_in_one_line(argv: list[str], path: Path,
                         capsys: pytest.CaptureFixture[str]) -> tuple[bool, str]:
    code = main(argv)
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    ok = (code == 1 and len(lines) == 1 and lines[0].startswith("error: ")
          and _expected(path) in lines[0] and "Traceback" not in out + err)
    return ok, err


def test_corpus_is_large_enough() -> None:
    assert len(BAD) >= 40
    classes = Counter(bad_input_class(_expected(p)) for p in BAD)
    assert len(classes) >= 10, classes


@pytest.mark.parametrize("path", BAD, ids=IDS)
def test_validate_refuses_with_the_field(path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["validate", str(path)])
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    ok = code == 1 and out == "" and len(lines) == 1 and lines[0].startswith("error: ") \
        and _expected(path) in lines[0] and "Traceback" not in err
    tally.record("bad-manifest-validate", survived=int(ok),
                 **{f"class: {bad_input_class(_expected(path))}": 1})
    assert code == 1
    assert out == ""
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ")
    assert _expected(path) in lines[0], lines[0]
    assert "Traceback" not in err


@pytest.mark.parametrize("path", BAD, ids=IDS)
def test_run_refuses_before_anything_starts(path: Path, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    work = tmp_path / "work"
    ok, err = _refused_in_one_line(["run", str(path), "--local", "--workdir", str(work)],
                                   path, capsys)
    started = work.exists()  # the workdir, config.json and cache come only after validation
    tally.record("bad-manifest-run", survived=int(ok and not started), leaks=int(started))
    assert ok, err
    assert not started


@pytest.mark.parametrize("path", BAD, ids=IDS)
def test_plan_refuses_with_the_field(path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ok, err = _refused_in_one_line(["plan", str(path)], path, capsys)
    tally.record("bad-manifest-plan", survived=int(ok))
    assert ok, err


def _as_resource(path: Path) -> dict | None:
    """The object a user could create from this file, or None when no API server would take it."""
    try:
        docs = list(yaml.safe_load_all(path.read_text()))
    except yaml.YAMLError:
        return None
    if len(docs) != 1 or not isinstance(docs[0], dict):
        return None
    doc = docs[0]
    meta = doc.get("metadata")
    if doc.get("apiVersion") != API_VERSION or doc.get("kind") != KIND:
        return None
    if not isinstance(meta, dict) or not isinstance(meta.get("name"), str):
        return None
    meta.setdefault("namespace", "default")
    if not _expected(path).startswith("metadata.name"):
        meta["name"] = path.stem  # one resource per file; the original names collide
    return doc


RESOURCES = {p: r for p in BAD if (r := _as_resource(p)) is not None}


@pytest.mark.asyncio
async def test_the_operator_refuses_every_resource_and_creates_nothing(tmp_path: Path) -> None:
    assert len(RESOURCES) >= 40
    async with emulated_cluster(tmp_path) as cluster:
        await cluster.start_operator()
        for doc in RESOURCES.values():
            await cluster.create(doc)
        problems: list[str] = []
        for path, doc in RESOURCES.items():
            name, field = doc["metadata"]["name"], _expected(path)
            try:
                await cluster.wait_phase("Failed", name, timeout=60)
                await cluster.wait(lambda n=name: any(
                    e["type"] == "Warning" and e["involvedObject"]["name"] == n
                    for e in cluster.events()), what=f"a Warning event for {name}")
            except AssertionError as err:
                problems.append(f"{path.name}: {str(err).splitlines()[0]}")
                continue
            valid = cluster.condition(name, "Valid") or {}
            message = valid.get("message", "")
            if valid.get("status") != "False" or field not in message or "\n" in message:
                problems.append(f"{path.name}: condition {valid}")
            created = (cluster.creations(PYTORCHJOBS, name)
                       + cluster.creations("v1/configmaps", f"{name}-trainer-config"))
            if created:
                problems.append(f"{path.name}: {created} object(s) created")
        tally.record("bad-manifest-operator", runs=len(RESOURCES),
                     survived=len(RESOURCES) - len(problems), leaks=0)
        assert not problems, "\n".join(problems)
