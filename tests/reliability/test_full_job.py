"""One full local job under an S3 storm, with bad images in its data and known secrets.

`evaclip run --local --nproc 2` trains the digits linear probe (a subset: 30 training and
10 validation images per class) exactly as a user runs it, with `storage.endpoint`
pointing at a `FaultProxy` in front of an embedded S3 server. While the job stages its
data, fetches it into the node cache, and publishes its outputs, about 8% of all S3
requests get a 503 SlowDown, a 500 InternalError or a connection reset midway through the
response. Four unusable files sit in the training data (truncated, zero bytes, a header
claiming 50000x50000 pixels, text named .jpg). The job's credentials are random markers
(access key, secret key, session token, web-identity token); the embedded store accepts
any key. The tests then check, from what the job left behind:

* the job succeeded and every published object is byte-identical to what the trainer
  wrote, and every staged image is byte-identical to its source (nothing lost or damaged);
* the four bad files were skipped and counted per reason in metrics.json;
* no marker appears in stdout/stderr, the torchrun log, the rendered config, any file of
  the work directory (cache, features, outputs) or any object under the output URI;
* publishing the same outputs again under a storm gives identical objects, and under a
  permanent storm fails with one line and leaves no manifest that looks complete;
* the same job (1 process) whose head upload always fails ends with one line from
  `evaclip run` and publishes no manifest.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import struct
import subprocess
import sys
import uuid
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import tally
import yaml

from evaclip.s3server import EmbeddedS3, FaultProxy
from evaclip.storage import MANIFEST_NAME, StorageError, join_uri

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
EVACLIP = [sys.executable, "-m", "evaclip.cli"]
BUCKET = "rel-data"
OUTPUT = f"s3://{BUCKET}/runs/stormy-probe"
TRAIN_PER_CLASS, VALIDATION_PER_CLASS = 30, 10
STORM = 0.08


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height pixels (a decompression bomb's shape)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
        return struct.pack(">I", len(data)) + kind + data + crc

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0"))


BAD_FILES = {  # file name -> the reason the data module must count it under
    "truncated.png": "truncated",
    "zero.png": "empty",
    "bomb.png": "too_large",
    "notes.jpg": "not_an_image",
}


def _dataset(folder: Path) -> Path:
    from PIL import Image

    from evaclip.trainer.datasets import write_digits

    write_digits(folder)
    for split, keep in (("train", TRAIN_PER_CLASS), ("validation", VALIDATION_PER_CLASS)):
        for class_dir in (folder / split).iterdir():
            for extra in sorted(class_dir.iterdir())[keep:]:
                extra.unlink()
    bad = folder / "train" / "3"
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 30, 30)).save(buf, format="PNG")
    (bad / "truncated.png").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (bad / "zero.png").write_bytes(b"")
    (bad / "bomb.png").write_bytes(_png_header_only(50_000, 50_000))
    (bad / "notes.jpg").write_text("these are my notes, not a picture\n")
    return folder


def _secrets(tmp: Path) -> dict[str, str]:
    """Credentials made of random markers, plus web-identity variables."""
    mark = uuid.uuid4().hex
    token_file = tmp / "web-identity-token"
    token_file.write_text(f"eyJrel-jwt-{mark}")
    return {
        "AWS_ACCESS_KEY_ID": f"AKIAREL{mark[:13].upper()}",
        "AWS_SECRET_ACCESS_KEY": f"rel-secret-{mark}",
        "AWS_SESSION_TOKEN": f"rel-session-{mark[::-1]}",
        "AWS_WEB_IDENTITY_TOKEN_FILE": str(token_file),
        "AWS_ROLE_ARN": "arn:aws:iam::123456789012:role/evaclip-reliability",
    }


def secret_values(secrets: dict[str, str]) -> dict[str, bytes]:
    """The byte strings that must appear nowhere: raw, and base64 as a Secret holds them."""
    values = {k: secrets[k] for k in ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")}
    values["web-identity token"] = Path(secrets["AWS_WEB_IDENTITY_TOKEN_FILE"]).read_text()
    out: dict[str, bytes] = {}
    for name, value in values.items():
        out[name] = value.encode()
        out[f"{name} (base64)"] = base64.b64encode(value.encode())
    return out


def leaks_in(blobs: dict[str, bytes], secrets: dict[str, bytes]) -> list[str]:
    """'where: which secret' for every secret value found in one of the blobs."""
    return [f"{where}: {name}" for where, data in blobs.items()
            for name, value in secrets.items() if value in data]


@pytest.fixture(scope="module")
def job(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("stormy")
    data = _dataset(tmp / "data")
    secrets = _secrets(tmp)
    with EmbeddedS3(buckets=[BUCKET]) as s3, FaultProxy(s3.endpoint, seed=7) as proxy:
        manifest = tmp / "job.yaml"
        manifest.write_text(yaml.safe_dump({
            "apiVersion": "training.evaclip.io/v1alpha1",
            "kind": "EvaClipFinetune",
            "metadata": {"name": "stormy-probe"},
            "spec": {
                "model": {"preset": "eva-clip-18b-tiny", "precision": "fp32"},
                "data": {"train": f"s3://{BUCKET}/digits/train",
                         "validation": f"s3://{BUCKET}/digits/validation",
                         "maxBadFraction": 0.05, "numWorkers": 0},
                "method": {"type": "linearProbe"},
                "training": {"epochs": 30, "batchSize": 32, "learningRate": 0.01},
                "resources": {"gpusPerNode": 0},
                "storage": {"endpoint": proxy.endpoint},
                "output": OUTPUT,
            },
        }))
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        env.update(secrets, AWS_EC2_METADATA_DISABLED="true", AWS_DEFAULT_REGION="us-east-1")
        proxy.storm(STORM)
        run = subprocess.run(
            [*EVACLIP, "run", str(manifest), "--local", "--nproc", "2", "--stage",
             f"{data}={join_uri(f's3://{BUCKET}', 'digits')}", "--workdir", str(tmp / "work")],
            cwd=tmp, env=env, capture_output=True, text=True, timeout=900, check=False)
        proxy.calm()
        yield {"run": run, "tmp": tmp, "data": data, "work": tmp / "work", "s3": s3,
               "proxy": proxy, "faults": dict(proxy.faults), "secrets": secrets,
               "requests": len(proxy.requests)}


def _published(job: dict[str, Any], output: str = OUTPUT) -> dict[str, bytes]:
    """Every object under `output`, read straight from the store (not through the proxy)."""
    storage = job["s3"].storage()
    return {o.relpath: storage.read_bytes(join_uri(output, o.relpath))
            for o in storage.list(output)}


def test_the_job_survives_the_storm_with_identical_artifacts(job: dict[str, Any]) -> None:
    run = job["run"]
    ok = run.returncode == 0
    published = _published(job) if ok else {}
    manifest = json.loads(published.get(MANIFEST_NAME, b"{}"))
    listed = {e["path"]: e for e in manifest.get("files", [])}
    outputs = job["work"] / "outputs"
    problems = [p for p, e in listed.items()
                if published.get(p) is None or len(published[p]) != e["size"]
                or hashlib.sha256(published[p]).hexdigest() != e["sha256"]
                or (outputs / p).read_bytes() != published[p]]
    problems += sorted(set(published) - set(listed) - {MANIFEST_NAME})
    storage = job["s3"].storage()
    staged = sorted(p for p in job["data"].rglob("*") if p.is_file())
    damaged = [p for p in staged if storage.read_bytes(
        join_uri(f"s3://{BUCKET}/digits", str(p.relative_to(job["data"])))) != p.read_bytes()]
    tally.record("s3-transient-storm-job", survived=int(ok and bool(listed) and not problems),
                 lost=len(problems) + len(damaged), requests=job["requests"], **{
                     f"injected {k}": v for k, v in job["faults"].items()})

    assert ok, run.stdout[-3000:] + run.stderr[-3000:]
    for kind in ("503", "500", "reset"):
        assert job["faults"].get(kind, 0) > 0, job["faults"]  # the storm did hit
    assert set(listed) >= {"head.safetensors", "head.json", "metrics.json", "config.json"}
    assert not problems and not damaged, (problems, damaged)


def test_bad_images_are_skipped_and_counted(job: dict[str, Any]) -> None:
    assert job["run"].returncode == 0, job["run"].stderr[-3000:]
    metrics = json.loads((job["work"] / "outputs" / "metrics.json").read_text())
    skipped = metrics["skippedImages"]["train"]
    expected: dict[str, int] = {}
    for reason in BAD_FILES.values():
        expected[reason] = expected.get(reason, 0) + 1
    counted = sum(min(skipped.get(r, 0), n) for r, n in expected.items())
    tally.record("bad-images", runs=len(BAD_FILES), survived=counted,
                 lost=int(metrics["trainImages"] != 10 * TRAIN_PER_CLASS))
    assert {r: n for r, n in skipped.items() if n} == expected
    assert metrics["trainImages"] == 10 * TRAIN_PER_CLASS
    assert metrics["validationImages"] == 10 * VALIDATION_PER_CLASS
    assert sum(metrics["skippedImages"]["validation"].values()) == 0


def test_no_secret_reaches_logs_config_or_artifacts(job: dict[str, Any]) -> None:
    run, work = job["run"], job["work"]
    blobs = {"stdout": run.stdout.encode(), "stderr": run.stderr.encode()}
    for path in sorted(work.rglob("*")):
        if path.is_file():
            blobs[f"work/{path.relative_to(work)}"] = path.read_bytes()
    blobs.update({f"{OUTPUT}/{k}": v for k, v in _published(job).items()})
    found = leaks_in(blobs, secret_values(job["secrets"]))
    scanned = {"config": "work/config.json" in blobs, "log": "work/torchrun.log" in blobs,
               "artifacts": any(k.startswith(OUTPUT) for k in blobs)}
    tally.record("secrets-full-job", survived=int(run.returncode == 0 and all(scanned.values())),
                 leaks=len(found), places=len(blobs))
    assert run.returncode == 0, run.stderr[-3000:]
    assert all(scanned.values()), scanned
    assert not found, found
    # The job did use the marker credentials: the store saw that access key.
    assert job["requests"] > 0


def test_publish_under_a_storm_gives_identical_objects(job: dict[str, Any]) -> None:
    assert job["run"].returncode == 0, job["run"].stderr[-3000:]
    s3, outputs = job["s3"], job["work"] / "outputs"
    with FaultProxy(s3.endpoint, seed=11) as proxy:
        storage = s3.storage(proxy.endpoint, cache_dir=job["tmp"] / "cache-2", backoff=0.05)
        proxy.storm(0.35)
        again = f"s3://{BUCKET}/runs/republished"
        storage.publish(outputs, again)
        proxy.calm()
        injected = sum(proxy.faults.values())
    first, second = _published(job), _published(job, again)
    same = [k for k in first if k != MANIFEST_NAME and second.get(k) == first[k]]
    expected = [k for k in first if k != MANIFEST_NAME]
    tally.record("s3-transient-storm-publish", survived=int(sorted(same) == sorted(expected)),
                 lost=len(expected) - len(same), injected=injected)
    assert injected > 0
    assert sorted(same) == sorted(expected)
    m1, m2 = json.loads(first[MANIFEST_NAME]), json.loads(second[MANIFEST_NAME])
    assert [(e["path"], e["sha256"]) for e in m1["files"]] == \
        [(e["path"], e["sha256"]) for e in m2["files"]]


def test_permanent_storm_fails_clearly_and_leaves_nothing_that_looks_complete(
        job: dict[str, Any]) -> None:
    assert job["run"].returncode == 0, job["run"].stderr[-3000:]
    s3, outputs = job["s3"], job["work"] / "outputs"
    target = f"s3://{BUCKET}/runs/permanent"
    direct = s3.storage()
    direct.publish(outputs, target)  # a complete earlier publish, about to be replaced
    with FaultProxy(s3.endpoint, seed=3) as proxy:
        storage = s3.storage(proxy.endpoint, cache_dir=job["tmp"] / "cache-3", backoff=0.01,
                             max_attempts=2, transfer_attempts=2)
        proxy.storm(1.0, kinds=["500", "reset"], methods=["PUT", "POST"])
        with pytest.raises(StorageError) as failure:
            storage.publish(outputs, target)
        proxy.calm()
    message = str(failure.value)
    left = {o.relpath: o.size for o in direct.list(target)}
    manifest = left.get(MANIFEST_NAME)
    looks_complete = manifest is not None
    tally.record("s3-permanent-storm-publish",
                 survived=int(not looks_complete and "\n" not in message and target in message),
                 lost=0, leaks=int(looks_complete))
    assert "\n" not in message and target in message, message
    assert not looks_complete, left  # the old manifest went first; no new one was written


def test_a_job_whose_publish_keeps_failing_ends_in_one_line_and_no_manifest(
        job: dict[str, Any]) -> None:
    """The same job, 1 process, the data already staged; every upload of its head fails."""
    assert job["run"].returncode == 0, job["run"].stderr[-3000:]
    s3, tmp = job["s3"], job["tmp"]
    output = f"s3://{BUCKET}/runs/never-published"
    doc = yaml.safe_load((tmp / "job.yaml").read_text())
    with FaultProxy(s3.endpoint, seed=5) as proxy:
        doc["metadata"]["name"] = "never-published"
        doc["spec"]["storage"]["endpoint"] = proxy.endpoint
        doc["spec"]["output"] = output
        manifest = tmp / "never.yaml"
        manifest.write_text(yaml.safe_dump(doc))
        proxy.storm(1.0, kinds=["500", "reset"], methods=["PUT", "POST"],
                    path_contains="head.safetensors")
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        env.update(s3.env(), EVACLIP_S3_ENDPOINT="", EVACLIP_S3_MAX_ATTEMPTS="2",
                   EVACLIP_S3_TRANSFER_ATTEMPTS="2")
        run = subprocess.run([*EVACLIP, "run", str(manifest), "--local", "--nproc", "1",
                              "--workdir", str(tmp / "work-never")], cwd=tmp, env=env,
                             capture_output=True, text=True, timeout=600, check=False)
        injected = sum(proxy.faults.values())
    left = {o.relpath for o in s3.storage().list(output)}
    lines = run.stderr.strip().splitlines()
    one_line = run.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: ") \
        and "head.safetensors" in lines[0] and "Traceback" not in run.stderr
    tally.record("s3-permanent-storm-publish", survived=int(one_line and MANIFEST_NAME not in left),
                 leaks=int(MANIFEST_NAME in left), injected=injected)
    assert injected > 0
    assert one_line, run.stderr[-3000:]
    assert MANIFEST_NAME not in left, left
