"""Method set-up on real tiny towers: what trains, LoRA gradients, refusals, weight export."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from evaclip.errors import UserError
from evaclip.manifest import parse_resource
from evaclip.models import build_tower
from evaclip.trainer.finetune import build_model, freeze_for_partial, save_sharded


def _spec(method: dict, **overrides):
    spec = {
        "model": {"preset": "eva-clip-18b-tiny", "precision": "fp32"},
        "data": {"train": "s3://bucket/train"},
        "method": method,
        "resources": {"gpusPerNode": 0},
        "output": "s3://bucket/out",
    }
    spec.update(overrides)
    return parse_resource({"apiVersion": "training.evaclip.io/v1alpha1",
                           "kind": "EvaClipFinetune", "metadata": {"name": "t"},
                           "spec": spec}).spec


def _backward(model) -> None:
    torch.manual_seed(0)
    images = torch.randn(2, 3, 112, 112)
    loss = model(images).logsumexp(-1).sum()
    loss.backward()


@pytest.mark.parametrize(("preset", "checkpointing"), [
    ("eva-clip-18b-tiny", False), ("eva02-clip-e14-tiny", True), ("eva02-clip-b16-tiny", False),
])
def test_every_lora_b_gets_a_gradient(preset, checkpointing) -> None:
    """Including the fused qkv of towers with a q/v bias, which Eva would otherwise bypass."""
    targets = ["q_proj", "k_proj", "v_proj", "proj"] if "b16" in preset else ["qkv", "proj"]
    spec = _spec({"type": "lora", "lora": {"rank": 4, "targetModules": targets,
                                           "includeMlp": True}},
                 model={"preset": preset, "precision": "fp32"},
                 deepspeed={"activationCheckpointing": checkpointing})
    tower = build_tower(preset, device="cpu")
    model = build_model(spec, tower, num_classes=10, seed=0)
    # peft starts lora_B at zero; give it values so gradients reach lora_A as well.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    _backward(model)
    lora_b = {n: p for n, p in model.named_parameters() if "lora_B" in n}
    depth = tower.preset.depth
    per_block = len(targets) + (3 if tower.preset.swiglu else 2)
    assert len(lora_b) == depth * per_block
    for name, p in lora_b.items():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all("lora_" in n or n.startswith("head.") for n in trained)
    assert not any("patch_embed" in n for n in trained)


def test_partial_trains_the_last_blocks_norm_and_projection() -> None:
    spec = _spec({"type": "partial", "partial": {"trainableBlocks": 2}})
    tower = build_tower("eva-clip-18b-tiny", device="cpu")
    model = build_model(spec, tower, num_classes=10, seed=0)
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {"tower.trunk.norm.weight", "tower.trunk.head.weight", "head.weight",
            "head.bias"} <= trained
    assert any(n.startswith("tower.trunk.blocks.3.") for n in trained)
    assert any(n.startswith("tower.trunk.blocks.2.") for n in trained)
    assert not any(n.startswith(("tower.trunk.blocks.0.", "tower.trunk.blocks.1.")) or
                   "patch_embed" in n or "pos_embed" in n or "cls_token" in n for n in trained)
    _backward(model)
    assert tower.trunk.blocks[1].mlp.fc1.weight.grad is None
    assert tower.trunk.blocks[2].mlp.fc1.weight.grad.abs().sum() > 0


def test_full_trains_everything() -> None:
    tower = build_tower("eva-clip-18b-tiny", device="cpu")
    model = build_model(_spec({"type": "full"}), tower, num_classes=10, seed=0)
    assert all(p.requires_grad for p in model.parameters())


def test_partial_k_larger_than_depth_is_refused() -> None:
    with pytest.raises(UserError, match=r"method\.partial\.trainableBlocks: got 9.*4 blocks"):
        _spec({"type": "partial", "partial": {"trainableBlocks": 9}})
    with pytest.raises(UserError, match=r"spec\.method\.partial\.trainableBlocks"):
        freeze_for_partial(build_tower("eva-clip-18b-tiny"), 9)


def test_lora_targets_matching_no_module_are_refused_at_start() -> None:
    spec = _spec({"type": "lora", "lora": {"targetModules": [r"trunk\.blocks\.\d+\.nothing"]}})
    with pytest.raises(UserError, match=r"spec\.method\.lora\.targetModules.*matches no linear"):
        build_model(spec, build_tower("eva-clip-18b-tiny", device="cpu"), 10, 0)


def test_fp16_without_gpus_is_refused() -> None:
    with pytest.raises(UserError, match="model.precision: fp16 needs GPUs"):
        _spec({"type": "full"}, model={"preset": "eva-clip-18b-tiny", "precision": "fp16"})


def test_full_weights_are_sharded_with_an_index(tmp_path) -> None:
    tower = build_tower("eva-clip-18b-tiny", device="cpu")
    state = {k: v.contiguous() for k, v in tower.state_dict().items()}
    size = sum(t.numel() * t.element_size() for t in state.values())
    paths = save_sharded(state, tmp_path / "sharded", {"preset": "x"}, shard_bytes=size // 3)
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert len(paths) >= 3 and index["metadata"]["total_size"] == size
    loaded = {}
    for path in paths:
        loaded.update(load_file(str(path)))
    assert set(index["weight_map"]) == set(state) == set(loaded)
    assert all(torch.equal(loaded[k], state[k]) for k in state)
    one = save_sharded(state, tmp_path / "one", {"preset": "x"})
    assert [p.name for p in one] == ["model.safetensors"]


def test_saved_adapter_loads_onto_a_fresh_tower_with_a_qkv_bias(tmp_path) -> None:
    """peft on a fresh eva02-clip-e14 tower from build_tower reproduces the trained tower,
    with or without prepare_for_lora."""
    from peft import PeftModel

    from evaclip.trainer.finetune import prepare_for_lora

    spec = _spec({"type": "lora", "lora": {"rank": 4}},
                 model={"preset": "eva02-clip-e14-tiny", "precision": "fp32"})
    model = build_model(spec, build_tower("eva02-clip-e14-tiny", device="cpu"), 10, 0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    model.tower.save_pretrained(str(tmp_path / "adapter"))
    x = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        expected = model.tower.eval()(x)
        bare_tower = build_tower("eva02-clip-e14-tiny", device="cpu")
        without_adapter = bare_tower.eval()(x)
        assert not torch.allclose(without_adapter, expected, atol=1e-4)  # adapters matter
        fresh = prepare_for_lora(build_tower("eva02-clip-e14-tiny", device="cpu"))
        loaded = PeftModel.from_pretrained(fresh, str(tmp_path / "adapter")).eval()
        assert torch.allclose(loaded(x), expected, atol=1e-6)
        bare = PeftModel.from_pretrained(bare_tower, str(tmp_path / "adapter")).eval()
        assert torch.allclose(bare(x), expected, atol=1e-6)


def test_build_tower_routes_a_qkv_bias_through_the_module_with_unchanged_outputs() -> None:
    """Towers with a q/v bias call attn.qkv (so LoRA wraps it); the outputs are those of
    timm's default fused F.linear path."""
    tower = build_tower("eva02-clip-e14-tiny", device="cpu", seed=1).eval()
    attns = [b.attn for b in tower.trunk.blocks]
    assert all(a.q_bias is not None and a.qkv_bias_separate for a in attns)
    x = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        routed = tower(x)
        for a in attns:
            a.qkv_bias_separate = False  # timm's default
        fused = tower(x)
    assert torch.allclose(routed, fused, rtol=1e-5, atol=1e-6)
    # Towers without a qkv bias keep timm's default (there is no bias to route).
    plain = build_tower("eva-clip-18b-tiny", device="meta")
    assert all(b.attn.q_bias is None for b in plain.trunk.blocks)


def test_lora_on_a_qkv_bias_tower_gets_gradients_without_prepare_for_lora() -> None:
    from peft import LoraConfig, get_peft_model

    tower = build_tower("eva02-clip-e14-tiny", device="cpu", seed=0)
    model = get_peft_model(tower, LoraConfig(r=4, lora_alpha=8, target_modules=[
        "qkv"], bias="none"))
    model.train()
    model(torch.randn(2, 3, 112, 112)).square().sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if "lora_B" in n}
    assert len(grads) == len(tower.trunk.blocks)
    assert all(g is not None and g.abs().sum() > 0 for g in grads.values())
