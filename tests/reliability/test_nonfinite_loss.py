"""A loss that turns NaN or inf stops the run with a clear error and keeps the last good checkpoint.

The learning rates the spec accepts (at most 10) cannot make a small tower diverge in fp32,
so the fault is injected where it happens in practice: the frozen weights turn bad
between two runs of the same job (a damaged re-upload of `model.weights`). Run A trains a
`partial` job for one epoch on good weights and checkpoints; run B, the same job with two
epochs, resumes from A's newest checkpoint (which, for partial training, holds only the
trained blocks) on weights with one infinite value, so its first loss is not finite. B
must stop on every rank with one line naming the problem, before any backward or
optimizer step, and leave the checkpoint set exactly as A left it.
"""

from __future__ import annotations

import os
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


def _run(manifest: Path, work: Path, store: EmbeddedS3) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **store.env(), "DS_ACCELERATOR": "cpu"}
    env.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))
    return subprocess.run([*EVACLIP, "run", str(manifest), "--local", "--nproc", "2",
                           "--workdir", str(work)], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=600, check=False)


def _checkpoints(store: EmbeddedS3, output: str) -> dict[str, int]:
    """Every object under <output>/checkpoints/ with its size."""
    return {o.relpath: o.size for o in store.storage().list(join_uri(output, "checkpoints"))}


def test_nonfinite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path: Path) -> None:
    tower = build_tower("eva-clip-18b-tiny", device="cpu", seed=0)
    good = save_weights(tower, tmp_path / "good.safetensors")
    with torch.no_grad():
        tower.trunk.blocks[0].mlp.fc1.weight[0, 0] = float("inf")  # a frozen block
    bad = save_weights(tower, tmp_path / "bad.safetensors")

    with EmbeddedS3(buckets=["nan-data"]) as store:
        storage = store.storage()
        storage.upload_tree(_digits(tmp_path / "digits"), "s3://nan-data/digits")
        storage.upload_file(good, "s3://nan-data/weights/good.safetensors")
        storage.upload_file(bad, "s3://nan-data/weights/bad.safetensors")
        output = f"s3://nan-data/runs/nan-{uuid.uuid4().hex[:6]}"

        first = _run(_manifest(tmp_path / "a.yaml", store, "s3://nan-data/weights/good.safetensors",
                               output, epochs=1), tmp_path / "work-a", store)
        assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
        before = _checkpoints(store, output)
        complete = sorted(p.split("/")[0] for p in before if p.endswith("/COMPLETE"))
        assert complete, before

        second = _run(_manifest(tmp_path / "b.yaml", store, "s3://nan-data/weights/bad.safetensors",
                                output, epochs=2), tmp_path / "work-b", store)
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
