"""Fine-tuning end to end: `evaclip run --local` with 2 processes on CPU against moto S3.

The runs are small (a subset of the digits images, 2-3 epochs) to fit the CI budget; the
examples in examples/ train longer (see docs/finetuning.md for their numbers).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import psutil
import pytest
import yaml
from safetensors.torch import load_file

from evaclip.s3server import EmbeddedS3
from evaclip.storage import join_uri

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
EVACLIP = [sys.executable, "-m", "evaclip.cli"]
TRAIN_PER_CLASS = 24
VALIDATION_PER_CLASS = 12


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A moto S3 server for the module, holding a small digits subset."""
    from evaclip.trainer.datasets import write_digits

    folder = tmp_path_factory.mktemp("digits")
    write_digits(folder)
    for split, keep in (("train", TRAIN_PER_CLASS), ("validation", VALIDATION_PER_CLASS)):
        for class_dir in (folder / split).iterdir():
            for extra in sorted(class_dir.iterdir())[keep:]:
                extra.unlink()
    with EmbeddedS3(buckets=["ft-data"]) as server:
        server.storage().upload_tree(folder, "s3://ft-data/digits")
        yield server


def _manifest(tmp_path: Path, store: EmbeddedS3, name: str, method: dict, *,
              epochs: int = 2, zero: int = 2, augment: bool = False, every: int = 4,
              output: str | None = None) -> Path:
    doc = {
        "apiVersion": "training.evaclip.io/v1alpha1",
        "kind": "EvaClipFinetune",
        "metadata": {"name": name},
        "spec": {
            "model": {"preset": "eva-clip-18b-tiny", "precision": "fp32"},
            "data": {"train": "s3://ft-data/digits/train",
                     "validation": "s3://ft-data/digits/validation", "numWorkers": 0},
            "method": method,
            "training": {"epochs": epochs, "batchSize": 16, "learningRate": 0.05,
                         "backboneLearningRate": 0.002, "augment": augment, "seed": 0},
            "deepspeed": {"zeroStage": zero},
            "checkpoint": {"everySteps": every, "keepLast": 2},
            "resources": {"gpusPerNode": 0},
            "storage": {"endpoint": store.endpoint},
            "output": output or f"s3://ft-data/runs/{name}-{uuid.uuid4().hex[:6]}",
        },
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def _env(store: EmbeddedS3) -> dict[str, str]:
    env = {**os.environ, **store.env()}
    env.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))
    env["DS_ACCELERATOR"] = "cpu"
    return env


def _command(manifest: Path, workdir: Path) -> list[str]:
    return [*EVACLIP, "run", str(manifest), "--local", "--nproc", "2", "--workdir",
            str(workdir)]


def _run(manifest: Path, workdir: Path, store: EmbeddedS3, log: list[str] | None = None) -> dict:
    proc = subprocess.run(_command(manifest, workdir), env=_env(store), cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    if log is not None:
        log.append(proc.stdout)
    return json.loads((workdir / "outputs" / "metrics.json").read_text())


def _output(manifest: Path) -> str:
    return yaml.safe_load(manifest.read_text())["spec"]["output"]


LORA = {"type": "lora", "lora": {"rank": 4, "alpha": 8, "includeMlp": True}}


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, store):
    """The uninterrupted LoRA run (ZeRO-2) that other tests compare with."""
    tmp = tmp_path_factory.mktemp("lora")
    manifest = _manifest(tmp, store, "ft-lora", LORA, epochs=2, every=3)
    metrics = _run(manifest, tmp / "work", store)
    return manifest, tmp / "work", metrics


def test_lora_zero2_publishes_adapter_head_metrics_and_checkpoints(lora_run, store) -> None:
    manifest, work, metrics = lora_run
    storage = store.storage()
    output = _output(manifest)
    assert metrics["method"] == "lora" and metrics["deepspeed"]["zeroStage"] == 2
    assert metrics["resumedFromStep"] is None
    assert len(metrics["history"]) == 2
    assert {"trainLoss", "valTop1", "valTop5", "learningRate", "imagesPerSecond"} <= set(
        metrics["history"][0])
    # 240 training images of 10 classes: well above the 10 % of chance.
    assert metrics["top1"] > 0.3
    published = {e["path"] for e in storage.read_published(output)["files"]}
    assert {"adapter/adapter_config.json", "adapter/adapter_model.safetensors",
            "head.safetensors", "head.json", "metrics.json", "loss_curve.png"} <= published
    complete = [o.relpath for o in storage.list(join_uri(output, "checkpoints"))
                if o.relpath.endswith("/COMPLETE")]
    # Every 3 steps and at each epoch end, keeping the last 2.
    assert len(complete) == 2
    assert complete[-1] == f"step-{metrics['steps']:08d}/COMPLETE"


