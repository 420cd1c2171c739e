"""The Dockerfiles are hadolint-clean and agree with the package they install.

There is no Docker engine here, so the images are not built; these tests check what can be
checked without one: lint, the pins, the wheel's contents, and that the operator image's
short dependency list is enough to start `evaclip operator`.
"""

from __future__ import annotations

import importlib.metadata as md
import os
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[2]
HADOLINT = ROOT / ".venv" / "bin" / "hadolint"
TRAINER = ROOT / "Dockerfile.trainer"
OPERATOR = ROOT / "Dockerfile.operator"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def _hadolint(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(HADOLINT), "--no-color", "--failure-threshold", "info", str(path)],
        capture_output=True, text=True, timeout=60,
    )


@pytest.mark.parametrize("dockerfile", [TRAINER, OPERATOR], ids=lambda p: p.name)
def test_hadolint_finds_nothing(dockerfile: Path) -> None:
    result = _hadolint(dockerfile)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_does_flag_a_careless_dockerfile(tmp_path: Path) -> None:
    """Guards the test above: the linter runs and reports problems."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu\nRUN apt-get install curl\nRUN pip install torch\n")
    result = _hadolint(bad)
    assert result.returncode != 0 and "DL3006" in result.stdout, result.stdout


def _pins(dockerfile: Path) -> dict[str, str]:
    """Every `name==version` a Dockerfile installs with pip, by lower-case name."""
    return {n.lower(): v for n, v in
            re.findall(r"(?<![\w.-])([A-Za-z][\w.-]*)==([\w.]+)", dockerfile.read_text())}


@pytest.mark.parametrize("dockerfile", [TRAINER, OPERATOR], ids=lambda p: p.name)
def test_images_run_as_a_non_root_user_and_install_this_version(dockerfile: Path) -> None:
    text = dockerfile.read_text()
    users = re.findall(r"^USER\s+(\S+)", text, re.M)
    assert users and users[-1].split(":")[0] not in ("0", "root"), users
    version = re.search(r"^ARG EVACLIP_VERSION=(\S+)$", text, re.M)
    assert version and version.group(1) == PYPROJECT["project"]["version"]


def test_trainer_image_matches_the_pinned_torch_and_deepspeed() -> None:
    text = TRAINER.read_text()
    torch_pin = next(d for d in PYPROJECT["project"]["dependencies"] if d.startswith("torch=="))
    base = re.findall(r"^FROM\s+(\S+)", text, re.M)[-1]
    assert base.startswith(f"pytorch/pytorch:{torch_pin.split('==')[1]}-cuda"), base
    assert "-runtime" in base
    assert re.search(r"DS_BUILD_OPS=0", text)
    assert _pins(TRAINER)["deepspeed"] == md.version("deepspeed")
    assert re.search(r'^ENTRYPOINT \["evaclip", "launch"\]$', text, re.M)


@pytest.mark.parametrize("dockerfile", [TRAINER, OPERATOR], ids=lambda p: p.name)
def test_build_context_holds_what_the_dockerfile_copies(dockerfile: Path) -> None:
    """.dockerignore leaves out everything but what the builds COPY, and never those."""
    lines = [ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()
             if ln.strip() and not ln.startswith("#")]
    assert lines[0] == "*"
    included = {ln[1:] for ln in lines if ln.startswith("!")}
    copies = re.findall(r"^COPY (?!--from)(.+)$", dockerfile.read_text(), re.M)
    sources = {src for line in copies for src in line.split()[:-1]}
    assert sources and sources <= included, sorted(sources - included)
    assert all((ROOT / src).exists() for src in sources)


def test_trainer_entrypoint_is_the_launch_command() -> None:
    from evaclip.cli import build_parser

    args = build_parser().parse_args(["launch"])
    assert args.func.__module__.startswith("evaclip.trainer.")


def test_operator_image_pins_the_tested_versions() -> None:
    pins = _pins(OPERATOR)
    for name in ("kopf", "kubernetes", "pydantic", "pyyaml", "prometheus-client"):
        assert pins[name] == md.version(name), f"Dockerfile.operator pins {name}=={pins[name]}"
    assert re.search(r'^ENTRYPOINT \["evaclip", "operator"\]$', OPERATOR.read_text(), re.M)


def test_wheel_holds_the_operator_and_trainer_packages(tmp_path: Path) -> None:
    """`pip install .` in the images must carry operator/ and trainer/ as evaclip.*."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for folder in ("evaclip", "operator", "trainer"):
        shutil.copytree(ROOT / folder, src / folder,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "--disable-pip-version-check", str(src), "-w", str(tmp_path / "w")],
        check=True, capture_output=True, timeout=120,
    )
    (wheel,) = (tmp_path / "w").glob("evaclip_operator-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for folder in ("operator", "trainer", "evaclip"):
        prefix = "evaclip" if folder == "evaclip" else f"evaclip/{folder}"
        expected = {f"{prefix}/{p.relative_to(ROOT / folder).as_posix()}"
                    for p in (ROOT / folder).rglob("*.py") if "__pycache__" not in p.parts}
        assert expected and expected <= names, sorted(expected - names)
    assert not any(n.startswith("operator/") or n.startswith("trainer/") for n in names)


def _closure(names: list[str]) -> set[str]:
    """The distributions `names` need, transitively, without optional extras."""
    seen: set[str] = set()
    todo = list(names)
    while todo:
        name = todo.pop().lower().replace("_", "-")
        if name in seen:
            continue
        seen.add(name)
        for line in md.distribution(name).requires or []:
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    return seen


_PROBE = """
import importlib, pkgutil, sys
import evaclip.operator
for module in pkgutil.iter_modules(evaclip.operator.__path__):
    importlib.import_module(f"evaclip.operator.{module.name}")
from evaclip.cli import main
sys.exit(main(["operator", "--help"]))
"""


def _image_site(tmp_path: Path, dists: set[str]) -> Path:
    """A site-packages holding only `dists` (links into the venv's) and this package."""
    site = tmp_path / "site-packages"
    site.mkdir()
    venv_site = Path(str(md.distribution("kopf").locate_file("")))
    for module, owners in md.packages_distributions().items():
        if not any(o.lower().replace("_", "-") in dists for o in owners):
            continue
        for candidate in [venv_site / module, *venv_site.glob(f"{module}.*")]:
            if candidate.exists() and not (site / candidate.name).exists():
                (site / candidate.name).symlink_to(candidate)
    for dist in md.distributions():
        if dist.metadata["Name"].lower().replace("_", "-") in dists:
            info = Path(str(dist._path))  # type: ignore[attr-defined]
            if not (site / info.name).exists():
                (site / info.name).symlink_to(info)
    (site / "evaclip").symlink_to(ROOT / "evaclip")
    return site


def test_operator_starts_with_only_the_operator_image_dependencies(tmp_path: Path) -> None:
    """Python without the venv, with only what Dockerfile.operator installs, runs the operator.

    `-S` drops the venv's site-packages; PYTHONPATH holds links to the pinned distributions
    and everything they require, so an import the image lacks fails here first.
    """
    wanted = [n for n in _pins(OPERATOR) if n not in ("setuptools", "wheel")]
    site = _image_site(tmp_path, _closure(wanted))
    env = {"PATH": os.environ["PATH"], "PYTHONPATH": str(site), "PYTHONDONTWRITEBYTECODE": "1"}
    result = subprocess.run([sys.executable, "-S", "-c", _PROBE], capture_output=True,
                            text=True, env=env, cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "usage: evaclip operator" in result.stdout
    torch_check = subprocess.run([sys.executable, "-S", "-c", "import torch"], env=env,
                                 cwd=tmp_path, capture_output=True, timeout=60)
    assert torch_check.returncode != 0, "the probe environment must not see torch"
