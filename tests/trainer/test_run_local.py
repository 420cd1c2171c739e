"""`evaclip run --local`: the digits example end to end, and manifests it must refuse."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from evaclip.manifest import load_manifest
from evaclip.render import trainer_config
from evaclip.storage import MANIFEST_NAME
from evaclip.trainer.launch import pod_command, pytorchjob_env
from evaclip.trainer.outputs import load_head

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "digits-linear-probe.yaml"
EVACLIP = [sys.executable, "-m", "evaclip.cli"]


def evaclip(*args: str, cwd: Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*EVACLIP, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, check=False)


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One 2-process run of the digits example through the embedded S3 store."""
    cwd = tmp_path_factory.mktemp("demo")
    made = evaclip("datasets", "digits", "data/digits", cwd=cwd)
    assert made.returncode == 0, made.stderr
    run = evaclip("run", str(EXAMPLE), "--local", "--nproc", "2",
                  "--stage", "data/digits=s3://evaclip-demo/digits", "--copy-to", "runs",
                  "--workdir", "work", cwd=cwd, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return {"cwd": cwd, "out": cwd / "runs" / "digits-linear-probe", "work": cwd / "work",
            "stdout": run.stdout, "stderr": run.stderr}


@pytest.mark.slow
def test_the_demo_prints_top1_and_leaves_the_outputs(demo: dict) -> None:
    out = demo["out"]
    for name in ("head.safetensors", "head.json", "metrics.json", "confusion_matrix.png",
                 "loss_curve.png", "config.json", MANIFEST_NAME):
        assert (out / name).is_file(), name
    printed = re.search(r"Validation top-1: (\d\.\d+)", demo["stdout"])
    assert printed, demo["stdout"][-2000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert float(printed.group(1)) == pytest.approx(metrics["top1"], abs=1e-4)
    assert metrics["top1"] >= 0.6
    assert "Outputs: runs/digits-linear-probe/" in demo["stdout"]
    # Progress with rate and ETA while the features are computed.
    assert re.search(r"Features \(train\): .*images/s, ETA", demo["stdout"])


@pytest.mark.slow
def test_the_manifest_lists_every_published_file(demo: dict) -> None:
    out = demo["out"]
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    listed = {e["path"]: e for e in manifest["files"]}
    files = {p.name for p in out.iterdir() if p.name != MANIFEST_NAME}
    assert set(listed) == files
    for name, entry in listed.items():
        assert hashlib.sha256((out / name).read_bytes()).hexdigest() == entry["sha256"]
    assert manifest["uri"] == "s3://evaclip-demo/runs/digits-linear-probe"


@pytest.mark.slow
def test_each_image_was_embedded_once_across_both_ranks(demo: dict) -> None:
    metrics = json.loads((demo["out"] / "metrics.json").read_text())
    assert metrics["worldSize"] == 2
    for split, n in (("train", 1437), ("validation", 360)):
        cached = torch.load(demo["work"] / f"features-{split}.pt")
        assert cached["features"].shape == (n, 128)
        assert cached["indices"].tolist() == list(range(n))
    assert metrics["trainImages"] == 1437 and metrics["validationImages"] == 360
    assert metrics["skippedImages"]["train"] == {k: 0 for k in metrics["skippedImages"]["train"]}


@pytest.mark.slow
def test_metrics_agree_with_the_published_head(demo: dict) -> None:
    out = demo["out"]
    metrics = json.loads((out / "metrics.json").read_text())
    head = json.loads((out / "head.json").read_text())
    weight, bias = load_head(out / "head.safetensors")
    assert weight.shape == (10, 128) and bias.shape == (10,)
    assert head["classNames"] == [str(d) for d in range(10)]
    assert head["embeddingSize"] == 128 and head["featureNormalization"] == "l2"
    assert head["preprocessing"]["imageSize"] == 112
    assert head["preprocessing"]["mean"] == pytest.approx([0.48145466, 0.4578275, 0.40821073])
    cached = torch.load(demo["work"] / "features-validation.pt")
    x = torch.nn.functional.normalize(cached["features"], dim=1)
    pred = (x @ weight.T + bias).argmax(1)
    assert (pred == cached["labels"]).float().mean().item() == pytest.approx(metrics["top1"])
    cm = torch.tensor(metrics["confusionMatrix"])
    assert cm.sum() == 360 and cm.diag().sum().item() / 360 == pytest.approx(metrics["top1"])
    assert len(metrics["history"]) == 100
    config = json.loads((out / "config.json").read_text())
    assert config == json.loads(json.dumps(trainer_config(load_manifest(EXAMPLE))))


# --- manifests that must fail before anything starts -----------------------------------------


def _example() -> dict:
    return yaml.safe_load(EXAMPLE.read_text())


def _with(path: list[str], value: object) -> dict:
    doc = _example()
    node = doc
    for key in path[:-1]:
        node = node[key]
    if value is None:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return doc


BAD = {
    "unknown-method": (_with(["spec", "method", "type"], "dreambooth"),
                       ["spec.method.type", "dreambooth", "linearProbe"]),
    "unknown-preset": (_with(["spec", "model", "preset"], "eva-clip-99b"),
                       ["spec.model.preset", "eva-clip-99b", "eva-clip-18b"]),
    "negative-epochs": (_with(["spec", "training", "epochs"], -3),
                        ["spec.training.epochs", "-3", "greater than or equal to 1"]),
    "missing-train-uri": (_with(["spec", "data", "train"], None),
                          ["spec.data.train", "required"]),
    "not-a-mapping": (["apiVersion", "kind"], ["mapping", "list"]),
    "wrong-kind": (_with(["kind"], "PyTorchJob"), ["kind", "PyTorchJob", "EvaClipFinetune"]),
    "wrong-api-version": (_with(["apiVersion"], "training.evaclip.io/v1"),
                          ["apiVersion", "training.evaclip.io/v1",
                           "training.evaclip.io/v1alpha1"]),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_a_bad_manifest_fails_in_one_line_before_anything_starts(case: str,
                                                                  tmp_path: Path) -> None:
    doc, expected = BAD[case]
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(doc))
    result = evaclip("run", str(path), "--local", "--workdir", "work", cwd=tmp_path)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for text in expected:
        assert text in lines[0], (text, lines[0])
    assert "Traceback" not in result.stderr + result.stdout
    assert not (tmp_path / "work" / "config.json").exists()  # torchrun never started


def test_an_output_that_cannot_be_written_fails_before_any_download(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("in the way")
    doc = _with(["spec", "output"], str(tmp_path / "a-file" / "runs"))
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(doc))
    result = evaclip("run", str(path), "--local", "--workdir", "work", cwd=tmp_path)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: output: cannot write to "), lines
    assert str(tmp_path / "a-file" / "runs") in lines[0]
    assert "Traceback" not in result.stderr
    assert "embedded S3" not in result.stdout  # refused before any store or transfer
    assert not (tmp_path / "work" / "cache").exists()


def test_a_stage_folder_that_does_not_exist_is_named(tmp_path: Path) -> None:
    result = evaclip("run", str(EXAMPLE), "--local", "--stage", "nowhere=s3://evaclip-demo/x",
                     "--workdir", "work", cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.startswith("error: --stage: nowhere is not a directory")


# --- the pod entrypoint -------------------------------------------------------------------


def test_the_pod_entrypoint_runs_torchrun_from_the_pytorchjob_variables() -> None:
    env = pytorchjob_env(4, 23456, nnodes=3, node_rank=2, master_addr="job-master-0")
    argv = pod_command(env)
    assert argv[:3] == [sys.executable, "-m", "torch.distributed.run"]
    for flag in ("--nnodes=3", "--nproc-per-node=4", "--node-rank=2",
                 "--master-addr=job-master-0", "--master-port=23456"):
        assert flag in argv
    assert argv[-2:] == ["--module", "evaclip.trainer.main"]
    assert "--nproc-per-node=8" in pod_command({**env, "PET_NPROC_PER_NODE": "auto"}, 8)


@pytest.mark.slow
def test_too_many_unreadable_images_stop_the_run_with_one_line(tmp_path: Path) -> None:
    from PIL import Image

    for label in ("a", "b"):
        (tmp_path / "data" / label).mkdir(parents=True)
        for i in range(4):
            Image.new("RGB", (8, 8), (60 * i, 0, 0)).save(tmp_path / "data" / label / f"{i}.png")
    (tmp_path / "data" / "a" / "empty.png").write_bytes(b"")
    (tmp_path / "data" / "b" / "text.jpg").write_text("not a picture")
    doc = _example()
    doc["spec"]["data"] = {"train": str(tmp_path / "data"), "validation": str(tmp_path / "data"),
                           "maxBadFraction": 0.1, "numWorkers": 0}
    doc["spec"]["output"] = str(tmp_path / "out")
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(doc))
    result = evaclip("run", str(path), "--local", "--nproc", "1", "--workdir", "work",
                     cwd=tmp_path, timeout=300)
    assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert lines == [
        "error: data.maxBadFraction: 2 of 10 train images (20.0%) cannot be read (empty 1, "
        "not_an_image 1), more than the allowed 10.0%; fix or remove those images, or raise "
        "data.maxBadFraction"
    ]
    assert not (tmp_path / "out" / MANIFEST_NAME).exists()
