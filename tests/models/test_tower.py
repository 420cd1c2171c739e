"""Every preset builds on the meta device with the architecture its numbers describe."""

from __future__ import annotations

import pytest
import timm
import torch

from evaclip.errors import UserError
from evaclip.models import EvaClipTower, build_tower, count_parameters, init_random_weights
from evaclip.models.presets import PRESETS, Preset

TINY = [name for name, p in PRESETS.items() if p.test_only]
ALL = list(PRESETS)


def arithmetic_parameters(p: Preset) -> int:
    """Parameter count from the preset's numbers alone (no torch module involved)."""
    w, h = p.width, p.mlp_hidden
    norm = w * (2 if p.norm == "layernorm" else 1)
    inner_norm = (2 if p.norm == "layernorm" else 1)
    stem = 3 * p.patch_size**2 * w + w + w + p.tokens * w  # conv + bias, cls, pos
    attn = 3 * w * w + (2 * w if p.qkv_bias else 0) + w * w + w
    if p.scale_attn_inner:
        attn += inner_norm * w
    if p.swiglu:
        mlp = 2 * (w * h + h) + h * w + w + (inner_norm * h if p.scale_mlp else 0)
    else:
        mlp = w * h + h + h * w + w
    block = attn + mlp + 2 * norm
    head = w * p.embed_dim + (p.embed_dim if p.head_bias else 0)
    return stem + p.depth * block + norm + head


@pytest.mark.parametrize("name", ALL)
def test_meta_build_matches_arithmetic(name: str) -> None:
    tower = build_tower(name, device="meta")
    assert isinstance(tower, EvaClipTower)
    assert all(t.is_meta for t in tower.parameters())
    assert tower.embed_dim == PRESETS[name].embed_dim
    assert len(tower.trunk.blocks) == PRESETS[name].depth
    assert count_parameters(name) == arithmetic_parameters(PRESETS[name])


@pytest.mark.parametrize(
    ("name", "billions"),
    [("eva-clip-18b", 17.63), ("eva-clip-8b", 7.53), ("eva02-clip-e14-plus", 4.35)],
)
def test_published_counts(name: str, billions: float) -> None:
    assert abs(count_parameters(name) / 1e9 - billions) <= 0.005


@pytest.mark.parametrize(
    ("name", "timm_name"),
    [
        ("eva02-clip-b16", "eva02_base_patch16_clip_224"),
        ("eva02-clip-l14", "eva02_large_patch14_clip_224"),
        ("eva02-clip-l14-336", "eva02_large_patch14_clip_336"),
        ("eva02-clip-e14-plus", "eva02_enormous_patch14_clip_224"),
    ],
)
def test_eva02_presets_match_timm_configs(name: str, timm_name: str) -> None:
    """The EVA02 presets have exactly the tensors of timm's registered CLIP towers."""
    ours = build_tower(name).trunk.state_dict()
    with torch.device("meta"):
        ref = timm.create_model(timm_name, num_classes=PRESETS[name].embed_dim).state_dict()
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in ref.items()}


@pytest.mark.parametrize("name", TINY)
def test_tiny_forward(name: str) -> None:
    torch.manual_seed(123)
    tower = build_tower(name, device="cpu")
    p = tower.preset
    images = torch.randn(2, 3, p.image_size, p.image_size)
    with torch.no_grad():
        out = tower(images)
    assert out.shape == (2, p.embed_dim)
    assert torch.isfinite(out).all()
    # Seeded init does not depend on the global RNG.
    again = init_random_weights(build_tower(name), seed=0)
    with torch.no_grad():
        assert torch.equal(again(images), out)


@pytest.mark.parametrize("name", TINY)
def test_family_structure(name: str) -> None:
    """Block order, norm, biases and attention layout follow the family."""
    p = PRESETS[name]
    trunk = build_tower(name).trunk
    block = trunk.blocks[0]
    assert type(block).__name__ == ("EvaBlockPostNorm" if p.post_norm else "EvaBlock")
    assert type(block.norm1).__name__ == ("RmsNormFp32" if p.norm == "rmsnorm" else "LayerNorm")
    assert (trunk.head.bias is not None) == p.head_bias
    if p.fused_qkv:
        assert block.attn.qkv is not None
        assert (block.attn.q_bias is not None) == p.qkv_bias
    else:
        assert block.attn.q_proj is not None and block.attn.k_proj.bias is None
    assert (trunk.rope is not None) == p.rope


def test_rmsnorm_statistics_in_fp32() -> None:
    """fp16 activations of 1000 (squares overflow fp16) still normalise to the weight."""
    tower = build_tower("eva-clip-18b-tiny", device="cpu").half()
    norm = tower.trunk.blocks[0].norm1
    x = torch.full((1, 4, tower.preset.width), 1000.0, dtype=torch.float16)
    y = norm(x)
    assert y.dtype == torch.float16
    torch.testing.assert_close(y[0, 0], norm.weight.detach(), rtol=1e-3, atol=0)


def test_unknown_preset_is_a_user_error() -> None:
    with pytest.raises(UserError, match="eva-clip-18b-tiny"):
        build_tower("eva-clip-19b")
