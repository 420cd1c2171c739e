"""The documentation is current, its links resolve and its examples work."""

from __future__ import annotations

import contextlib
import io
import re
import shlex
from pathlib import Path

import helm_python
import pytest
import yaml

from evaclip.cli import build_parser, main
from evaclip.crd import crd
from evaclip.manifest import load_manifest
from evaclip.reference import spec_reference

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
REFERENCE = DOCS / "spec-reference.md"
QUICKSTART = DOCS / "quickstart.md"
CHART = ROOT / "charts" / "evaclip-operator"
PAGES = sorted([*DOCS.glob("*.md"), ROOT / "README.md", CHART / "README.md"])


def test_spec_reference_is_current() -> None:
    assert REFERENCE.read_text() == spec_reference(), (
        "docs/spec-reference.md is stale: run `make docs` and commit it")


def test_cli_prints_the_reference() -> None:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["docs", "spec-reference"]) == 0
    assert out.getvalue() == spec_reference()


def _schema_fields(node: dict, path: str):
    for name, child in node.get("properties", {}).items():
        yield path, name, child
        yield from _schema_fields(child, f"{path}.{name}")
        if "items" in child:
            yield from _schema_fields(child["items"], f"{path}.{name}[]")


def _sections(text: str) -> dict[str, str]:
    parts = re.split(r"^## (\S+)\n", text, flags=re.M)
    return dict(zip(parts[1::2], parts[2::2], strict=True))


def test_reference_documents_every_field_with_its_schema_facts() -> None:
    schema = crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]
    sections = _sections(REFERENCE.read_text())
    count = 0
    for root in ("spec", "status"):
        for path, name, node in _schema_fields(schema[root], root):
            rows = [r for r in sections[path].splitlines()
                    if re.match(rf"^\| \[?`{re.escape(name)}`", r)]
            assert len(rows) == 1, f"{path}.{name} is not in section {path} exactly once"
            cells = [c.strip() for c in re.split(r"(?<!\\)\|", rows[0])[1:-1]]
            assert cells[5] == " ".join(node.get("description", "").split()).replace("|", "\\|")
            for value in node.get("enum", []):
                assert f"`{value}`" in cells[4], f"{path}.{name}: enum value {value} missing"
            if "default" in node:
                assert cells[3], f"{path}.{name}: default missing"
            if "minimum" in node:
                assert str(node["minimum"]) in cells[4], f"{path}.{name}: minimum missing"
            count += 1
    assert count > 80


def test_reference_links_point_at_sections() -> None:
    text = REFERENCE.read_text()
    anchors = {"".join(c for c in h.lower() if c.isalnum() or c in "-_")
               for h in re.findall(r"^## (\S+)$", text, re.M)}
    for target in re.findall(r"\]\(#([^)]+)\)", text):
        assert target in anchors, f"link to #{target} has no section"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_relative_links_resolve(page: Path) -> None:
    for target in re.findall(r"\]\((?!https?://|#)([^)#\s]+)", page.read_text()):
        assert (page.parent / target).exists(), f"{page.name} links to missing {target}"


def test_readme_links_the_documentation_after_the_first_commands() -> None:
    text = (ROOT / "README.md").read_text()
    for page in ("docs/install.md", "docs/quickstart.md", "docs/spec-reference.md",
                 "docs/images.md"):
        assert f"({page})" in text, f"README.md does not link {page}"
    assert text.index("make demo") < text.index("## Documentation")


def _code_blocks(page: Path, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", page.read_text(), re.S)


def test_quickstart_manifests_are_valid(tmp_path: Path) -> None:
    manifests = [b for b in _code_blocks(QUICKSTART, "yaml") if "kind: EvaClipFinetune" in b]
    applied = re.findall(r"kubectl .*apply -f (examples/\S+)", QUICKSTART.read_text())
    assert manifests and applied
    for i, text in enumerate(manifests):
        path = tmp_path / f"manifest-{i}.yaml"
        path.write_text(text)
        load_manifest(path)
    for example in applied:
        load_manifest(ROOT / example)


def test_quickstart_commands_exist() -> None:
    """Every `evaclip ...` line of the quickstart parses with the real CLI."""
    parser = build_parser()
    commands = [line.split("evaclip ", 1)[1]
                for block in _code_blocks(QUICKSTART, "sh") for line in block.splitlines()
                if line.startswith(".venv/bin/evaclip ")]
    assert len(commands) >= 3
    for command in commands:
        parser.parse_args(shlex.split(command))


def test_quickstart_helm_install_renders() -> None:
    """The quickstart's `helm install ... --set` flags are valid values for the chart."""
    block = next(b for b in _code_blocks(QUICKSTART, "sh") if "helm install" in b)
    sets = re.findall(r"--set (\S+)", block.replace("\\\n", " "))
    values: dict = {}
    for expression in sets:
        parsed = helm_python.parse_set_string(shlex.split(expression)[0])
        values = {**values, **{k: {**values.get(k, {}), **v} for k, v in parsed.items()}}
    assert values["trainer"]["namespaces"] == ["ml-team-a"]
    with helm_python.Chart.load(CHART) as chart:
        out = chart.render(values=values, name="evaclip-operator", namespace="evaclip-system")
    objects = [d for path, text in out.items() if path.endswith(".yaml")
               for d in yaml.safe_load_all(text) if d]
    trainer_accounts = [o for o in objects if o["kind"] == "ServiceAccount"
                        and o["metadata"]["namespace"] == "ml-team-a"]
    assert [a["metadata"]["name"] for a in trainer_accounts] == ["evaclip-operator-trainer"]


def test_quickstart_shows_the_printer_columns() -> None:
    columns = [c["name"].upper() for c in crd()["spec"]["versions"][0]["additionalPrinterColumns"]]
    block = next(b for b in _code_blocks(QUICKSTART, "text") if b.startswith("NAME"))
    assert block.split("\n")[0].split() == ["NAME", *columns]
