"""`evaclip run --local` mistakes and outages that must end in one line, before any work."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from evaclip import cli

JOB = {
    "apiVersion": "training.evaclip.io/v1alpha1",
    "kind": "EvaClipFinetune",
    "metadata": {"name": "cli-errors"},
    "spec": {
        "model": {"preset": "eva-clip-18b-tiny", "precision": "fp32"},
        "data": {"train": "s3://evaclip-demo/digits/train"},
        "method": {"type": "linearProbe"},
        "resources": {"gpusPerNode": 0},
        "output": "s3://evaclip-demo/runs/cli-errors",
    },
}


def _write(tmp_path: Path, doc: dict) -> str:
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(doc))
    return str(path)


def test_an_unreachable_endpoint_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    monkeypatch.setenv("EVACLIP_S3_MAX_ATTEMPTS", "1")
    monkeypatch.setenv("EVACLIP_S3_TRANSFER_ATTEMPTS", "1")
    doc = yaml.safe_load(yaml.safe_dump(JOB))
    doc["spec"]["storage"] = {"endpoint": "http://127.0.0.1:1"}  # nothing listens on port 1
    rc = cli.main(["run", _write(tmp_path, doc), "--local", "--workdir", str(tmp_path / "w")])
    err = capsys.readouterr().err
    assert rc == 1
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: output: could not write to s3://evaclip-demo/runs/cli-errors")
    assert "http://127.0.0.1:1" in last
    assert "Traceback" not in err
    assert not (tmp_path / "w" / "config.json").exists()  # torchrun never started


def test_a_bug_still_shows_its_traceback(tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    from evaclip.trainer import launch

    def broken(*args: object, **kwargs: object) -> dict:
        raise ZeroDivisionError("a bug, not a user mistake")

    monkeypatch.setattr(launch, "run_local", broken)
    with pytest.raises(ZeroDivisionError):
        cli.main(["run", _write(tmp_path, JOB), "--local"])


@pytest.mark.parametrize("nproc", ["0", "-2"])
def test_nproc_below_one_is_refused_naming_the_flag(nproc: str, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture) -> None:
    rc = cli.main(["run", _write(tmp_path, JOB), "--local", "--nproc", nproc,
                   "--workdir", str(tmp_path / "w")])
    err = capsys.readouterr().err
    assert rc == 1
    assert err.strip() == f"error: --nproc: got {nproc}; use 1 or more processes"
    assert not (tmp_path / "w").exists()
