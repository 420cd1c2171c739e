"""Finding labelled images: image folders and CSV/JSONL manifests, locally and in S3."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from PIL import Image

from evaclip.errors import UserError
from evaclip.trainer.data import ShardSampler, build_datasets, make_loader, split_holdout


def png(color: tuple[int, int, int] = (128, 64, 32)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 12), color).save(buf, format="PNG")
    return buf.getvalue()


def write_folder(root: Path, counts: dict[str, int]) -> None:
    for label, n in counts.items():
        (root / label).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            (root / label / f"{i}.png").write_bytes(png((i * 20 % 255, 10, 10)))


def test_image_folder_classes_are_discovered_sorted(tmp_path, make_ctx) -> None:
    write_folder(tmp_path / "train", {"zebra": 3, "ant": 2, "moth": 2})
    write_folder(tmp_path / "val", {"ant": 1, "zebra": 1})
    (tmp_path / "train" / "ant" / "notes.txt").write_text("not counted")
    ctx = make_ctx(data={"train": str(tmp_path / "train"), "validation": str(tmp_path / "val")})
    train, val, classes = build_datasets(ctx)
    assert classes == ["ant", "moth", "zebra"]
    assert len(train) == 7 and len(val) == 2
    assert sorted(train.labels) == [0, 0, 1, 1, 2, 2, 2]
    assert val.labels == [0, 2]


def test_image_folder_in_s3_is_fetched_to_the_node_cache(tmp_path, make_ctx, s3, bucket) -> None:
    write_folder(tmp_path / "digits", {"0": 2, "1": 2})
    ctx = make_ctx(data={"train": f"s3://{bucket}/digits", "validationFraction": 0.5})
    ctx.storage.upload_tree(tmp_path / "digits", f"s3://{bucket}/digits")
    train, val, classes = build_datasets(ctx)
    assert classes == ["0", "1"]
    assert len(train) == 2 and len(val) == 2  # one of each class held out
    assert all(Path(p).is_file() and str(ctx.storage.cache_dir) in p for p in train.paths)
    assert all(u.startswith(f"s3://{bucket}/digits/") for u in train.uris + val.uris)


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_manifests_with_relative_paths_and_full_uris(tmp_path, make_ctx, bucket, fmt) -> None:
    ctx = make_ctx()
    # Two images beside the manifest in S3, one elsewhere named by its full URI.
    for key in ("data/imgs/a.png", "data/imgs/b.png", "other/c.png", "other/d.png"):
        ctx.storage.write_bytes(f"s3://{bucket}/{key}", png())
    rows = [("imgs/a.png", "cat"), ("imgs/b.png", "dog"), (f"s3://{bucket}/other/c.png", "cat"),
            (f"s3://{bucket}/other/d.png", "dog")]
    if fmt == "csv":
        text = "path,species\n" + "".join(f"{p},{label}\n" for p, label in rows)
    else:
        text = "".join(json.dumps({"path": p, "species": label}) + "\n" for p, label in rows)
    uri = f"s3://{bucket}/data/train.{fmt}"
    ctx.storage.write_bytes(uri, text.encode())
    ctx = make_ctx(data={"train": uri, "validation": uri, "format": fmt, "imageColumn": "path",
                         "labelColumn": "species"})
    train, val, classes = build_datasets(ctx)
    assert classes == ["cat", "dog"]
    assert train.uris == [f"s3://{bucket}/data/imgs/a.png", f"s3://{bucket}/data/imgs/b.png",
                          f"s3://{bucket}/other/c.png", f"s3://{bucket}/other/d.png"]
    assert train.labels == [0, 1, 0, 1]
    assert all(Path(p).read_bytes() == png() for p in train.paths)


def test_a_manifest_row_without_the_label_names_the_column(tmp_path, make_ctx) -> None:
    (tmp_path / "a.png").write_bytes(png())
    (tmp_path / "m.csv").write_text("image,label\na.png,cat\na.png,\n")
    ctx = make_ctx(data={"train": str(tmp_path / "m.csv"), "format": "csv"})
    with pytest.raises(UserError, match=r"data.labelColumn: row 2 of .* has no 'label' value"):
        build_datasets(ctx)


def test_labels_outside_the_given_class_names_are_refused(tmp_path, make_ctx) -> None:
    write_folder(tmp_path / "train", {"cat": 2, "dog": 2, "emu": 2})
    ctx = make_ctx(data={"train": str(tmp_path / "train"), "classNames": ["dog", "cat"]})
    with pytest.raises(UserError, match=r"data.classNames: .* labels 'emu'"):
        build_datasets(ctx)
    ctx = make_ctx(data={"train": str(tmp_path / "train"),
                         "classNames": ["emu", "dog", "cat"]})
    train, _, classes = build_datasets(ctx)
    assert classes == ["emu", "dog", "cat"]  # the given order is the label order


def test_holdout_is_stratified_and_fixed_by_the_seed() -> None:
    items = [(f"s3://b/{c}/{i}.png", c, None) for c in "abc" for i in range(10)]
    train, val = split_holdout(items, 0.2, seed=3)
    assert sorted(label for _, label, _ in val) == ["a", "a", "b", "b", "c", "c"]
    assert not {u for u, _, _ in train} & {u for u, _, _ in val}
    assert split_holdout(items, 0.2, seed=3) == (train, val)
    assert split_holdout(items, 0.2, seed=4) != (train, val)


def test_evaluation_shards_are_disjoint_and_complete() -> None:
    shards = [list(ShardSampler(11, r, 3)) for r in range(3)]
    assert [len(ShardSampler(11, r, 3)) for r in range(3)] == [4, 4, 3]
    assert sorted(i for s in shards for i in s) == list(range(11))


def test_training_order_is_fixed_per_epoch_and_changes_between_epochs(tmp_path,
                                                                      make_ctx) -> None:
    write_folder(tmp_path / "train", {"a": 6, "b": 6})
    spec = {"data": {"train": str(tmp_path / "train"), "validationFraction": 0.25}}
    orders = []
    for _ in range(2):
        ctx = make_ctx(rank=1, world_size=2, **spec)
        train, _, _ = build_datasets(ctx)
        loader = make_loader(train, ctx, train=True)
        epochs = []
        for epoch in range(2):
            loader.sampler.set_epoch(epoch)
            epochs.append([i for b in loader for i in b["indices"].tolist()])
        orders.append(epochs)
    assert orders[0] == orders[1]  # same seed, same order
    assert orders[0][0] != orders[0][1]  # a new order each epoch
    assert len(orders[0][0]) == 4  # half of the 8 training images
