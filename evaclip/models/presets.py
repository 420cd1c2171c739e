"""The registry of EVA-CLIP vision towers.

Each preset is one entry of plain numbers: adding a tower is one `_register` call and
no new code. The numbers of the published towers follow the released model configs;
the tiny presets keep each family's structure (norm, block order, biases, attention
layout) at a size that trains on a laptop CPU in seconds.

This module imports nothing heavy so that the spec, the CLI and the operator can list
and check presets without torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

Family = Literal["eva-clip-18b", "eva-clip-8b", "eva02-clip-e14", "eva02-clip-bl"]


@dataclass(frozen=True)
class Preset:
    """The architecture of one EVA-CLIP vision tower.

    `width` is the token width, `mlp_hidden` the MLP hidden size (per branch for SwiGLU),
    `embed_dim` the size of the projected CLIP embedding. `post_norm` selects
    `x + norm(f(x))` blocks instead of `x + f(norm(x))`. `qkv_bias` means q and v biases
    with the k bias fixed at 0. `fused_qkv` is one [3W, W] projection instead of separate
    q/k/v. EVA02 B/L towers add SwiGLU with a LayerNorm inside the MLP (`scale_mlp`), a
    LayerNorm before the attention output projection (`scale_attn_inner`) and RoPE whose
    frequencies are laid out for a `rope_ref_grid` x `rope_ref_grid` patch grid (None: the
    tower's own grid).
    """

    name: str
    family: Family
    image_size: int
    patch_size: int
    width: int
    depth: int
    heads: int
    mlp_hidden: int
    embed_dim: int
    norm: Literal["rmsnorm", "layernorm"]
    post_norm: bool
    qkv_bias: bool
    head_bias: bool
    fused_qkv: bool = True
    swiglu: bool = False
    scale_mlp: bool = False
    scale_attn_inner: bool = False
    rope: bool = False
    rope_ref_grid: int | None = None
    norm_eps: float = 1e-6
    description: str = ""
    test_only: bool = False
    mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
    std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
    aliases: tuple[str, ...] = field(default_factory=tuple)

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def tokens(self) -> int:
        """Sequence length seen by each block: patches plus the CLS token."""
        return self.num_patches + 1

    @property
    def head_dim(self) -> int:
        return self.width // self.heads


PRESETS: dict[str, Preset] = {}


def _register(preset: Preset) -> Preset:
    if preset.name in PRESETS:
        raise ValueError(f"preset {preset.name!r} registered twice")
    if preset.width % preset.heads:
        raise ValueError(f"preset {preset.name!r}: width must divide by heads")
    PRESETS[preset.name] = preset
    return preset


# Published towers.
_register(Preset(
    name="eva-clip-18b", family="eva-clip-18b", image_size=224, patch_size=14,
    width=5120, depth=48, heads=40, mlp_hidden=25600, embed_dim=1536,
    norm="rmsnorm", post_norm=True, qkv_bias=False, head_bias=False,
    description="EVA-CLIP-18B vision tower (17.63 B parameters)",
))
_register(Preset(
    name="eva-clip-8b", family="eva-clip-8b", image_size=224, patch_size=14,
    width=4096, depth=32, heads=32, mlp_hidden=20480, embed_dim=1280,
    norm="rmsnorm", post_norm=False, qkv_bias=False, head_bias=False,
    description="EVA-CLIP-8B vision tower at 224 px",
))
_register(Preset(
    name="eva-clip-8b-448", family="eva-clip-8b", image_size=448, patch_size=14,
    width=4096, depth=32, heads=32, mlp_hidden=20480, embed_dim=1280,
    norm="rmsnorm", post_norm=False, qkv_bias=False, head_bias=False,
    description="EVA-CLIP-8B-plus vision tower at 448 px",
))
_register(Preset(
    name="eva02-clip-e14-plus", family="eva02-clip-e14", image_size=224, patch_size=14,
    width=1792, depth=64, heads=16, mlp_hidden=15360, embed_dim=1024,
    norm="layernorm", post_norm=True, qkv_bias=True, head_bias=True,
    description="EVA02-CLIP-bigE-14-plus vision tower",
))
_register(Preset(
    name="eva02-clip-l14", family="eva02-clip-bl", image_size=224, patch_size=14,
    width=1024, depth=24, heads=16, mlp_hidden=2730, embed_dim=768,
    norm="layernorm", post_norm=False, qkv_bias=True, head_bias=True,
    fused_qkv=False, swiglu=True, scale_mlp=True, scale_attn_inner=True, rope=True,
    rope_ref_grid=16,
    description="EVA02-CLIP-L/14 vision tower at 224 px",
))
_register(Preset(
    name="eva02-clip-l14-336", family="eva02-clip-bl", image_size=336, patch_size=14,
    width=1024, depth=24, heads=16, mlp_hidden=2730, embed_dim=768,
    norm="layernorm", post_norm=False, qkv_bias=True, head_bias=True,
    fused_qkv=False, swiglu=True, scale_mlp=True, scale_attn_inner=True, rope=True,
    rope_ref_grid=16,
    description="EVA02-CLIP-L/14 vision tower at 336 px",
))
_register(Preset(
    name="eva02-clip-b16", family="eva02-clip-bl", image_size=224, patch_size=16,
    width=768, depth=12, heads=12, mlp_hidden=2048, embed_dim=512,
    norm="layernorm", post_norm=False, qkv_bias=True, head_bias=True,
    fused_qkv=False, swiglu=True, scale_mlp=True, scale_attn_inner=True, rope=True,
    rope_ref_grid=16,
    description="EVA02-CLIP-B/16 vision tower",
))

# Tiny towers with each family's structure, for tests and the CPU demo.
_register(Preset(
    name="eva-clip-18b-tiny", family="eva-clip-18b", image_size=112, patch_size=14,
    width=192, depth=4, heads=3, mlp_hidden=768, embed_dim=128,
    norm="rmsnorm", post_norm=True, qkv_bias=False, head_bias=False, test_only=True,
    description="EVA-CLIP-18B structure at test size (post-norm RMSNorm, no biases)",
))
_register(Preset(
    name="eva-clip-8b-tiny", family="eva-clip-8b", image_size=112, patch_size=14,
    width=192, depth=4, heads=3, mlp_hidden=768, embed_dim=128,
    norm="rmsnorm", post_norm=False, qkv_bias=False, head_bias=False, test_only=True,
    description="EVA-CLIP-8B structure at test size (pre-norm RMSNorm, no biases)",
))
_register(Preset(
    name="eva02-clip-e14-tiny", family="eva02-clip-e14", image_size=112, patch_size=14,
    width=192, depth=4, heads=3, mlp_hidden=768, embed_dim=128,
    norm="layernorm", post_norm=True, qkv_bias=True, head_bias=True, test_only=True,
    description="EVA02-CLIP-E/14+ structure at test size (post-norm LayerNorm, q/v bias)",
))
_register(Preset(
    name="eva02-clip-b16-tiny", family="eva02-clip-bl", image_size=112, patch_size=16,
    width=192, depth=4, heads=3, mlp_hidden=512, embed_dim=128,
    norm="layernorm", post_norm=False, qkv_bias=True, head_bias=True,
    fused_qkv=False, swiglu=True, scale_mlp=True, scale_attn_inner=True, rope=True,
    test_only=True,
    description="EVA02-CLIP-B/L structure at test size (RoPE, SwiGLU, separate q/k/v)",
))

PRESET_NAMES: tuple[str, ...] = tuple(PRESETS)


def get_preset(name: str) -> Preset:
    """Return the preset called `name`, or raise KeyError listing the known ones."""
    try:
        return PRESETS[name]
    except KeyError:
        raise KeyError(
            f"unknown preset {name!r}; known presets: {', '.join(PRESET_NAMES)}"
        ) from None
