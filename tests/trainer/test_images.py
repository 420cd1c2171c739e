"""Decoding real image files: EXIF rotation, colour modes, and the broken ones."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from evaclip.errors import UserError
from evaclip.models.presets import get_preset
from evaclip.trainer.data import (
    BadImage,
    BadImageTally,
    ImageDataset,
    check_bad_fraction,
    clip_transform,
    collate_images,
    decode_image,
)


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height pixels (no need to hold them)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(
            ">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0"))


def test_exif_orientation_is_applied() -> None:
    # 40 wide, 20 tall, left half red; orientation 6 means "rotate 90 degrees clockwise".
    arr = np.zeros((20, 40, 3), np.uint8)
    arr[:, :20] = (255, 0, 0)
    img = Image.fromarray(arr)
    exif = Image.Exif()
    exif[0x0112] = 6
    out = decode_image(encode(img, "JPEG", exif=exif, quality=95))
    assert out.size == (20, 40)
    top = np.asarray(out)[:20].mean(axis=(0, 1))
    bottom = np.asarray(out)[20:].mean(axis=(0, 1))
    assert top[0] > 200 > bottom[0]  # the red half is now on top


def test_alpha_is_composited_on_white() -> None:
    arr = np.zeros((4, 4, 4), np.uint8)  # fully transparent black
    arr[0, 0] = (0, 0, 255, 255)  # one opaque blue pixel
    out = np.asarray(decode_image(encode(Image.fromarray(arr, "RGBA"), "PNG")))
    assert out.shape == (4, 4, 3)
    assert tuple(out[1, 1]) == (255, 255, 255)
    assert tuple(out[0, 0]) == (0, 0, 255)


@pytest.mark.parametrize("mode,fmt", [
    ("L", "PNG"), ("P", "PNG"), ("LA", "PNG"), ("CMYK", "JPEG"), ("RGB", "WEBP"),
    ("RGBA", "WEBP"), ("1", "PNG"), ("I;16", "PNG"),
])
def test_every_mode_decodes_to_rgb(mode: str, fmt: str) -> None:
    base = Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8) * 4).convert("RGB")
    if mode == "P":
        img = base.convert("P", palette=Image.Palette.ADAPTIVE)
        img.info["transparency"] = 0
    elif mode == "I;16":
        img = Image.fromarray(np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000)
        assert img.mode.startswith("I;16")
    else:
        img = base.convert(mode)
    out = decode_image(encode(img, fmt))
    assert out.mode == "RGB" and out.size == (8, 8)
    if mode == "I;16":
        # 16-bit values are scaled to 8 bits, not clipped to white.
        values = np.asarray(out)[..., 0]
        assert values.min() == 0 and 240 <= values.max() <= 255 and len(np.unique(values)) > 32


@pytest.mark.parametrize("data,reason", [
    (b"", "empty"),
    (b"label,path\nthis is a CSV, not a picture\n", "not_an_image"),
    (png_header_only(30000, 30000), "too_large"),  # 900 Mpx: a decompression bomb
    (png_header_only(10000, 9000), "too_large"),  # 90 Mpx: above the limit, below 2x
])
def test_broken_images_are_named(data: bytes, reason: str) -> None:
    with pytest.raises(BadImage) as err:
        decode_image(data)
    assert err.value.reason == reason


def test_truncated_files_are_named() -> None:
    rng = np.random.default_rng(0)
    noisy = Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
    for fmt in ("PNG", "JPEG"):
        data = encode(noisy, fmt)
        with pytest.raises(BadImage) as err:
            decode_image(data[: len(data) // 2])
        assert err.value.reason == "truncated", fmt


def test_the_dataset_skips_and_counts_bad_files(tmp_path) -> None:
    good = encode(Image.new("RGB", (30, 20), (10, 200, 30)), "PNG")
    files = {"a.png": good, "b.png": b"", "c.jpg": b"not an image", "d.png": good}
    paths = []
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
        paths.append(str(tmp_path / name))
    preset = get_preset("eva-clip-18b-tiny")
    ds = ImageDataset(paths, [0, 1, 0, 1], [f"s3://b/{n}" for n in files],
                      clip_transform(preset), "train")
    batch = collate_images([ds[i] for i in range(len(ds))])
    assert batch["images"].shape == (2, 3, preset.image_size, preset.image_size)
    assert batch["indices"].tolist() == [0, 3] and batch["labels"].tolist() == [0, 1]
    assert batch["bad"] == [(1, "empty"), (2, "not_an_image")]


def test_too_many_bad_images_stop_the_job_with_one_line() -> None:
    tally = BadImageTally("train")
    for i in range(3):
        tally.add("truncated", f"s3://b/{i}.jpg")
    check_bad_fraction(tally, 300, max_fraction=0.01)  # 1 %: allowed
    with pytest.raises(UserError) as err:
        check_bad_fraction(tally, 200, max_fraction=0.01)  # 1.5 %: too many
    text = str(err.value)
    assert "\n" not in text
    assert text.startswith("data.maxBadFraction: 3 of 200 train images (1.5%)")
    assert "truncated 3" in text and "1.0%" in text
