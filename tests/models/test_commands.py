"""`evaclip model list/info` and `evaclip features` as a user runs them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from evaclip.cli import main
from evaclip.models import build_tower, save_weights
from evaclip.models.preprocess import clip_transform
from evaclip.models.presets import PRESETS

EVACLIP = str(Path(sys.executable).with_name("evaclip"))

_PEAK_RSS = (
    "import resource, subprocess, sys;"
    "r = subprocess.run(sys.argv[1:], capture_output=True, text=True);"
    "sys.stdout.write(r.stdout); sys.stderr.write(r.stderr);"
    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr);"
    "sys.exit(r.returncode)"
)


def test_model_info_18b_is_exact_and_allocates_nothing() -> None:
    # Peak RSS, not wall time, shows that no weights were allocated: 17.63 B parameters
    # would need 35 GB even in half precision.
    run = subprocess.run(
        [sys.executable, "-c", _PEAK_RSS, EVACLIP, "model", "info", "eva-clip-18b"],
        capture_output=True, text=True, timeout=60,
    )
    assert run.returncode == 0, run.stderr
    assert "17,630,494,720 (17.63 B)" in run.stdout
    assert "post-norm" in run.stdout and "RMSNorm" in run.stdout and "no bias" in run.stdout
    peak_kib = int(run.stderr.strip().splitlines()[-1])
    assert peak_kib < 1_500_000, f"peak RSS {peak_kib} KiB: weights were allocated"


def test_model_list_shows_every_preset(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["model", "list"]) == 0
    out = capsys.readouterr().out
    for name, preset in PRESETS.items():
        line = next(line for line in out.splitlines() if line.startswith(name + " "))
        assert preset.family in line
    assert "17.63 B" in out and "7.53 B" in out and "4.35 B" in out


def test_unknown_preset_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["model", "info", "eva-clip-19b"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "eva-clip-18b" in err and err.count("\n") == 1


def write_images(root: Path) -> list[Path]:
    """Eight images of mixed sizes and modes in nested folders (written out of order)."""
    rng = np.random.default_rng(0)
    paths = []
    for i, (w, h, mode) in enumerate([(150, 120, "RGB"), (90, 200, "L"), (112, 112, "RGBA"),
                                      (300, 160, "RGB")] * 2):
        sub = root / ("b" if i % 2 else "a") / ("deep" if i > 5 else "")
        sub.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 255, (h, w, len(mode)), dtype=np.uint8).squeeze()
        path = sub / f"img{7 - i}.png"
        Image.fromarray(pixels, mode=mode).save(path)
        paths.append(path)
    (root / "notes.txt").write_text("not an image")
    return sorted(paths, key=lambda p: p.relative_to(root).as_posix())


def test_features_rows_follow_sorted_paths(tmp_path: Path, capsys) -> None:
    files = write_images(tmp_path / "images")
    tower = build_tower("eva02-clip-b16-tiny", device="cpu", seed=5).eval()
    weights = save_weights(tower, tmp_path / "tower.safetensors")
    out = tmp_path / "out" / "feats.npy"
    argv = ["features", "--preset", "eva02-clip-b16-tiny", "--images", str(tmp_path / "images"),
            "--out", str(out), "--batch-size", "3"]
    assert main([*argv, "--weights", str(weights)]) == 0
    feats = np.load(out)
    assert feats.shape == (8, 128) and feats.dtype == np.float32
    transform = clip_transform(tower.preset)
    for row, path in [(0, files[0]), (5, files[5])]:
        with Image.open(path) as img:
            x = transform(img).unsqueeze(0)
        with torch.no_grad():
            np.testing.assert_allclose(feats[row], tower(x)[0].numpy(), atol=1e-5)
    # Seeded random weights are the same tower as the saved one.
    assert main([*argv, "--weights", "random", "--seed", "5"]) == 0
    np.testing.assert_allclose(np.load(out), feats, atol=1e-6)
    assert not list(out.parent.glob("*.partial"))


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"--batch-size": "0"}, "--batch-size"),
        ({"--out": "x.csv"}, "--out"),
        ({"--images": "/nonexistent/dir"}, "--images"),
        ({"--weights": "/nonexistent.pt"}, "does not exist"),
    ],
)
def test_features_bad_input(tmp_path: Path, capsys, override: dict, message: str) -> None:
    write_images(tmp_path / "images")
    options = {"--preset": "eva-clip-18b-tiny", "--images": str(tmp_path / "images"),
               "--out": str(tmp_path / "f.npy"), "--weights": "random", **override}
    argv = ["features", *(part for item in options.items() for part in item)]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "f.npy").exists()


def test_clip_transform_crops_the_centre_of_the_short_side() -> None:
    preset = PRESETS["eva-clip-18b-tiny"]
    image = Image.new("L", (336, 112))
    image.paste(255, (112, 0, 224, 112))  # a white centre square
    x = clip_transform(preset)(image)
    assert x.shape == (3, 112, 112)
    white = (1 - torch.tensor(preset.mean)) / torch.tensor(preset.std)
    torch.testing.assert_close(x[:, 56, 56], white)
    torch.testing.assert_close(x.mean(dim=(1, 2)), white, atol=1e-2, rtol=0)


def test_features_reads_and_writes_s3(tmp_path: Path, monkeypatch, capsys) -> None:
    """Images under an s3:// prefix in, the .npy out to s3://, with the environment's store."""
    from evaclip.s3server import EmbeddedS3

    write_images(tmp_path / "images")
    with EmbeddedS3(buckets=["data"]) as s3:
        for key, value in s3.env().items():
            monkeypatch.setenv(key, value)
        monkeypatch.setenv("EVACLIP_CACHE_DIR", str(tmp_path / "cache"))
        storage = s3.storage(cache_dir=tmp_path / "cache")
        storage.upload_tree(tmp_path / "images", "s3://data/images")
        argv = ["features", "--preset", "eva-clip-8b-tiny", "--weights", "random",
                "--images", "s3://data/images", "--out", "s3://data/out/feats.npy"]
        assert main(argv) == 0
        storage.download("s3://data/out/feats.npy", tmp_path / "remote.npy")
        assert main([*argv[:-1], str(tmp_path / "local.npy")]) == 0
    remote, local = np.load(tmp_path / "remote.npy"), np.load(tmp_path / "local.npy")
    assert remote.shape == (8, 128)
    np.testing.assert_array_equal(remote, local)
