"""AdamW parameter groups of a fine-tuning job: learning rate and weight decay per parameter.

- The classifier head trains at `training.learningRate`; every trained tower parameter at
  `training.backboneLearningRate` scaled by layer-wise decay.
- Layer ids follow the tower's order: the patch/position embeddings and CLS token are layer
  0, block i (counted from 1) is layer i, and whatever follows the blocks (final norm,
  CLIP projection) is the top. The scale is `layerDecay ** (depth - layer)`, floored at
  exponent 0: the last block and the top train at the full backbone rate, the embeddings
  at `layerDecay ** depth`.
- No weight decay on norms, biases (any parameter of one dimension) and embeddings
  (`pos_embed`, `cls_token`, `reg_token`, `patch_embed` bias); LoRA matrices decay as any
  other weight.

Names are matched wherever they appear, so the same rules hold on the bare tower, inside a
peft wrapper (`base_model.model.trunk.blocks.3...`) and under DeepSpeed.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

import torch

_BLOCK = re.compile(r"(?:^|\.)blocks\.(\d+)\.")
_EMBEDDING = re.compile(r"(?:^|\.)(cls_token|reg_token|pos_embed|patch_embed)(?:\.|$)")
_NO_DECAY_NAMES = re.compile(r"(?:^|\.)(cls_token|reg_token|pos_embed)$")


def layer_id(name: str, depth: int) -> int:
    """The layer of a tower parameter: 0 for embeddings, i for block i-1, depth+1 above."""
    match = _BLOCK.search(name)
    if match:
        return int(match.group(1)) + 1
    if _EMBEDDING.search(name):
        return 0
    return depth + 1


def layer_scale(layer: int, depth: int, decay: float) -> float:
    """Learning-rate multiplier of a layer: decay^(depth - layer), never above 1."""
    return float(decay ** max(0, depth - layer))


def decays(name: str, param: torch.Tensor) -> bool:
    """Whether AdamW weight decay applies: not to norms, biases or embeddings."""
    if param.ndim <= 1 or _NO_DECAY_NAMES.search(name):
        return False
    return True


def build_param_groups(
    backbone: Iterable[tuple[str, torch.nn.Parameter]],
    head: Iterable[tuple[str, torch.nn.Parameter]],
    *,
    depth: int,
    head_lr: float,
    backbone_lr: float,
    layer_decay: float,
    weight_decay: float,
) -> list[dict[str, Any]]:
    """Group trainable parameters by (learning rate, weight decay) for torch AdamW.

    `backbone` and `head` are `named_parameters()` iterables; frozen parameters are
    skipped. Each group carries `name` (for logs and tests) and `lr_scale`.
    """
    groups: dict[str, dict[str, Any]] = {}

    def add(key: str, name: str, param: torch.nn.Parameter, lr: float, scale: float) -> None:
        wd = weight_decay if decays(name, param) else 0.0
        gkey = f"{key}/{'decay' if wd else 'no_decay'}"
        group = groups.setdefault(
            gkey,
            {"name": gkey, "params": [], "param_names": [], "lr": lr, "lr_scale": scale,
             "weight_decay": wd},
        )
        group["params"].append(param)
        group["param_names"].append(name)

    for name, param in backbone:
        if param.requires_grad:
            layer = layer_id(name, depth)
            scale = layer_scale(layer, depth, layer_decay)
            add(f"backbone/layer_{layer:03d}", name, param, backbone_lr * scale, scale)
    for name, param in head:
        if param.requires_grad:
            add("head", name, param, head_lr, 1.0)
    return [groups[k] for k in sorted(groups)]


def optimizer_groups(groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The groups as torch.optim takes them: without the parameter names."""
    return [{k: v for k, v in g.items() if k != "param_names"} for g in groups]


def warmup_cosine(total_steps: int, warmup_fraction: float):
    """The multiplier of every group's peak learning rate at optimizer step `s`.

    Linear warm-up over the first `warmup_fraction` of the steps (starting above zero so
    the first step already learns), then cosine decay to zero at `total_steps`. Written
    as a closure over plain numbers so that `LambdaLR` state stays a step counter and a
    resumed job lands on the same point of the curve.
    """
    import math

    total = max(1, total_steps)
    warmup = int(round(warmup_fraction * total))

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor
