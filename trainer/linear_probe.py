"""Linear probe: a frozen tower, features computed once, a linear head trained on them.

Recipe:

1. `build_datasets`; every rank takes a disjoint, unpadded slice of each split.
2. The frozen tower embeds each image exactly once (`torch.inference_mode`); the slices
   are gathered on rank 0 (`gather_object`), which then holds every feature, and the
   skipped-image counts are shared by all ranks, which all stop on too many bad images.
3. Rank 0 keeps the features in `workdir/features-{train,validation}.pt` (and publishes
   them under the output URI with `training.saveFeatures`), then trains `nn.Linear(embed,
   classes)` on them for `training.epochs` epochs (AdamW, linear warm-up then cosine,
   label smoothing). Epochs cost milliseconds, not backbone passes.
4. Validation top-1, top-5, per-class accuracy and the confusion matrix; outputs are
   published atomically (see `evaclip.trainer.outputs`).

Feature scaling: with `training.normalizeFeatures` the embeddings are L2-normalised, as
CLIP compares them. The head is optimised on features standardised per dimension with
the training set's mean and standard deviation (random and pretrained towers alike put
most of an embedding's length in a shared direction, which leaves plain SGD badly
conditioned); the standardisation is folded into the saved weight and bias, so
`head.safetensors` applies directly to the (normalised) embeddings.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from evaclip.errors import UserError
from evaclip.trainer.data import (
    BadImageTally,
    ImageDataset,
    build_datasets,
    check_bad_fraction,
    make_loader,
)
from evaclip.trainer.progress import format_duration

if TYPE_CHECKING:
    import torch

    from evaclip.trainer.context import JobContext

log = logging.getLogger("evaclip.trainer")

PRECISIONS = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


@dataclass
class FeatureSet:
    """Embeddings of the good images of one split, with labels and dataset positions."""

    split: str
    features: torch.Tensor  # [N, D] float32
    labels: torch.Tensor  # [N]
    indices: torch.Tensor  # [N] positions in the dataset
    images: int  # images in the whole split, good and bad
    bad: BadImageTally = field(default_factory=lambda: BadImageTally("train"))
    seconds: float = 0.0

    def to_file(self) -> dict[str, Any]:
        return {"split": self.split, "features": self.features, "labels": self.labels,
                "indices": self.indices, "images": self.images}


# --- the tower ------------------------------------------------------------------------------


def load_tower(ctx: JobContext) -> Any:
    """The frozen tower of the job on this rank's device: loaded weights or random ones."""
    import torch

    from evaclip.models import build_tower, init_random_weights, load_weights

    model = ctx.spec.model
    dtype = getattr(torch, PRECISIONS[model.precision])
    tower = build_tower(model.preset, device="meta", dtype=dtype)
    if model.weights:
        load_weights(tower, model.weights, model.format, storage=ctx.storage, dtype=dtype,
                     trust_remote_code=model.trust_remote_code)
    else:
        if ctx.is_primary:
            log.warning("No model.weights given: the tower has random weights (seed %d).",
                        ctx.spec.training.seed)
        init_random_weights(tower, seed=ctx.spec.training.seed, device="cpu")
    return tower.to(ctx.device).eval().requires_grad_(False)


# --- features -------------------------------------------------------------------------------


def compute_local_features(ctx: JobContext, tower: Any, dataset: ImageDataset,
                           span: tuple[float, float] = (0.0, 90.0)) -> FeatureSet:
    """Embed this rank's slice of `dataset` once; no collective calls."""
    import torch

    loader = make_loader(dataset, ctx, train=False)
    tally = BadImageTally(dataset.name)
    feats, labels, indices = [], [], []
    shard = len(loader.sampler)
    ctx.reporter.begin(f"features ({dataset.name})", shard, span=span)
    started = time.monotonic()
    dtype = next(tower.parameters()).dtype
    with torch.inference_mode():
        for batch in loader:
            for index, reason in batch["bad"]:
                tally.add(reason, dataset.uris[index])
            if len(batch["labels"]):
                images = batch["images"].to(ctx.device, dtype=dtype, non_blocking=True)
                feats.append(tower(images).float().cpu())
                labels.append(batch["labels"])
                indices.append(batch["indices"])
            ctx.reporter.advance(len(batch["labels"]) + len(batch["bad"]))
    dim = tower.preset.embed_dim
    return FeatureSet(
        dataset.name,
        torch.cat(feats) if feats else torch.empty(0, dim),
        torch.cat(labels) if labels else torch.empty(0, dtype=torch.long),
        torch.cat(indices) if indices else torch.empty(0, dtype=torch.long),
        len(dataset), tally, time.monotonic() - started,
    )


