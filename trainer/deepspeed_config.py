"""The DeepSpeed config of a fine-tuning job, rendered from its spec.

Every knob the spec exposes (`spec.deepspeed.*`, `spec.training.*`, `spec.model.precision`)
lands in one dict that goes to `deepspeed.initialize(config=...)`; `spec.deepspeed.config`
is then deep-merged over it so a user can set anything DeepSpeed knows that the spec does
not expose (mappings merge key by key, everything else is replaced). Keys that a spec
field renders (ZeRO stage, offload devices, precision, batch sizes, clipping, optimizer,
scheduler) are refused by `evaclip.plan.check_deepspeed_overrides`, naming the field.

The optimizer is never declared here: the recipe hands DeepSpeed a plain `torch.optim.AdamW`
with its own parameter groups (head and backbone learning rates, layer decay, no decay on
norms), which is why `zero_allow_untested_optimizer` is set. With optimizer offload that
AdamW steps on the host in fp32; DeepSpeed's compiled CPU Adam would be faster but needs
its ops built into the image, so `zero_force_ds_cpu_optimizer` is switched off.

Activation checkpointing is done by timm (`set_grad_checkpointing`), not by DeepSpeed's
own checkpointing API, so it is not part of this config.
"""

from __future__ import annotations

import copy
from typing import Any

from evaclip.plan import check_deepspeed_overrides
from evaclip.spec import EvaClipFinetuneSpec

# Rarely print DeepSpeed's own step lines; the trainer reports progress itself.
_STEPS_PER_PRINT = 10**9


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Return `base` with `override` merged in: mappings recursively, other values replaced."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _precision_section(spec: EvaClipFinetuneSpec) -> dict[str, Any]:
    precision = spec.model.precision
    if precision == "bf16":
        section: dict[str, Any] = {"bf16": {"enabled": True}}
        if spec.deepspeed.zero_stage < 3:
            # DeepSpeed keeps buffers in fp32 below ZeRO-3, and Eva concatenates a buffer
            # with bf16 weights in attention: keep buffers in bf16 as well.
            section["data_types"] = {"buffer_dtype": "bf16"}
        return section
    if precision == "fp16":
        # Dynamic loss scaling (loss_scale 0) starting at 2^16.
        return {"fp16": {"enabled": True, "loss_scale": 0, "initial_scale_power": 16}}
    return {}


def _zero_section(spec: EvaClipFinetuneSpec) -> dict[str, Any]:
    ds = spec.deepspeed
    zero: dict[str, Any] = {"stage": ds.zero_stage}
    if ds.offload_optimizer == "cpu":
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if ds.offload_parameters == "cpu":
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    if ds.zero_stage == 3:
        # Consolidate a 16-bit copy of the weights on save so the full tower can be
        # exported without a separate conversion step.
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    return zero


def render_deepspeed_config(spec: EvaClipFinetuneSpec, world_size: int) -> dict[str, Any]:
    """The DeepSpeed config for `spec` on `world_size` processes, user overrides merged in."""
    if world_size < 1:
        raise ValueError(f"world_size must be at least 1, got {world_size}")
    t = spec.training
    ds = spec.deepspeed
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": t.batch_size,
        "gradient_accumulation_steps": t.gradient_accumulation_steps,
        "train_batch_size": t.batch_size * t.gradient_accumulation_steps * world_size,
        "gradient_clipping": t.gradient_clipping,
        "zero_optimization": _zero_section(spec),
        "zero_allow_untested_optimizer": True,
        "steps_per_print": _STEPS_PER_PRINT,
        "wall_clock_breakdown": False,
        **_precision_section(spec),
    }
    if ds.offload_optimizer == "cpu" or ds.offload_parameters == "cpu":
        config["zero_force_ds_cpu_optimizer"] = False
    check_deepspeed_overrides(spec)
    return deep_merge(config, ds.config)
