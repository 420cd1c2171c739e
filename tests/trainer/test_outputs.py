"""Publishing a run's outputs: everything under the output URI, the manifest last."""

from __future__ import annotations

import json

import pytest
import torch

from evaclip.storage import MANIFEST_NAME, StorageError
from evaclip.trainer import outputs

METRICS = {"top1": 0.5, "top5": 1.0, "confusionMatrix": [[1, 1], [0, 2]],
           "history": [{"epoch": 1, "trainLoss": 0.9, "valTop1": 0.25},
                       {"epoch": 2, "trainLoss": 0.7, "valTop1": 0.5}]}


def write_run(ctx) -> object:
    folder = outputs.output_dir(ctx)
    outputs.write_head(folder, ctx, torch.randn(2, 128), torch.zeros(2), ["cat", "dog"])
    outputs.write_common_outputs(folder, ctx, METRICS, ["cat", "dog"])
    return folder


def test_outputs_are_complete_and_the_manifest_is_written_last(tmp_path, make_ctx) -> None:
    out = tmp_path / "out"
    ctx = make_ctx(output=str(out))
    outputs.publish(ctx, write_run(ctx))
    names = {p.name for p in out.iterdir()}
    assert names == {"head.safetensors", "head.json", "metrics.json", "config.json",
                     "confusion_matrix.png", "loss_curve.png", MANIFEST_NAME}
    for png in ("confusion_matrix.png", "loss_curve.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    manifest_time = (out / MANIFEST_NAME).stat().st_mtime_ns
    assert all(p.stat().st_mtime_ns <= manifest_time for p in out.iterdir())
    listed = {e["path"] for e in json.loads((out / MANIFEST_NAME).read_text())["files"]}
    assert listed == names - {MANIFEST_NAME}
    head = json.loads((out / "head.json").read_text())
    assert head["classNames"] == ["cat", "dog"] and head["embeddingSize"] == 128
    assert head["preprocessing"]["interpolation"] == "bicubic"
    assert json.loads((out / "config.json").read_text())["spec"]["output"] == str(out)


def test_a_failed_publish_leaves_no_manifest(tmp_path, make_ctx, bucket, monkeypatch) -> None:
    uri = f"s3://{bucket}/runs/job"
    ctx = make_ctx(output=uri)
    outputs.publish(ctx, write_run(ctx))  # an earlier complete run
    assert ctx.storage.read_published(uri)["files"]
    real = ctx.storage.upload_file

    def flaky(path, dest, **kw):
        if str(dest).endswith("metrics.json"):
            raise StorageError("connection reset while uploading")
        return real(path, dest, **kw)

    monkeypatch.setattr(ctx.storage, "upload_file", flaky)
    with pytest.raises(StorageError):
        outputs.publish(ctx, write_run(ctx))
    assert not ctx.storage.exists(f"{uri}/{MANIFEST_NAME}")