def gather_features(ctx: JobContext, local: FeatureSet) -> FeatureSet:
    """Rank 0 gets every rank's features (ordered by dataset position); all get the tally."""
    import torch
    import torch.distributed as dist

    if not ctx.distributed:
        return local
    tallies: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(tallies, local.bad)
    bad = BadImageTally(local.split)
    for t in tallies:
        bad.merge(t)
    parts: list[Any] = [None] * ctx.world_size if ctx.is_primary else None  # type: ignore[assignment]
    payload = (local.features, local.labels, local.indices, local.seconds)
    dist.gather_object(payload, parts, dst=0)
    if not ctx.is_primary:
        return FeatureSet(local.split, local.features[:0], local.labels[:0], local.indices[:0],
                          local.images, bad, local.seconds)
    feats = torch.cat([p[0] for p in parts])
    labels = torch.cat([p[1] for p in parts])
    indices = torch.cat([p[2] for p in parts])
    order = torch.argsort(indices)
    seconds = max(p[3] for p in parts)
    return FeatureSet(local.split, feats[order], labels[order], indices[order], local.images,
                      bad, seconds)


def extract_features(ctx: JobContext, tower: Any, dataset: ImageDataset,
                     span: tuple[float, float]) -> FeatureSet:
    """All features of a split on rank 0, each image embedded once by one rank."""
    local = compute_local_features(ctx, tower, dataset, span)
    full = gather_features(ctx, local)
    check_bad_fraction(full.bad, full.images, ctx.spec.data.max_bad_fraction)
    if ctx.is_primary:
        good = full.images - full.bad.total
        rate = good / full.seconds if full.seconds else float("nan")
        ranks = f"{ctx.world_size} rank{'s' if ctx.world_size != 1 else ''}"
        log.info("Computed %d %s features in %s (%.1f images/s over %s).", good,
                 dataset.name, format_duration(full.seconds), rate, ranks)
    return full


# --- the head -------------------------------------------------------------------------------


def prepare(features: torch.Tensor, normalize: bool) -> torch.Tensor:
    """The embeddings as the head sees them: L2-normalised when `normalize`."""
    import torch.nn.functional as F

    return F.normalize(features, dim=1) if normalize else features


def _schedule(total_steps: int, warmup_fraction: float) -> Any:
    warmup = int(total_steps * warmup_fraction)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


@dataclass
class HeadResult:
    weight: torch.Tensor  # [C, D], applies to prepared (normalised) embeddings
    bias: torch.Tensor  # [C]
    history: list[dict[str, Any]]
    seconds: float


