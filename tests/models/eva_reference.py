"""An independent construction of each family's tiny tower with timm's `Eva`, and the
writers of synthetic checkpoints in each published layout.

Nothing here goes through `evaclip.models`: the tests compare the loader's result with
this reference to catch a wrong mapping on either side.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import save_file
from timm.layers import LayerNorm, RmsNormFp32
from timm.models.eva import Eva
from torch import nn

# Each family's tiny preset spelled out as timm arguments.
TIMM_ARGS = {
    "eva-clip-18b-tiny": dict(
        patch_size=14, norm_layer=RmsNormFp32, use_post_norm=True, qkv_bias=False, head_bias=False
    ),
    "eva-clip-8b-tiny": dict(
        patch_size=14, norm_layer=RmsNormFp32, use_post_norm=False, qkv_bias=False, head_bias=False
    ),
    "eva02-clip-e14-tiny": dict(
        patch_size=14, norm_layer=LayerNorm, use_post_norm=True, qkv_bias=True, head_bias=True
    ),
    "eva02-clip-b16-tiny": dict(
        patch_size=16, norm_layer=LayerNorm, qkv_bias=True, head_bias=True, qkv_fused=False,
        swiglu_mlp=True, scale_mlp=True, scale_attn_inner=True, use_rot_pos_emb=True,
        mlp_ratio=512 / 192,
    ),
}
FAMILIES = list(TIMM_ARGS)


def reference_eva(name: str, seed: int = 7) -> Eva:
    """The tiny tower of `name` built straight from timm, with random weights from `seed`."""
    args = dict(TIMM_ARGS[name])
    head_bias = args.pop("head_bias")
    args.setdefault("mlp_ratio", 4.0)
    torch.manual_seed(seed)
    model = Eva(
        img_size=112, num_classes=128, global_pool="token", embed_dim=192, depth=4,
        num_heads=3, **args,
    )
    if not head_bias:
        model.head = nn.Linear(192, 128, bias=False)
    # Non-zero biases and norm weights so that a swapped or dropped tensor shows.
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if p.ndim == 1:
                p.copy_(torch.randn_like(p) * 0.1 + (1.0 if "norm" in pname else 0.0))
    return model.eval()


_EVA02_MLP = (("mlp.fc1_g.", "mlp.w1."), ("mlp.fc1_x.", "mlp.w2."), ("mlp.norm.", "mlp.ffn_ln."),
              ("mlp.fc2.", "mlp.w3."))


def _is_swiglu(sd: dict[str, torch.Tensor]) -> bool:
    return any(".mlp.fc1_g." in k for k in sd)


def to_eva_clip(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """timm names -> the original EVA-CLIP release's `visual.*` names."""
    swiglu = _is_swiglu(sd)
    out = {}
    for key, value in sd.items():
        if swiglu:
            for old, new in _EVA02_MLP:
                key = key.replace(old, new)
        key = key.replace("attn.norm.", "attn.inner_attn_ln.")
        key = key.replace("attn.q_proj.bias", "attn.q_bias")
        key = key.replace("attn.v_proj.bias", "attn.v_bias")
        out["visual." + key] = value
    return out


def write_eva_clip_pt(model: Eva, path: Path) -> Path:
    """An original-release .pt: wrapper dict, visual.* tower, text tower, logit scale."""
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    visual = to_eva_clip(sd)
    if _is_swiglu(sd):
        visual["visual.rope.freqs_cos"] = torch.randn(49, 64)
    visual["text.transformer.resblocks.0.attn.in_proj_weight"] = torch.randn(12, 4)
    visual["text.token_embedding.weight"] = torch.randn(10, 4)
    visual["logit_scale"] = torch.tensor(4.6)
    torch.save({"epoch": 3, "state_dict": visual}, path)
    return path


