"""Labelled images for training: listing, fetching, decoding, CLIP preprocessing, loaders.

Layouts (`spec.data.format`):

* `imageFolder`: `<uri>/<class>/<image>`; files with an image extension are used, others
  are ignored (and counted in the log).
* `csv` / `jsonl`: a manifest file with an image column (`data.imageColumn`: a path
  relative to the manifest's folder, or a full `s3://` URI or absolute path) and a label
  column (`data.labelColumn`: the class name).

Class names come from `data.classNames` or are discovered (sorted) from the training
labels; a validation label outside them is the user's to fix. Without a validation URI,
`data.validationFraction` of each class is held out with the seed of `training.seed`.

Images are fetched through `evaclip.storage.Storage` into its node-wide cache (the ranks
of a node share one copy) and decoded with Pillow: EXIF orientation applied, every mode
turned into RGB (alpha composited on white, 16-bit greys scaled down). An image that
cannot be used (empty, not an image, truncated, larger than `MAX_PIXELS`) is skipped and
counted per reason; `check_bad_fraction` stops the job when more than
`data.maxBadFraction` of a split is bad.

For other modules:

* `clip_transform(preset, train)` is `evaclip.models.preprocess.clip_transform`, the one
  preprocessing function (shared with `evaclip features`): shortest side to
  `preset.image_size` (bicubic), centre crop, OpenAI CLIP mean/std; `train=True` uses a
  random resized crop and a horizontal flip instead. `decode_image` comes first.
* `build_datasets(ctx, train_transform=None) -> (train, validation, class_names)`.
* `make_loader(dataset, ctx, train)`: per-rank DataLoader. `train=True` shuffles with
  `training.seed` and pads the last shard so every rank takes the same number of steps
  (DistributedSampler); call `loader.sampler.set_epoch(epoch)` each epoch for a fresh,
  deterministic order. `train=False` gives each rank a disjoint slice in order, without
  duplicates, so every image is seen exactly once across ranks.
  Batches are dicts: `images` [B,3,H,W], `labels` [B], `indices` [B] (dataset positions)
  and `bad` (list of (index, reason) of skipped images); B may be smaller than the batch
  size when images were skipped.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import math
import os
import random
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from evaclip.errors import UserError
from evaclip.models.preprocess import IMAGE_SUFFIXES, clip_transform
from evaclip.storage import is_s3, join_uri

if TYPE_CHECKING:
    from evaclip.models.presets import Preset
    from evaclip.trainer.context import JobContext

log = logging.getLogger("evaclip.trainer")

__all__ = ["build_datasets", "make_loader", "clip_transform", "decode_image", "ImageDataset",
           "BadImage", "BadImageTally", "check_bad_fraction", "collate_images"]

IMAGE_EXTENSIONS = IMAGE_SUFFIXES
# Pillow's own default; larger images are refused as likely decompression bombs.
MAX_PIXELS = 89_478_485
BAD_REASONS = ("empty", "not_an_image", "truncated", "too_large", "unreadable")


class BadImage(Exception):
    """An image that cannot be used; `reason` is one of BAD_REASONS."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass(frozen=True)
class ImageRecord:
    """One labelled image: where it is stored and its class index."""

    uri: str
    label: int


# --- decoding ------------------------------------------------------------------------------


