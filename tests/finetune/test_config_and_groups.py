"""DeepSpeed config rendering, user overrides, AdamW parameter groups and the schedule."""

from __future__ import annotations

import math

import pytest
import torch

from evaclip.errors import UserError
from evaclip.manifest import parse_resource
from evaclip.models import build_tower
from evaclip.trainer.deepspeed_config import deep_merge, render_deepspeed_config
from evaclip.trainer.param_groups import build_param_groups, layer_id, warmup_cosine


def _spec(**overrides):
    spec = {
        "model": {"preset": "eva-clip-18b-tiny", "precision": "bf16"},
        "data": {"train": "s3://bucket/train"},
        "method": {"type": "full"},
        "training": {"batchSize": 8, "gradientAccumulationSteps": 3, "gradientClipping": 0.5},
        "output": "s3://bucket/out",
    }
    for key, value in overrides.items():
        spec[key] = {**spec.get(key, {}), **value}
    return parse_resource({"apiVersion": "training.evaclip.io/v1alpha1",
                           "kind": "EvaClipFinetune", "metadata": {"name": "t"},
                           "spec": spec}).spec


def test_rendered_config_carries_the_spec() -> None:
    cfg = render_deepspeed_config(_spec(deepspeed={"zeroStage": 2}), world_size=4)
    assert cfg["train_micro_batch_size_per_gpu"] == 8
    assert cfg["gradient_accumulation_steps"] == 3
    assert cfg["train_batch_size"] == 8 * 3 * 4
    assert cfg["gradient_clipping"] == 0.5
    assert cfg["zero_optimization"]["stage"] == 2
    assert cfg["bf16"] == {"enabled": True}
    # Eva concatenates a buffer with bf16 weights below ZeRO-3.
    assert cfg["data_types"] == {"buffer_dtype": "bf16"}
    assert "fp16" not in cfg and "offload_optimizer" not in cfg["zero_optimization"]


def test_offload_and_precisions() -> None:
    cfg = render_deepspeed_config(
        _spec(deepspeed={"zeroStage": 3, "offloadOptimizer": "cpu", "offloadParameters": "cpu"},
              model={"precision": "fp32"}), world_size=2)
    zero = cfg["zero_optimization"]
    assert zero["offload_optimizer"]["device"] == "cpu"
    assert zero["offload_param"]["device"] == "cpu"
    assert cfg["zero_force_ds_cpu_optimizer"] is False
    assert "bf16" not in cfg and "fp16" not in cfg and "data_types" not in cfg
    fp16 = render_deepspeed_config(_spec(model={"precision": "fp16"},
                                         resources={"gpusPerNode": 1}), world_size=1)
    assert fp16["fp16"]["enabled"] is True and fp16["fp16"]["loss_scale"] == 0


def test_user_config_is_deep_merged_over_the_rendered_one() -> None:
    cfg = render_deepspeed_config(_spec(deepspeed={"config": {
        "zero_optimization": {"reduce_bucket_size": 1000},
        "bf16": {"immediate_grad_update": True},
        "flops_profiler": {"enabled": False},
    }}), world_size=2)
    assert cfg["zero_optimization"] == {"stage": 2, "reduce_bucket_size": 1000}
    assert cfg["bf16"] == {"enabled": True, "immediate_grad_update": True}
    assert cfg["flops_profiler"] == {"enabled": False}
    assert cfg["train_micro_batch_size_per_gpu"] == 8
    assert deep_merge({"a": {"b": 1}, "c": [1]}, {"a": {"d": 2}, "c": [2]}) == {
        "a": {"b": 1, "d": 2}, "c": [2]}


def test_overrides_of_spec_fields_are_refused_naming_the_field() -> None:
    with pytest.raises(UserError, match=r"spec\.deepspeed\.config: train_batch_size .*"
                                        r"spec\.training\.batchSize"):
        render_deepspeed_config(_spec(deepspeed={"config": {"train_batch_size": 7}}), 2)
    with pytest.raises(UserError, match=r"zero_optimization\.stage .*spec\.deepspeed\.zeroStage"):
        render_deepspeed_config(_spec(deepspeed={"config": {"zero_optimization": {"stage": 3}}}),
                                2)


def test_offload_with_zero0_is_refused_by_the_spec() -> None:
    with pytest.raises(UserError, match="offloadOptimizer: cpu needs zeroStage"):
        _spec(deepspeed={"zeroStage": 0, "offloadOptimizer": "cpu"})
    with pytest.raises(UserError, match="offloadParameters: cpu needs zeroStage 3"):
        _spec(deepspeed={"zeroStage": 2, "offloadParameters": "cpu"})


def test_param_groups_decay_and_layer_rates() -> None:
    tower = build_tower("eva02-clip-e14-tiny", device="cpu")  # has q/v and norm biases
    head = torch.nn.Linear(128, 10)
    depth = tower.preset.depth
    groups = build_param_groups(tower.named_parameters(), head.named_parameters(), depth=depth,
                                head_lr=1e-2, backbone_lr=1e-3, layer_decay=0.5,
                                weight_decay=0.05)
    by_param = {name: g for g in groups for name in g["param_names"]}
    trained = {n for n, p in tower.named_parameters()} | {"weight", "bias"}
    assert set(by_param) >= trained - {"weight", "bias"}
    for name, group in by_param.items():
        no_decay = (name.endswith("bias") or "norm" in name or "pos_embed" in name
                    or "cls_token" in name or name.endswith("q_bias") or name.endswith("v_bias"))
        assert (group["weight_decay"] == 0.0) == no_decay, name
    assert by_param["trunk.pos_embed"]["lr"] == pytest.approx(1e-3 * 0.5**depth)
    assert by_param["trunk.patch_embed.proj.weight"]["lr"] == pytest.approx(1e-3 * 0.5**depth)
    assert by_param["trunk.blocks.0.attn.qkv.weight"]["lr"] == pytest.approx(
        1e-3 * 0.5 ** (depth - 1))
    assert by_param[f"trunk.blocks.{depth - 1}.mlp.fc1.weight"]["lr"] == pytest.approx(1e-3)
    assert by_param["trunk.head.weight"]["lr"] == pytest.approx(1e-3)
    head_groups = [g for g in groups if g["name"].startswith("head/")]
    assert {g["lr"] for g in head_groups} == {1e-2}
    assert {g["weight_decay"] for g in head_groups} == {0.0, 0.05}
    # Frozen parameters get no group.
    for p in tower.trunk.blocks[0].parameters():
        p.requires_grad_(False)
    groups = build_param_groups(tower.named_parameters(), [], depth=depth, head_lr=1,
                                backbone_lr=1, layer_decay=1, weight_decay=0)
    names = {n for g in groups for n in g["param_names"]}
    assert not any(n.startswith("trunk.blocks.0.") for n in names)


def test_layer_ids_inside_peft_and_deepspeed_names() -> None:
    assert layer_id("base_model.model.trunk.blocks.3.attn.qkv.lora_A.default.weight", 4) == 4
    assert layer_id("module.tower.trunk.cls_token", 4) == 0
    assert layer_id("module.tower.trunk.norm.weight", 4) == 5


def test_warmup_then_cosine() -> None:
    f = warmup_cosine(total_steps=100, warmup_fraction=0.1)
    assert 0 < f(0) < f(5) < f(9) <= 1.0
    assert f(10) == pytest.approx(1.0)
    assert f(55) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
    assert f(100) == pytest.approx(0.0, abs=1e-9)
    assert warmup_cosine(10, 0.0)(0) == pytest.approx(1.0)