def fit_head(ctx: JobContext, inputs: Callable[[torch.Tensor], torch.Tensor],
             labels: torch.Tensor, dim: int, num_classes: int,
             val_top1: Callable[[Any], float] | None = None) -> tuple[Any, list[dict[str, Any]]]:
    """The head's training loop: `inputs(idx)` gives the (standardised) features of a batch.

    The linear probe passes cached features; `bench/linear_probe.py` passes a function that
    runs the frozen tower on the batch's images, so both fit the very same way.
    """
    import torch
    import torch.nn.functional as F
    from torch import nn

    t = ctx.spec.training
    gen = torch.Generator().manual_seed(t.seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(t.seed)
        head = nn.Linear(dim, num_classes)
    opt = torch.optim.AdamW([
        {"params": [head.weight], "weight_decay": t.weight_decay},
        {"params": [head.bias], "weight_decay": 0.0},
    ], lr=t.learning_rate)
    n = len(labels)
    batch = max(1, t.batch_size * ctx.world_size)
    steps_per_epoch = max(1, math.ceil(n / batch))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, _schedule(t.epochs * steps_per_epoch, t.warmup_fraction))
    history: list[dict[str, Any]] = []
    ctx.reporter.begin("train", t.epochs, unit="epochs", span=(90.0, 99.0), epochs=t.epochs)
    for epoch in range(1, t.epochs + 1):
        order = torch.randperm(n, generator=gen)
        total = 0.0
        for i in range(0, n, batch):
            idx = order[i:i + batch]
            loss = F.cross_entropy(head(inputs(idx)), labels[idx],
                                   label_smoothing=t.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        record = {"epoch": epoch, "trainLoss": total / n, "learningRate": sched.get_last_lr()[0]}
        if val_top1 is not None:
            with torch.no_grad():
                record["valTop1"] = val_top1(head)
        history.append(record)
        ctx.reporter.advance(1, epoch=epoch, train_loss=record["trainLoss"],
                             val_top1=record.get("valTop1"))
    return head, history


def standardisation(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-dimension mean and standard deviation of the training features."""
    return x.mean(0), x.std(0).clamp_min(1e-6)


def fold(head: Any, mean: torch.Tensor, std: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight, bias) of `head((x - mean) / std)` as one linear map of `x`."""
    import torch

    with torch.no_grad():
        weight = head.weight / std
        bias = head.bias - weight @ mean
    return weight.detach(), bias.detach()


def train_head(ctx: JobContext, train: FeatureSet, val: FeatureSet,
               num_classes: int) -> HeadResult:
    """Fit the linear head on cached features; see the module docstring for the scaling."""
    t = ctx.spec.training
    started = time.monotonic()
    x = prepare(train.features, t.normalize_features)
    xv = prepare(val.features, t.normalize_features)
    mean, std = standardisation(x)
    z, zv = (x - mean) / std, (xv - mean) / std

    def val_top1(head: Any) -> float:
        return (head(zv).argmax(1) == val.labels).float().mean().item()

    head, history = fit_head(ctx, lambda idx: z[idx], train.labels, x.shape[1], num_classes,
                             val_top1)
    weight, bias = fold(head, mean, std)
    return HeadResult(weight, bias, history, time.monotonic() - started)


def evaluate(weight: torch.Tensor, bias: torch.Tensor, features: torch.Tensor,
             labels: torch.Tensor, class_names: list[str]) -> dict[str, Any]:
    """Top-1, top-5, per-class accuracy and confusion matrix of a head on prepared features."""
    import torch

    n = len(class_names)
    logits = features @ weight.T + bias
    pred = logits.argmax(1)
    k = min(5, n)
    topk = logits.topk(k, dim=1).indices
    top5 = (topk == labels[:, None]).any(1).float().mean().item()
    cm = torch.bincount(labels * n + pred, minlength=n * n).reshape(n, n)
    support = cm.sum(1)
    per_class = {
        name: (cm[i, i].item() / support[i].item()) if support[i] else None
        for i, name in enumerate(class_names)
    }
    return {
        "top1": (pred == labels).float().mean().item(),
        "top5": top5,
        "topK": k,
        "perClassAccuracy": per_class,
        "confusionMatrix": cm.tolist(),
        "validationImages": int(len(labels)),
    }


# --- the recipe -----------------------------------------------------------------------------


def run(ctx: JobContext) -> dict[str, Any] | None:
    """The whole linear probe; returns the metrics on rank 0 (None elsewhere)."""
    import torch

    from evaclip.trainer import outputs

    started = time.monotonic()
    ctx.reporter.stage("download", 0.0)
    train_ds, val_ds, class_names = build_datasets(ctx)
    tower = load_tower(ctx)
    ready = time.monotonic()
    share = len(train_ds) / max(1, len(train_ds) + len(val_ds))
    train = extract_features(ctx, tower, train_ds, (0.0, 90.0 * share))
    val = extract_features(ctx, tower, val_ds, (90.0 * share, 90.0))
    del tower
    if not ctx.is_primary:
        ctx.barrier()
        return None
    folder = outputs.output_dir(ctx)
    for fs, ds in ((train, train_ds), (val, val_ds)):
        path = ctx.workdir / f"features-{fs.split}.pt"
        torch.save({**fs.to_file(), "classNames": class_names, "uris": ds.uris}, path)
        if ctx.spec.training.save_features:
            (folder / "features").mkdir(exist_ok=True)
            torch.save(fs.to_file(), folder / "features" / path.name)
    for fs in (train, val):
        if len(fs.labels) == 0:
            raise UserError(
                f"data.{fs.split}: none of the {fs.images} images can be read; check the "
                "files (data.maxBadFraction lets the job skip a few, not all)"
            )
    result = train_head(ctx, train, val, len(class_names))
    normalize = ctx.spec.training.normalize_features
    metrics = evaluate(result.weight, result.bias, prepare(val.features, normalize),
                       val.labels, class_names)
    metrics.update({
        "method": "linearProbe",
        "preset": ctx.spec.model.preset,
        "randomWeights": not ctx.spec.model.weights,
        "classNames": class_names,
        "trainImages": int(len(train.labels)),
        "epochs": ctx.spec.training.epochs,
        "history": result.history,
        "finalTrainLoss": result.history[-1]["trainLoss"],
        "skippedImages": {"train": train.bad.as_dict(), "validation": val.bad.as_dict()},
        "worldSize": ctx.world_size,
        "timings": {
            "setupSeconds": round(ready - started, 3),
            "trainFeaturesSeconds": round(train.seconds, 3),
            "validationFeaturesSeconds": round(val.seconds, 3),
            "headSeconds": round(result.seconds, 3),
            "featureImagesPerSecond": round(
                (len(train.labels) + len(val.labels)) / max(1e-9, train.seconds + val.seconds), 2
            ),
        },
    })
    log.info("Trained the head for %d epochs in %s: validation top-1 %.4f, top-%d %.4f.",
             ctx.spec.training.epochs, format_duration(result.seconds), metrics["top1"],
             metrics["topK"], metrics["top5"])
    ctx.reporter.set_metrics(val_top1=metrics["top1"], val_top5=metrics["top5"])
    outputs.write_head(folder, ctx, result.weight, result.bias, class_names)
    metrics["timings"]["totalSeconds"] = round(time.monotonic() - started, 3)
    outputs.write_common_outputs(folder, ctx, metrics, class_names)
    ctx.reporter.stage("publish", 99.0)
    outputs.publish(ctx, folder, extra={"method": "linearProbe", "top1": metrics["top1"]})
    ctx.barrier()
    return metrics