def test_lora_adapter_reproduces_accuracy_in_a_fresh_process(lora_run, store, tmp_path) -> None:
    """peft loads adapter/ onto a freshly built tower of the preset, in a new interpreter."""
    manifest, _, metrics = lora_run
    output = _output(manifest)
    storage = store.storage()
    local = tmp_path / "published"
    for entry in storage.read_published(output)["files"]:
        storage.download(join_uri(output, entry["path"]), local / entry["path"])
    val = tmp_path / "validation"
    for obj in storage.list("s3://ft-data/digits/validation"):
        storage.download(obj.uri, val / obj.relpath)
    script = textwrap.dedent(f"""
        import json, pathlib, torch
        from peft import PeftModel
        from evaclip.models import build_tower
        from evaclip.models.preprocess import clip_transform
        from evaclip.trainer.data import decode_image
        from evaclip.trainer.outputs import load_head
        tower = build_tower("eva-clip-18b-tiny", device="cpu", seed=0)
        model = PeftModel.from_pretrained(tower, {str(local / "adapter")!r}).eval()
        weight, bias = load_head({str(local / "head.safetensors")!r})
        names = json.loads(pathlib.Path({str(local / "head.json")!r}).read_text())["classNames"]
        tf = clip_transform(tower.preset, train=False)
        correct = total = 0
        with torch.no_grad():
            for i, name in enumerate(names):
                files = sorted(pathlib.Path({str(val)!r}, name).iterdir())
                x = torch.stack([tf(decode_image(f.read_bytes())) for f in files])
                z = torch.nn.functional.normalize(model(x), dim=-1)
                correct += int(((z @ weight.T + bias).argmax(1) == i).sum())
                total += len(files)
        print(json.dumps({{"top1": correct / total, "n": total}}))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=300, env=_env(store))
    assert proc.returncode == 0, proc.stderr[-3000:]
    fresh = json.loads(proc.stdout.strip().splitlines()[-1])
    assert fresh["n"] == metrics["validationImages"]
    assert abs(fresh["top1"] - metrics["top1"]) <= 1.0 / fresh["n"] + 1e-9


def _worker_pid(workdir: Path, rank: int) -> int | None:
    path = workdir / f"rank-{rank}.pid"
    try:
        pid = int(path.read_text())
    except (OSError, ValueError):
        return None
    return pid if psutil.pid_exists(pid) else None


def test_sigkill_of_a_rank_resumes_from_the_last_checkpoint(lora_run, store, tmp_path) -> None:
    _, _, reference = lora_run
    manifest = _manifest(tmp_path, store, "ft-lora", LORA, epochs=2, every=3)
    work = tmp_path / "work"
    storage = store.storage()
    checkpoints = join_uri(_output(manifest), "checkpoints")
    first = subprocess.Popen(_command(manifest, work), env=_env(store), cwd=ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    killed_after = None
    deadline = time.monotonic() + 300
    while first.poll() is None and time.monotonic() < deadline:
        done = [o.relpath for o in storage.list(checkpoints) if o.relpath.endswith("COMPLETE")]
        pid = _worker_pid(work, 1)
        if done and pid:
            os.kill(pid, signal.SIGKILL)
            killed_after = done
            break
        time.sleep(0.1)
    out, _ = first.communicate(timeout=300)
    assert killed_after, f"no checkpoint before the run ended: {out[-2000:]}"
    assert first.returncode != 0, "the run should fail when a rank is killed"
    log: list[str] = []
    resumed = _run(manifest, work, store, log)
    assert resumed["resumedFromStep"] and resumed["resumedFromStep"] > 0
    assert f"Resumed at step {resumed['resumedFromStep']} " in log[0]
    assert resumed["steps"] == reference["steps"]
    assert len(resumed["history"]) == 2
    assert abs(resumed["top1"] - reference["top1"]) <= 0.005
    # Same point of the learning-rate schedule at every epoch end.
    assert [h["learningRate"] for h in resumed["history"]] == pytest.approx(
        [h["learningRate"] for h in reference["history"]], rel=1e-6)


def test_rerun_of_another_job_into_a_used_output_is_refused(lora_run, store, tmp_path) -> None:
    """A partial job pointed at the LoRA run's output neither resumes nor crashes in
    DeepSpeed: it stops at start-up naming spec.output, and the output stays as it was."""
    manifest, _, _ = lora_run
    output = _output(manifest)
    storage = store.storage()
    before = storage.read_bytes(join_uri(output, "_SUCCESS.json"))
    other = _manifest(tmp_path, store, "ft-other", {"type": "partial"}, output=output)
    proc = subprocess.run(_command(other, tmp_path / "work"), env=_env(store), cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0, text[-3000:]
    assert "spec.output: " in text and "holds checkpoints of a different job" in text
    assert "parameter-alignment" not in text and "Resumed at step" not in text
    assert storage.read_bytes(join_uri(output, "_SUCCESS.json")) == before


def test_partial_zero2_with_augmentation_publishes_trained_blocks(store, tmp_path) -> None:
    manifest = _manifest(tmp_path, store, "ft-partial",
                         {"type": "partial", "partial": {"trainableBlocks": 2}}, augment=True)
    metrics = _run(manifest, tmp_path / "work", store)
    assert metrics["top1"] > 0.3
    tensors = load_file(str(tmp_path / "work" / "outputs" / "weights" / "trained.safetensors"))
    assert "trunk.norm.weight" in tensors and "trunk.head.weight" in tensors
    blocks = {k.split(".")[2] for k in tensors if k.startswith("trunk.blocks.")}
    assert blocks == {"2", "3"}


def _validation_top1(model, head_file: Path, names: list[str], storage) -> float:
    """Top-1 of a tower-like `model` plus a published head on the validation images."""
    import torch

    from evaclip.models.preprocess import clip_transform
    from evaclip.models.presets import get_preset
    from evaclip.trainer.data import decode_image
    from evaclip.trainer.outputs import load_head

    weight, bias = load_head(head_file)
    tf = clip_transform(get_preset("eva-clip-18b-tiny"), train=False)
    correct = total = 0
    with torch.no_grad():
        for obj in storage.list("s3://ft-data/digits/validation"):
            label = names.index(obj.relpath.split("/")[0])
            x = tf(decode_image(storage.read_bytes(obj.uri)))[None]
            z = torch.nn.functional.normalize(model.eval()(x), dim=-1)
            correct += int((z @ weight.T + bias).argmax(1).item() == label)
            total += 1
    return correct / total


@pytest.mark.parametrize("zero", [2, 3])
def test_full_publishes_the_whole_tower_that_reproduces_accuracy(store, tmp_path, zero) -> None:
    from evaclip.models import build_tower

    manifest = _manifest(tmp_path, store, f"ft-full-z{zero}", {"type": "full"}, zero=zero,
                         epochs=2, every=0)
    work = tmp_path / "work"
    metrics = _run(manifest, work, store)
    assert metrics["deepspeed"]["zeroStage"] == zero and metrics["top1"] > 0.3
    state = load_file(str(work / "outputs" / "weights" / "model.safetensors"))
    tower = build_tower("eva-clip-18b-tiny", device="cpu", seed=123)
    tower.load_state_dict(state, strict=True)
    top1 = _validation_top1(tower, work / "outputs" / "head.safetensors",
                            metrics["classNames"], store.storage())
    assert abs(top1 - metrics["top1"]) <= 1.0 / metrics["validationImages"] + 1e-9


@pytest.mark.parametrize("method", ["lora", "partial"])
def test_lora_and_partial_under_zero3_publish_what_reproduces_accuracy(
        store, tmp_path, method) -> None:
    """Under ZeRO-3 the trained tensors are gathered from both ranks before saving."""
    from peft import PeftModel

    from evaclip.models import build_tower
    from evaclip.trainer.finetune import prepare_for_lora

    spec = LORA if method == "lora" else {"type": "partial", "partial": {"trainableBlocks": 2}}
    manifest = _manifest(tmp_path, store, f"ft-{method}-z3", spec, zero=3, epochs=2, every=0)
    out = tmp_path / "work" / "outputs"
    metrics = _run(manifest, tmp_path / "work", store)
    assert metrics["deepspeed"]["zeroStage"] == 3 and metrics["top1"] > 0.3
    tower = prepare_for_lora(build_tower("eva-clip-18b-tiny", device="cpu", seed=0))
    if method == "lora":
        model = PeftModel.from_pretrained(tower, str(out / "adapter"))
    else:
        trained = load_file(str(out / "weights" / "trained.safetensors"))
        assert all(t.numel() > 0 for t in trained.values())
        missing, unexpected = tower.load_state_dict(trained, strict=False)
        assert not unexpected and not any(k.startswith("trunk.blocks.3.") for k in missing)
        model = tower
    top1 = _validation_top1(model, out / "head.safetensors", metrics["classNames"],
                            store.storage())
    assert abs(top1 - metrics["top1"]) <= 1.0 / metrics["validationImages"] + 1e-9
