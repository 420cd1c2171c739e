"""Build EVA-CLIP vision towers from presets on timm's `Eva`.

A tower is timm's `Eva` (`tower.trunk`) configured per preset, whose classifier head is
the CLIP projection, wrapped in `EvaClipTower` so callers get the preset beside it.
Construction always happens on the meta device: no random weights are allocated before
real ones are loaded (`load_weights`) or deliberately drawn (`init_random_weights`).

The trunk's parameter names are those of the original EVA-CLIP `visual.*` release, so the
original checkpoints need no renaming beyond dropping the prefix.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
from timm.layers import LayerNorm, RmsNormFp32
from timm.models.eva import Eva
from torch import nn

from evaclip.errors import UserError
from evaclip.models.presets import PRESET_NAMES, Preset, get_preset


class EvaClipTower(nn.Module):
    """An EVA-CLIP image encoder: images [B, 3, H, W] -> projected embeddings [B, embed_dim].

    `trunk` is the timm `Eva` (blocks at `trunk.blocks`, projection at `trunk.head`).
    """

    def __init__(self, preset: Preset, trunk: Eva) -> None:
        super().__init__()
        self.preset = preset
        self.trunk = trunk

    @property
    def embed_dim(self) -> int:
        return self.preset.embed_dim

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.trunk(images)

    def forward_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """Normalised token features [B, tokens, width] before pooling and projection."""
        return self.trunk.forward_features(images)


def resolve_preset(preset: str | Preset) -> Preset:
    """Accept a preset name or a `Preset`; an unknown name is the user's to fix."""
    if isinstance(preset, Preset):
        return preset
    try:
        return get_preset(preset)
    except KeyError:
        raise UserError(
            f"model.preset: got {preset!r}; known presets: {', '.join(PRESET_NAMES)}"
        ) from None


def eva_kwargs(preset: Preset) -> dict[str, Any]:
    """The keyword arguments of timm's `Eva` that express `preset`."""
    norm_cls = RmsNormFp32 if preset.norm == "rmsnorm" else LayerNorm
    ref_grid = preset.rope_ref_grid
    return dict(
        img_size=preset.image_size,
        patch_size=preset.patch_size,
        num_classes=preset.embed_dim,
        global_pool="token",
        embed_dim=preset.width,
        depth=preset.depth,
        num_heads=preset.heads,
        qkv_bias=preset.qkv_bias,
        qkv_fused=preset.fused_qkv,
        mlp_ratio=preset.mlp_hidden / preset.width,
        swiglu_mlp=preset.swiglu,
        scale_mlp=preset.scale_mlp,
        scale_attn_inner=preset.scale_attn_inner,
        use_rot_pos_emb=preset.rope,
        ref_feat_shape=(ref_grid, ref_grid) if ref_grid else None,
        use_post_norm=preset.post_norm,
        norm_layer=partial(norm_cls, eps=preset.norm_eps),
        # The projection is drawn like any other Linear; timm's tiny head scale is a
        # classifier convention and would also touch the bias a bias-free head lacks.
        head_init_scale=0.0,
    )


def _mlp_hidden(trunk: Eva) -> int:
    mlp = trunk.blocks[0].mlp
    return mlp.fc2.in_features


def build_tower(
    preset: str | Preset,
    device: str | torch.device = "meta",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> EvaClipTower:
    """Build the tower of `preset`.

    On "meta" (the default) nothing is allocated: follow with `load_weights` (which
    materialises the tower from memory-mapped tensors) or `init_random_weights`. On any
    other device the tower is materialised there with deterministic random weights
    drawn from `seed`.
    """
    preset = resolve_preset(preset)
    with torch.device("meta"):
        trunk = Eva(**eva_kwargs(preset), device="meta", dtype=dtype)
        if not preset.head_bias:
            trunk.head = nn.Linear(preset.width, preset.embed_dim, bias=False, dtype=dtype)
    if _mlp_hidden(trunk) != preset.mlp_hidden:
        raise ValueError(
            f"preset {preset.name!r}: timm built MLP hidden {_mlp_hidden(trunk)}, "
            f"expected {preset.mlp_hidden}"
        )
    _route_qkv_through_module(trunk)
    tower = EvaClipTower(preset, trunk)
    if torch.device(device).type != "meta":
        init_random_weights(tower, seed=seed, device=device)
    return tower


def _route_qkv_through_module(trunk: Eva) -> None:
    """Make attention with a q/v bias call its `qkv` module, then add the bias.

    By default timm's Eva applies the fused qkv weight and the bias with one `F.linear`,
    reading `attn.qkv.weight` directly: a wrapper around `attn.qkv` (a LoRA adapter) would
    be skipped without a word. The separate-bias path computes the same projection plus
    the same bias through the module, so every tower built here takes adapters.
    """
    for block in trunk.blocks:
        attn = block.attn
        if getattr(attn, "q_bias", None) is not None and hasattr(attn, "qkv_bias_separate"):
            attn.qkv_bias_separate = True


def is_meta(module: nn.Module) -> bool:
    """Whether any parameter or buffer of `module` still lives on the meta device."""
    tensors = list(module.parameters()) + list(module.buffers())
    return any(t.is_meta for t in tensors)


def init_buffers(tower: EvaClipTower, device: str | torch.device = "cpu") -> None:
    """Materialise the computed buffers (k-bias zeros, RoPE tables) on `device`.

    They are never in checkpoints; parameters are left where they are.
    """
    from timm.models._manipulate import reinit_non_persistent_buffers

    for module in tower.modules():
        for name, buf in list(module.named_buffers(recurse=False)):
            if buf is not None and buf.is_meta:
                persistent = name not in module._non_persistent_buffers_set
                fresh = torch.empty_like(buf, device=device)
                module.register_buffer(name, fresh, persistent=persistent)
    reinit_non_persistent_buffers(tower.trunk)


def match_buffer_dtype(tower: EvaClipTower) -> None:
    """Give floating buffers the parameters' dtype (Eva concatenates k-bias with q/v bias)."""
    dtypes = {p.dtype for p in tower.parameters() if p.is_floating_point()}
    if len(dtypes) != 1:
        return
    (dtype,) = dtypes
    for module in tower.modules():
        for name, buf in list(module.named_buffers(recurse=False)):
            if buf is not None and buf.is_floating_point() and buf.dtype != dtype:
                setattr(module, name, buf.to(dtype))


def init_random_weights(
    tower: EvaClipTower, seed: int = 0, device: str | torch.device | None = None
) -> EvaClipTower:
    """Draw deterministic random weights (for tests and demos) into `tower`.

    A meta tower is materialised on `device` (cpu by default) first. The same seed
    gives the same weights whatever the process's global RNG state.
    """
    if device is None:
        device = "cpu" if is_meta(tower) else next(tower.parameters()).device
    tower.to_empty(device=device)
    devices = [] if torch.device(device).type == "cpu" else None
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        with torch.no_grad():
            tower.trunk.init_weights(needs_reset=True)
    init_buffers(tower, device)
    return tower


def count_parameters(preset: str | Preset) -> int:
    """The exact number of parameters of `preset`'s tower, counted on the meta device."""
    tower = build_tower(preset, device="meta")
    return sum(p.numel() for p in tower.parameters())
