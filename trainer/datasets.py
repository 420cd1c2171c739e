"""Real example data shipped in packages, written in the image-folder layout.

`evaclip datasets digits OUT_DIR` writes scikit-learn's handwritten digits (1,797 real
8x8 grey images, classes 0-9) as PNG files in `OUT_DIR/{train,validation}/<class>/<i>.png`,
`<i>` being the image's index in scikit-learn's array, with a fixed stratified split. The
images keep their 8x8 size; the CLIP preprocessing upscales them like any small photo.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from evaclip.errors import UserError

MARKER = ".evaclip-dataset.json"
SPLITS = ("train", "validation")


def _prepare(out: Path) -> None:
    """Empty the split folders of an earlier run; refuse to touch anything else."""
    if not out.exists():
        out.mkdir(parents=True)
        return
    if not out.is_dir():
        raise UserError(f"OUT_DIR: {out} exists and is not a directory; pass a folder")
    ours = (out / MARKER).is_file()
    if not ours and any(out.iterdir()):
        raise UserError(
            f"OUT_DIR: {out} is not empty and was not written by `evaclip datasets`; "
            "pass an empty or new folder"
        )
    for split in SPLITS:
        shutil.rmtree(out / split, ignore_errors=True)


def write_digits(out_dir: str | Path, validation_fraction: float = 0.2,
                 seed: int = 0) -> dict[str, int]:
    """Write the digits as PNG files; return the number of images per split."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if not 0.0 < validation_fraction < 1.0:
        raise UserError(
            f"--validation-fraction: got {validation_fraction}; use a number between 0 and 1"
        )
    out = Path(out_dir)
    _prepare(out)
    digits = load_digits()
    index = np.arange(len(digits.target))
    train_idx, val_idx = train_test_split(
        index, test_size=validation_fraction, random_state=seed, stratify=digits.target
    )
    # Pixel values are 0..16; stretch them to the full 8-bit range.
    pixels = np.clip(np.rint(digits.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    counts = {}
    for split, idx in zip(SPLITS, (train_idx, val_idx), strict=True):
        for i in sorted(int(j) for j in idx):
            folder = out / split / str(int(digits.target[i]))
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels[i]).save(folder / f"{i}.png")
        counts[split] = len(idx)
    (out / MARKER).write_text(json.dumps({
        "dataset": "sklearn-digits", "validationFraction": validation_fraction,
        "seed": seed, "images": counts,
    }, indent=2) + "\n")
    return counts