def _to_rgb(img: Any) -> Any:
    """Any Pillow mode to RGB: alpha over white, 16-bit and float greys scaled to 8 bits."""
    import numpy as np
    from PIL import Image

    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        if mode == "F":
            lo, hi = float(arr.min()), float(arr.max())
            arr = (arr - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(arr)
        else:
            arr = np.clip(arr, 0, 65535) / 257.0
        return Image.fromarray(np.rint(arr).astype(np.uint8)).convert("RGB")
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        mode == "P" and "transparency" in img.info
    )
    if has_alpha:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def decode_image(data: bytes, max_pixels: int = MAX_PIXELS) -> Any:
    """Decode JPEG/PNG/WebP/... bytes into an upright RGB Pillow image, or raise BadImage."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    if not data:
        raise BadImage("empty", "zero bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            w, h = img.size
            if w * h > max_pixels:
                raise BadImage("too_large", f"{w}x{h} pixels, more than {max_pixels}")
            img.load()
            img = ImageOps.exif_transpose(img)
            return _to_rgb(img)
    except BadImage:
        raise
    except UnidentifiedImageError:
        raise BadImage("not_an_image", "not a format Pillow reads") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise BadImage("too_large", str(err)) from None
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        text = str(err)
        reason = "truncated" if "truncated" in text or isinstance(err, EOFError) else "unreadable"
        raise BadImage(reason, text) from None


# --- preprocessing ------------------------------------------------------------------------


def preprocessing_info(preset: Preset) -> dict[str, Any]:
    """How images must be prepared for a head trained on this preset (for head.json)."""
    return {
        "imageSize": preset.image_size,
        "resize": "shortest side, bicubic",
        "crop": "center",
        "interpolation": "bicubic",
        "mean": list(preset.mean),
        "std": list(preset.std),
        "colorMode": "RGB",
    }


# --- listing -------------------------------------------------------------------------------


def _is_image_name(name: str) -> bool:
    return not Path(name).name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def list_image_folder(root: Path, uri: str) -> list[tuple[str, str, str]]:
    """(image URI, class name, local path) of each image under `root` (<class>/<image>)."""
    found, ignored = [], 0
    for dirpath, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        rel = Path(dirpath).relative_to(root)
        for name in sorted(files):
            if not _is_image_name(name) or not rel.parts:
                ignored += 0 if name.startswith(".") else 1
                continue
            relpath = (rel / name).as_posix()
            found.append((join_uri(uri, relpath), rel.parts[0], str(Path(dirpath) / name)))
    if ignored:
        log.info("Ignored %d files under %s that are not images by their name.", ignored, uri)
    return found


def _read_rows(text: str, fmt: str, uri: str) -> list[dict[str, Any]]:
    if fmt == "csv":
        return list(csv.DictReader(io.StringIO(text)))
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            raise UserError(f"data: {uri} line {n} is not valid JSON; fix the manifest") from None
        if not isinstance(row, dict):
            raise UserError(f"data: {uri} line {n} is not a JSON object; fix the manifest")
        rows.append(row)
    return rows


def read_manifest(storage: Any, uri: str, fmt: str, image_column: str,
                  label_column: str) -> list[tuple[str, str, None]]:
    """(image URI, class name, None) of each row of a CSV or JSONL manifest."""
    try:
        text = storage.read_bytes(uri, field="data").decode("utf-8-sig")
    except UnicodeDecodeError:
        raise UserError(f"data: {uri} is not UTF-8 text; give a CSV or JSONL manifest") from None
    rows = _read_rows(text, fmt, uri)
    if not rows:
        raise UserError(f"data: {uri} lists no images; add rows to the manifest")
    base = uri.rsplit("/", 1)[0] if is_s3(uri) else str(Path(uri).parent)
    out = []
    for n, row in enumerate(rows, 1):
        for column, spec_field in ((image_column, "imageColumn"), (label_column, "labelColumn")):
            if row.get(column) in (None, ""):
                raise UserError(
                    f"data.{spec_field}: row {n} of {uri} has no {column!r} value; columns "
                    f"found: {', '.join(map(str, row))}"
                )
        ref = str(row[image_column])
        image_uri = ref if is_s3(ref) or ref.startswith("/") else join_uri(base, ref)
        out.append((image_uri, str(row[label_column]), None))
    return out


Item = tuple[str, str, str | None]  # (image URI, class name, local path when already local)


def _labels_to_records(items: Sequence[Item], class_names: Sequence[str],
                       uri: str) -> list[ImageRecord]:
    index = {name: i for i, name in enumerate(class_names)}
    unknown = sorted({label for _, label, _ in items if label not in index})
    if unknown:
        shown = ", ".join(repr(u) for u in unknown[:5])
        raise UserError(
            f"data.classNames: {uri} has labels {shown} that are not among the classes "
            f"({', '.join(class_names[:10])}{', ...' if len(class_names) > 10 else ''}); "
            "add them to data.classNames or fix the labels"
        )
    return [ImageRecord(u, index[label]) for u, label, _ in items]


def split_holdout(items: list[Item], fraction: float, seed: int) -> tuple[list[Item], list[Item]]:
    """Hold out `fraction` of each class (at least one image of classes with two or more)."""
    by_class: dict[str, list[Item]] = {}
    for item in items:
        by_class.setdefault(item[1], []).append(item)
    rng = random.Random(seed)
    train, val = [], []
    for label in sorted(by_class):
        group = sorted(by_class[label], key=lambda item: item[0])
        rng.shuffle(group)
        k = min(len(group) - 1, max(1, round(len(group) * fraction))) if len(group) > 1 else 0
        val += group[:k]
        train += group[k:]
    return train, val


# --- datasets ------------------------------------------------------------------------------


@dataclass
class ImageDataset:
    """Labelled images at local paths; an item is (image tensor or None, label, index, reason).

    Decoding happens per item, in DataLoader workers; a bad image yields `None` and its
    reason instead of raising, so the loop can count it.
    """

    paths: list[str]
    labels: list[int]
    uris: list[str]
    transform: Callable[[Any], Any] | None = None
    name: str = "train"
    max_pixels: int = MAX_PIXELS

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[Any, int, int, str | None]:
        try:
            data = Path(self.paths[i]).read_bytes()
            img = decode_image(data, self.max_pixels)
            return (self.transform(img) if self.transform else img), self.labels[i], i, None
        except BadImage as bad:
            return None, self.labels[i], i, bad.reason
        except OSError:
            return None, self.labels[i], i, "unreadable"


def collate_images(batch: list[tuple[Any, int, int, str | None]]) -> dict[str, Any]:
    """Stack the good images of a batch and list the bad ones with their reasons."""
    import torch

    good = [b for b in batch if b[3] is None]
    return {
        "images": torch.stack([b[0] for b in good]) if good else torch.empty(0),
        "labels": torch.tensor([b[1] for b in good], dtype=torch.long),
        "indices": torch.tensor([b[2] for b in good], dtype=torch.long),
        "bad": [(b[2], b[3]) for b in batch if b[3] is not None],
    }


@dataclass
class BadImageTally:
    """Skipped images of one split, counted per reason."""

    split: str
    counts: Counter[str] = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)

    def add(self, reason: str, uri: str) -> None:
        self.counts[reason] += 1
        if len(self.examples) < 5:
            self.examples.append(uri)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def merge(self, other: BadImageTally) -> None:
        self.counts.update(other.counts)
        self.examples = (self.examples + other.examples)[:5]

    def as_dict(self) -> dict[str, int]:
        return {r: self.counts.get(r, 0) for r in BAD_REASONS}


def check_bad_fraction(tally: BadImageTally, images: int, max_fraction: float) -> None:
    """Log the skipped images of a split; raise UserError when too many are bad."""
    if not tally.total:
        return
    share = tally.total / max(1, images)
    by_reason = ", ".join(f"{r} {n}" for r, n in sorted(tally.counts.items()))
    log.warning("Skipped %d of %d %s images (%s), for example %s.", tally.total, images,
                tally.split, by_reason, ", ".join(tally.examples[:3]))
    if share > max_fraction:
        raise UserError(
            f"data.maxBadFraction: {tally.total} of {images} {tally.split} images "
            f"({share:.1%}) cannot be read ({by_reason}), more than the allowed "
            f"{max_fraction:.1%}; fix or remove those images, or raise data.maxBadFraction"
        )


def fetch_all(storage: Any, uris: Sequence[str], field: str, workers: int = 8) -> list[str]:
    """Local paths of `uris`, fetched into the node cache in parallel (local paths as they are)."""
    if not any(is_s3(u) for u in uris):
        return [str(storage.fetch(u, field=field)) for u in uris]
    with ThreadPoolExecutor(max(1, workers), "evaclip-images") as pool:
        return [str(p) for p in pool.map(lambda u: storage.fetch(u, field=field), uris)]


@contextlib.contextmanager
def _quiet_storage() -> Iterator[None]:
    """Hold the storage layer's one-line-per-file messages back while many images arrive."""
    storage_log = logging.getLogger("evaclip.storage")
    level = storage_log.level
    storage_log.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        storage_log.setLevel(level)