def to_hugging_face(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """timm names -> CLIP-style Hugging Face names, q/k/v always separate."""
    swiglu = _is_swiglu(sd)
    out: dict[str, torch.Tensor] = {}
    v = "vision_model."
    for key, value in sd.items():
        m = re.match(r"blocks\.(\d+)\.(.*)", key)
        if key == "cls_token":
            out[v + "embeddings.class_embedding"] = value.reshape(-1)
        elif key == "pos_embed":
            out[v + "embeddings.position_embedding.weight"] = value[0]
        elif key.startswith("patch_embed.proj."):
            out[v + "embeddings.patch_embedding." + key.split(".")[-1]] = value
        elif key.startswith("norm."):
            out[v + "post_layernorm." + key.split(".")[-1]] = value
        elif key.startswith("head."):
            out["visual_projection." + key.split(".")[-1]] = value
        elif m:
            layer = f"{v}encoder.layers.{m[1]}."
            rest = m[2]
            if rest == "attn.qkv.weight":
                for axis, part in zip("qkv", value.chunk(3), strict=True):
                    out[f"{layer}self_attn.{axis}_proj.weight"] = part
                continue
            if rest in ("attn.q_bias", "attn.v_bias"):
                out[f"{layer}self_attn.{rest[5]}_proj.bias"] = value
                continue
            rest = rest.replace("norm1.", "layer_norm1.").replace("norm2.", "layer_norm2.")
            rest = rest.replace("attn.proj.", "attn.out_proj.")
            rest = rest.replace("attn.norm.", "attn.inner_attn_ln.")
            rest = rest.replace("attn.", "self_attn.")
            if swiglu:
                for old, new in _EVA02_MLP:
                    rest = rest.replace(old, new)
            out[layer + rest] = value
    out["text_model.embeddings.token_embedding.weight"] = torch.randn(10, 4)
    out["text_projection.weight"] = torch.randn(4, 4)
    out["logit_scale"] = torch.tensor(4.6)
    return out


def write_hf_dir(model: Eva, root: Path, kind: str = "safetensors", shards: int = 3) -> Path:
    """A Hugging Face-format directory: config.json, an index and `shards` weight files."""
    root.mkdir(parents=True, exist_ok=True)
    sd = to_hugging_face({k: v.clone() for k, v in model.state_dict().items()})
    keys = sorted(sd)
    (root / "config.json").write_text(json.dumps({"model_type": "evaclip"}))
    ext = "safetensors" if kind == "safetensors" else "bin"
    stem = "model" if kind == "safetensors" else "pytorch_model"
    weight_map = {}
    for i in range(shards):
        name = f"{stem}-{i + 1:05d}-of-{shards:05d}.{ext}"
        part = {k: sd[k].contiguous() for k in keys[i::shards]}
        if kind == "safetensors":
            save_file(part, str(root / name))
        else:
            torch.save(part, root / name)
        weight_map.update({k: name for k in part})
    index = f"{stem}.{ext}.index.json"
    (root / index).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return root


_REMOTE_CONFIG = '''
from transformers import PretrainedConfig


class TinyEvaClipConfig(PretrainedConfig):
    model_type = "tiny_evaclip_remote_test"

    def __init__(self, shapes=None, **kwargs):
        super().__init__(**kwargs)
        self.shapes = shapes or {}
'''

_REMOTE_MODEL = '''
import torch
from torch import nn
from transformers import PreTrainedModel

from .configuration_tiny import TinyEvaClipConfig


class TinyEvaClipModel(PreTrainedModel):
    """Holds one parameter per name in config.shapes; files store them under `model.`."""

    config_class = TinyEvaClipConfig
    base_model_prefix = "model"

    def __init__(self, config):
        super().__init__(config)
        for name, shape in config.shapes.items():
            *path, leaf = name.split(".")
            module = self
            for part in path:
                if not hasattr(module, part):
                    module.add_module(part, nn.Module())
                module = getattr(module, part)
            module.register_parameter(leaf, nn.Parameter(torch.zeros(shape)))
        self.post_init()

    def _init_weights(self, module):
        pass
'''


def write_remote_code_dir(model: Eva, root: Path) -> Path:
    """A repo that loads only through its own code: tensors stored as `model.vision_model.*`."""
    root.mkdir(parents=True, exist_ok=True)
    sd = to_hugging_face({k: v.clone() for k, v in model.state_dict().items()})
    (root / "configuration_tiny.py").write_text(_REMOTE_CONFIG)
    (root / "modeling_tiny.py").write_text(_REMOTE_MODEL)
    (root / "config.json").write_text(json.dumps({
        "model_type": "tiny_evaclip_remote_test",
        "architectures": ["TinyEvaClipModel"],
        "auto_map": {"AutoConfig": "configuration_tiny.TinyEvaClipConfig",
                     "AutoModel": "modeling_tiny.TinyEvaClipModel"},
        "shapes": {k: list(v.shape) for k, v in sd.items()},
    }))
    save_file({"model." + k: v.contiguous() for k, v in sd.items()},
              str(root / "model.safetensors"), metadata={"format": "pt"})
    return root
