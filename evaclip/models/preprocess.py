"""Image preprocessing of the EVA-CLIP authors: what the towers saw during pre-training.

Evaluation: resize the shortest side to the preset's image size (bicubic), centre crop,
scale to [0, 1], normalise with the preset's mean and std (OpenAI CLIP's). Training adds
a mild random resized crop (90-100 % of the area) and horizontal flips, as CLIP
fine-tuning recipes do.
"""

from __future__ import annotations

from typing import Any

from evaclip.models.presets import Preset

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")


def clip_transform(preset: Preset, train: bool = False) -> Any:
    """A torchvision transform: PIL image (any mode) -> float tensor [3, size, size]."""
    from torchvision import transforms as T

    size = preset.image_size
    bicubic = T.InterpolationMode.BICUBIC
    if train:
        geometry = [
            T.RandomResizedCrop(size, scale=(0.9, 1.0), interpolation=bicubic),
            T.RandomHorizontalFlip(),
        ]
    else:
        geometry = [T.Resize(size, interpolation=bicubic), T.CenterCrop(size)]
    return T.Compose([
        T.Lambda(_to_rgb),
        *geometry,
        T.ToTensor(),
        T.Normalize(preset.mean, preset.std),
    ])


def _to_rgb(image: Any) -> Any:
    return image if image.mode == "RGB" else image.convert("RGB")
