"""The linear probe: each image through the tower once, split across ranks; the head."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import pytest
import torch
from PIL import Image

from evaclip.storage import MANIFEST_NAME
from evaclip.trainer import linear_probe
from evaclip.trainer.data import build_datasets
from evaclip.trainer.outputs import load_head


def write_folder(root: Path, counts: dict[str, int], bad: int = 0) -> None:
    for c, (label, n) in enumerate(counts.items()):
        (root / label).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            buf = io.BytesIO()
            shade = 40 + 200 * c // max(1, len(counts) - 1)
            Image.new("RGB", (20, 20), (shade, 255 - shade, (i * 37) % 255)).save(buf, "PNG")
            (root / label / f"{i}.png").write_bytes(buf.getvalue())
    for i in range(bad):
        (root / next(iter(counts)) / f"broken-{i}.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")


class CountingTower(torch.nn.Module):
    """A real tiny tower that records the batch size of every forward call."""

    def __init__(self, tower: torch.nn.Module) -> None:
        super().__init__()
        self.tower = tower
        self.preset = tower.preset
        self.batches: list[int] = []

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self.batches.append(len(images))
        return self.tower(images)


@pytest.fixture
def tower(make_ctx) -> CountingTower:
    return CountingTower(linear_probe.load_tower(make_ctx()))


def test_each_rank_embeds_a_disjoint_share_once(tmp_path, make_ctx, tower) -> None:
    write_folder(tmp_path / "train", {"a": 6, "b": 5}, bad=1)
    spec = {"data": {"train": str(tmp_path / "train"), "validation": str(tmp_path / "train")}}
    seen = []
    for rank in (0, 1):
        ctx = make_ctx(rank=rank, world_size=2, **spec)
        train, _, _ = build_datasets(ctx)
        fs = linear_probe.compute_local_features(ctx, tower, train)
        assert fs.features.shape == (len(fs.indices), 128)
        seen.append(fs)
    indices = [i for fs in seen for i in fs.indices.tolist()]
    assert len(indices) == len(set(indices)) == 11  # 12 files, the broken one skipped
    assert sum(fs.bad.total for fs in seen) == 1
    assert sum(tower.batches) == 11


def test_features_are_computed_once_however_many_epochs(tmp_path, make_ctx, tower,
                                                        monkeypatch) -> None:
    write_folder(tmp_path / "train", {"a": 7, "b": 6, "c": 5})
    write_folder(tmp_path / "val", {"a": 2, "b": 2, "c": 2})
    monkeypatch.setattr(linear_probe, "load_tower", lambda ctx: tower)
    out = tmp_path / "out"
    ctx = make_ctx(data={"train": str(tmp_path / "train"), "validation": str(tmp_path / "val")},
                   training={"epochs": 40, "batchSize": 4, "learningRate": 0.05,
                             "saveFeatures": True}, output=str(out))
    metrics = linear_probe.run(ctx)
    assert len(tower.batches) == math.ceil(18 / 4) + math.ceil(6 / 4)
    assert sum(tower.batches) == 24
    assert len(metrics["history"]) == 40
    # The published head reproduces the reported accuracy on the cached features.
    weight, bias = load_head(out / "head.safetensors")
    cached = torch.load(ctx.workdir / "features-validation.pt")
    x = torch.nn.functional.normalize(cached["features"], dim=1)
    top1 = ((x @ weight.T + bias).argmax(1) == cached["labels"]).float().mean().item()
    assert top1 == pytest.approx(metrics["top1"])
    assert metrics["top1"] > 0.9  # three flat colours are easy to tell apart
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["top1"] == metrics["top1"]
    assert sum(map(sum, saved["confusionMatrix"])) == 6
    assert (out / MANIFEST_NAME).is_file()
    published = torch.load(out / "features" / "features-train.pt")
    assert published["features"].shape == (18, 128)


def test_head_standardisation_is_folded_into_the_saved_weights(make_ctx) -> None:
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(3, 16, generator=g)
    # A large shared offset: the features differ only in a small part of their length.
    labels = torch.arange(60) % 3
    feats = 50 + centres[labels] + 0.3 * torch.randn(60, 16, generator=g)
    train = linear_probe.FeatureSet("train", feats[:45], labels[:45], torch.arange(45), 45)
    val = linear_probe.FeatureSet("validation", feats[45:], labels[45:], torch.arange(15), 15)
    ctx = make_ctx(training={"epochs": 30, "batchSize": 8, "learningRate": 0.05})
    result = linear_probe.train_head(ctx, train, val, 3)
    x = linear_probe.prepare(val.features, normalize=True)
    m = linear_probe.evaluate(result.weight, result.bias, x, val.labels, ["a", "b", "c"])
    assert m["top1"] == 1.0 and m["top5"] == 1.0 and m["topK"] == 3
    assert result.history[-1]["valTop1"] == 1.0
    assert result.history[-1]["trainLoss"] < result.history[0]["trainLoss"]


def test_evaluate_counts_per_class_and_the_confusion_matrix() -> None:
    weight = torch.eye(3)
    bias = torch.zeros(3)
    x = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 1.0, 0], [0, 0, 1.0]])
    labels = torch.tensor([0, 1, 2, 2])
    m = linear_probe.evaluate(weight, bias, x, labels, ["a", "b", "c"])
    assert m["top1"] == 0.75
    assert m["confusionMatrix"] == [[1, 0, 0], [0, 1, 0], [0, 1, 1]]
    assert m["perClassAccuracy"] == {"a": 1.0, "b": 1.0, "c": 0.5}


def test_one_rank_is_logged_in_the_singular(tmp_path, make_ctx, tower, caplog) -> None:
    write_folder(tmp_path / "train", {"a": 3, "b": 3})
    ctx = make_ctx(data={"train": str(tmp_path / "train")})
    train, _, _ = build_datasets(ctx)
    with caplog.at_level("INFO", logger="evaclip.trainer"):
        linear_probe.extract_features(ctx, tower, train, (0.0, 90.0))
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("Computed"))
    assert line.endswith(" images/s over 1 rank)."), line
