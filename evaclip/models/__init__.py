"""EVA-CLIP vision towers: the preset registry, model construction and weight loading.

`evaclip.models.presets` is pure data; the torch-backed names below are imported on first
use so that importing the presets (spec, CLI, operator) never pulls in torch or timm.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "EvaClipTower": "evaclip.models.tower",
    "build_tower": "evaclip.models.tower",
    "init_random_weights": "evaclip.models.tower",
    "count_parameters": "evaclip.models.tower",
    "load_weights": "evaclip.models.checkpoints",
    "save_weights": "evaclip.models.checkpoints",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'evaclip.models' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
