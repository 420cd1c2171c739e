"""A loss that turns NaN or inf stops the run with a clear error and keeps the last good checkpoint.

The learning rates the spec accepts (at most 10) cannot make a small tower diverge in fp32,
so the fault is injected where it happens in practice: the frozen weights turn bad
between two runs of the same job (a damaged re-upload of `model.weights`). Run A trains a
`partial` job on good weights and is interrupted (SIGINT) after its first checkpoint; the
weights object is then overwritten with a copy holding one infinite value, and run B, the
same command, resumes from A's newest complete checkpoint (which, for partial training,
holds only the trained blocks), so its first loss is not finite. B must stop on every
rank with one line naming the problem, before any backward or optimizer step, and leave
A's complete checkpoints exactly as they were and add none.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import tally
import torch
import yaml

from evaclip.models import build_tower, save_weights
from evaclip.s3server import EmbeddedS3
from evaclip.storage import join_uri

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
EVACLIP = [sys.executable, "-m", "evaclip.cli"]
PER_CLASS = 4


def _digits(folder: Path) -> Path:
    from evaclip.trainer.datasets import write_digits

    write_digits(folder)
    for split, keep in (("train", PER_CLASS), ("validation", 2)):
        for class_dir in (folder / split).iterdir():
            for extra in sorted(class_dir.iterdir())[keep:]:
                extra.unlink()
    return folder


def _manifest(path: Path, store: EmbeddedS3, weights: str, output: str, epochs: int) -> Path:
    path.write_text(yaml.safe_dump({
        "apiVersion": "training.evaclip.io/v1alpha1",
        "kind": "EvaClipFinetune",
        "metadata": {"name": "nan-guard"},
        "spec": {
            "model": {"preset": "eva-clip-18b-tiny", "precision": "fp32", "weights": weights,
                      "format": "safetensors"},
            "data": {"train": "s3://nan-data/digits/train",
                     "validation": "s3://nan-data/digits/validation", "numWorkers": 0},
            "method": {"type": "partial", "partial": {"trainableBlocks": 1}},
            "training": {"epochs": epochs, "batchSize": 5, "learningRate": 0.05, "seed": 0},
            "deepspeed": {"zeroStage": 2},
            "checkpoint": {"everySteps": 2, "keepLast": 3},
            "resources": {"gpusPerNode": 0},
            "storage": {"endpoint": store.endpoint},
            "output": output,
        },
    }))
    return path


def _env(store: EmbeddedS3) -> dict[str, str]:
    env = {**os.environ, **store.env(), "DS_ACCELERATOR": "cpu"}
    env.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))
    return env


def _command(manifest: Path, work: Path) -> list[str]:
    return [*EVACLIP, "run", str(manifest), "--local", "--nproc", "2", "--workdir", str(work)]


def _run(manifest: Path, work: Path, store: EmbeddedS3) -> subprocess.CompletedProcess[str]:
    return subprocess.run(_command(manifest, work), env=_env(store), cwd=ROOT,
                          capture_output=True, text=True, timeout=600, check=False)


def _run_until_first_checkpoint(manifest: Path, work: Path, store: EmbeddedS3) -> int:
    """Start the job, SIGINT it once a checkpoint is saved; return its exit code."""
    proc = subprocess.Popen(_command(manifest, work), env=_env(store), cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert proc.stdout is not None
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if "Saved checkpoint" in line:
            proc.send_signal(signal.SIGINT)
            break
    rest, _ = proc.communicate(timeout=300)
    assert any("Saved checkpoint" in line for line in seen), "".join(seen)[-3000:] + rest
    return proc.returncode


def _checkpoints(store: EmbeddedS3, output: str) -> dict[str, int]:
    """Every object of a complete checkpoint under <output>/checkpoints/, with its size."""
    objects = {o.relpath: o.size
               for o in store.storage().list(join_uri(output, "checkpoints"))}
    complete = {p.split("/")[0] for p in objects if p.endswith("/COMPLETE")}
    return {p: size for p, size in objects.items() if p.split("/")[0] in complete}


def test_nonfinite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path: Path) -> None:
    tower = build_tower("eva-clip-18b-tiny", device="cpu", seed=0)
    good = save_weights(tower, tmp_path / "good.safetensors")
    with torch.no_grad():
        tower.trunk.blocks[0].mlp.fc1.weight[0, 0] = float("inf")  # a frozen block
    bad = save_weights(tower, tmp_path / "bad.safetensors")

    with EmbeddedS3(buckets=["nan-data"]) as store:
        storage = store.storage()
        storage.upload_tree(_digits(tmp_path / "digits"), "s3://nan-data/digits")
        output = f"s3://nan-data/runs/nan-{uuid.uuid4().hex[:6]}"

        manifest = _manifest(tmp_path / "job.yaml", store,
                             "s3://nan-data/weights/model.safetensors", output, epochs=20)
        storage.upload_file(good, "s3://nan-data/weights/model.safetensors")
        assert _run_until_first_checkpoint(manifest, tmp_path / "work-a", store) == 130
        before = _checkpoints(store, output)
        complete = sorted(p.split("/")[0] for p in before if p.endswith("/COMPLETE"))
        assert complete, before

        storage.upload_file(bad, "s3://nan-data/weights/model.safetensors")
        second = _run(manifest, tmp_path / "work-b", store)
        after = _checkpoints(store, output)
        lines = second.stderr.strip().splitlines()
        clear = (second.returncode == 1 and len(lines) == 1
                 and "non-finite" in lines[0] and f"step {complete[-1].split('-')[-1].lstrip('0')}"
                 in lines[0] and "Traceback" not in second.stderr)
        tally.record("nonfinite-loss", survived=int(clear and after == before),
                     lost=len(set(before) - set(after)), leaks=len(set(after) - set(before)))

    assert second.returncode == 1, second.stdout[-3000:] + second.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), second.stderr[-3000:]
    assert "non-finite" in lines[0] and "Traceback" not in second.stderr
    assert "Resumed at step" in second.stdout
    assert after == before  # nothing saved after the bad loss, nothing of A's removed
    assert clear, lines[0]