def _items_for(ctx: JobContext, uri: str, field: str) -> list[Item]:
    """The images of one split in the spec's format."""
    data = ctx.spec.data
    if data.format == "imageFolder":
        started = time.monotonic()
        with _quiet_storage():
            root = ctx.storage.fetch_tree(uri, field=field)
        items = list_image_folder(Path(root), uri)
        if not items:
            raise UserError(
                f"{field}: no images found under {uri}; lay them out as <uri>/<class>/<image>"
            )
        if ctx.is_primary:
            log.info("Have %d images of %s in the node cache after %.1f s.", len(items), uri,
                     time.monotonic() - started)
        return items
    return read_manifest(ctx.storage, uri, data.format, data.image_column, data.label_column)


def _dataset(ctx: JobContext, items: list[Item], class_names: Sequence[str],
             uri: str, field: str, transform: Callable[[Any], Any], name: str) -> ImageDataset:
    records = _labels_to_records(items, class_names, uri)
    uris = [r.uri for r in records]
    missing = [u for (u, _, local) in items if local is None]
    with _quiet_storage():
        fetched = iter(fetch_all(ctx.storage, missing, field, ctx.spec.storage.max_concurrency))
    paths = [local if local is not None else next(fetched) for (_, _, local) in items]
    return ImageDataset(paths, [r.label for r in records], uris, transform, name)


def build_datasets(
    ctx: JobContext, train_transform: Callable[[Any], Any] | None = None
) -> tuple[ImageDataset, ImageDataset, list[str]]:
    """The training and validation datasets of the job and the class names in label order.

    Both use the evaluation preprocessing unless `train_transform` is given for the
    training split (fine-tuning passes `clip_transform(preset, train=True)`).
    """
    from evaclip.models.presets import get_preset

    data = ctx.spec.data
    preset = get_preset(ctx.spec.model.preset)
    train_items = _items_for(ctx, data.train, "data.train")
    if data.validation:
        val_items = _items_for(ctx, data.validation, "data.validation")
    else:
        train_items, val_items = split_holdout(
            train_items, data.validation_fraction, ctx.spec.training.seed
        )
    class_names = list(data.class_names or sorted({label for _, label, _ in train_items}))
    if len(class_names) < 2:
        raise UserError(
            f"data.train: found {len(class_names)} class ({', '.join(class_names)}) under "
            f"{data.train}; a classifier needs at least 2"
        )
    evaluation = clip_transform(preset, train=False)
    train = _dataset(ctx, train_items, class_names, data.train, "data.train",
                     train_transform or evaluation, "train")
    val_uri = data.validation or data.train
    val = _dataset(ctx, val_items, class_names, val_uri, "data.validation", evaluation,
                   "validation")
    if not len(val):
        raise UserError(
            f"data.validation: no validation images in {val_uri}; give a validation URI or "
            "more images per class"
        )
    log.info("Found %d training and %d validation images in %d classes.", len(train), len(val),
             len(class_names))
    return train, val, class_names


# --- loaders -------------------------------------------------------------------------------


class ShardSampler:
    """Indices `rank, rank + world, ...` of a dataset: disjoint, in order, no padding."""

    def __init__(self, size: int, rank: int, world_size: int) -> None:
        self.size, self.rank, self.world_size = size, rank, world_size

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.size, self.world_size))

    def __len__(self) -> int:
        return max(0, math.ceil((self.size - self.rank) / self.world_size))

    def set_epoch(self, epoch: int) -> None:
        """Same order every epoch (kept for symmetry with DistributedSampler)."""


def make_loader(dataset: ImageDataset, ctx: JobContext, train: bool,
                batch_size: int | None = None) -> Any:
    """A DataLoader of this rank's share of `dataset` (see the module docstring)."""
    from torch.utils.data import DataLoader, DistributedSampler

    if train:
        sampler: Any = DistributedSampler(
            dataset, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True,
            seed=ctx.spec.training.seed, drop_last=False,
        )
    else:
        sampler = ShardSampler(len(dataset), ctx.rank, ctx.world_size)
    workers = ctx.spec.data.num_workers
    return DataLoader(
        dataset,  # type: ignore[arg-type]
        batch_size=batch_size or ctx.spec.training.batch_size,
        sampler=sampler,
        num_workers=workers,
        collate_fn=collate_images,
        pin_memory=ctx.device.type == "cuda",
        persistent_workers=False,
        drop_last=False,
        multiprocessing_context="fork" if workers and os.name == "posix" else None,
    )
