"""Load EVA-CLIP weights into a tower exactly, without holding the tower twice in memory.

Three layouts are read, each with one remapping function onto the trunk's own names
(which are those of the original EVA-CLIP `visual.*` release):

- `evaClip`: the original `.pt`/`.bin` release (`remap_eva_clip`),
- `huggingFace`: a directory with `config.json` and CLIP-style names, one file or an index
  with shards, in safetensors or PyTorch pickles (`remap_hugging_face`),
- `safetensors`: one file in the tower's own layout (`trunk.*`, bare or `visual.*` names;
  `remap_tower`).

Tensors are memory-mapped (`safetensors.safe_open`, `torch.load(mmap=True)`) and handed
to `load_state_dict(assign=True)`, so a parameter *is* a view of the file's pages: ranks on
one node mapping the same file share one copy in the page cache, and a half-precision
checkpoint stays half precision unless `dtype` asks otherwise. The exception is a fused
q/k/v projection built from separate Hugging Face q/k/v tensors: the concatenation is a
new tensor (the tower then holds that block's copy once, the file's pages stay
reclaimable cache).

Loading is strict: missing, unexpected and mis-shaped tensors all fail with one
`UserError` naming the first few; nothing is ever partly loaded.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from evaclip.errors import UserError
from evaclip.models.presets import Preset
from evaclip.models.tower import EvaClipTower, init_buffers, match_buffer_dtype

log = logging.getLogger(__name__)

FORMATS = ("auto", "evaClip", "huggingFace", "safetensors")
StateDict = dict[str, torch.Tensor]

_WRAPPERS = ("state_dict", "model", "module", "model_ema")
# Tables that the tower computes itself (RoPE, position ids): present in some files.
_COMPUTED = re.compile(r"(^|\.)(rope\.freqs(_cos|_sin)?|position_ids)$")
_HF_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
_HF_SINGLE = ("model.safetensors", "pytorch_model.bin")


# --- reading files ----------------------------------------------------------------------


def read_safetensors(path: Path) -> StateDict:
    """Memory-map every tensor of a safetensors file (no copy of the data)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return {key: f.get_tensor(key) for key in f.keys()}
    except SafetensorError as err:
        raise UserError(
            f"model.weights: {path} is not a readable safetensors file ({err})"
        ) from None


def read_torch(path: Path) -> Any:
    """Memory-map a torch.save file, refusing anything but tensors and plain containers."""
    import pickle

    try:
        return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()[0]
        raise UserError(
            f"model.weights: {path} holds objects other than tensors and is refused for "
            f"safety ({first}); re-save it as a plain state dict or as safetensors"
        ) from None
    except RuntimeError as err:
        if "mmap" not in str(err) and "zip" not in str(err):
            raise
        raise UserError(
            f"model.weights: {path} is in the legacy torch.save format, which cannot be "
            "memory-mapped; re-save it with a current torch (zip format) or as safetensors"
        ) from None


def read_any(path: Path) -> Any:
    return read_safetensors(path) if path.suffix == ".safetensors" else read_torch(path)


def unwrap(obj: Any) -> StateDict:
    """The state dict inside a checkpoint that wraps it under state_dict/model/module/..."""
    for _ in range(4):
        if not isinstance(obj, Mapping):
            break
        if any(isinstance(v, torch.Tensor) for v in obj.values()):
            return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        inner = next((obj[w] for w in _WRAPPERS if isinstance(obj.get(w), Mapping)), None)
        if inner is None:
            break
        obj = inner
    raise UserError(
        "model.weights: no state dict of tensors found (looked at the top level and under "
        f"{', '.join(_WRAPPERS)})"
    )


# --- remapping, one function per layout ---------------------------------------------------


def _strip_prefix(sd: StateDict, prefixes: Iterable[str]) -> StateDict:
    """Keep the keys under the first prefix that the file uses, with the prefix removed."""
    for prefix in prefixes:
        if prefix and any(k.startswith(prefix) for k in sd):
            return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    return dict(sd)


_EVA_RENAMES = (
    ("mlp.ffn_ln.", "mlp.norm."),
    ("attn.inner_attn_ln.", "attn.norm."),
    ("mlp.w1.", "mlp.fc1_g."),
    ("mlp.w2.", "mlp.fc1_x."),
    ("mlp.w3.", "mlp.fc2."),
)


def _fuse_qkv(sd: StateDict, preset: Preset) -> StateDict:
    """Bring q/k/v onto the preset's attention layout (fused [3W, W] or separate)."""
    out: StateDict = {}
    pending: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in sd.items():
        m = re.match(r"(blocks\.\d+\.attn\.)([qkv])_proj\.(weight|bias)$", key)
        if m and preset.fused_qkv:
            pending.setdefault(m[1], {})[f"{m[2]}.{m[3]}"] = value
            continue
        m = re.match(r"(blocks\.\d+\.attn\.)([qv])_bias$", key)
        if m and not preset.fused_qkv:
            out[f"{m[1]}{m[2]}_proj.bias"] = value
            continue
        out[key] = value
    for prefix, parts in pending.items():
        names = ("q.weight", "k.weight", "v.weight")
        if all(n in parts for n in names):
            out[prefix + "qkv.weight"] = torch.cat([parts.pop(n) for n in names])
        for axis in "qv":
            if f"{axis}.bias" in parts:
                out[f"{prefix}{axis}_bias"] = parts.pop(f"{axis}.bias")
        out.update({f"{prefix}{n[0]}_proj.{n[2:]}": v for n, v in parts.items()})
    return _drop_zero_k_bias(out)


def _drop_zero_k_bias(sd: StateDict) -> StateDict:
    """EVA attention fixes the k bias at 0: a stored all-zero k bias is dropped, others kept
    so that the strict check reports them."""
    out: StateDict = {}
    for key, value in sd.items():
        is_k_bias = key.endswith("attn.k_proj.bias") or key.endswith("attn.k_bias")
        if is_k_bias and not value.is_meta and not bool(value.any()):
            continue
        out[key] = value
    return out


def remap_eva_clip(sd: StateDict, preset: Preset) -> StateDict:
    """Original EVA-CLIP release: `visual.*` vision keys (text tower and logit scale
    ignored), EVA02 sub-module names (`w1/w2/w3`, `ffn_ln`, `inner_attn_ln`) renamed to
    timm's, computed RoPE tables dropped."""
    sd = _strip_prefix(sd, ("visual.trunk.", "visual.", "trunk."))
    out: StateDict = {}
    for key, value in sd.items():
        if _COMPUTED.search(key):
            continue
        for old, new in _EVA_RENAMES:
            key = key.replace(old, new)
        out[key] = value
    return _fuse_qkv(out, preset)


def remap_tower(sd: StateDict, preset: Preset) -> StateDict:
    """The tower's own layout (`trunk.*`, as `save_weights` writes it, or bare trunk names);
    a file with `visual.*` names is read as the original release."""
    if any(k.startswith("visual.") for k in sd):
        return remap_eva_clip(sd, preset)
    return {k: v for k, v in _strip_prefix(sd, ("trunk.",)).items() if not _COMPUTED.search(k)}


_HF_RULES: tuple[tuple[str, str], ...] = (
    (r"embeddings\.patch_embedding\.", "patch_embed.proj."),
    (r"encoder\.layers\.(\d+)\.layer_norm1\.", r"blocks.\1.norm1."),
    (r"encoder\.layers\.(\d+)\.layer_norm2\.", r"blocks.\1.norm2."),
    (r"encoder\.layers\.(\d+)\.self_attn\.out_proj\.", r"blocks.\1.attn.proj."),
    (r"encoder\.layers\.(\d+)\.self_attn\.inner_attn_ln\.", r"blocks.\1.attn.norm."),
    (r"encoder\.layers\.(\d+)\.self_attn\.", r"blocks.\1.attn."),
    (r"encoder\.layers\.(\d+)\.mlp\.", r"blocks.\1.mlp."),
    (r"post_layernorm\.", "norm."),
)


def _hf_key(key: str) -> str:
    for pattern, repl in _HF_RULES:
        new = re.sub("^" + pattern, repl, key)
        if new != key:
            return new
    return key


def remap_hugging_face(sd: StateDict, preset: Preset) -> StateDict:
    """CLIP-style Hugging Face names: `vision_model.*` plus `visual_projection`; q/k/v are
    concatenated for fused presets; the text model is ignored."""
    out: StateDict = {}
    for key, value in sd.items():
        if key.startswith("visual_projection."):
            out["head." + key.removeprefix("visual_projection.")] = value
            continue
        if not key.startswith("vision_model.") or _COMPUTED.search(key):
            continue
        key = key.removeprefix("vision_model.")
        if key == "embeddings.class_embedding":
            out["cls_token"] = value.reshape(1, 1, -1)
        elif key == "embeddings.position_embedding.weight":
            out["pos_embed"] = value.unsqueeze(0)
        else:
            name = _hf_key(key)
            for old, new in _EVA_RENAMES:
                name = name.replace(old, new)
            out[name] = value
    return _fuse_qkv(out, preset)


REMAPS: dict[str, Callable[[StateDict, Preset], StateDict]] = {
    "evaClip": remap_eva_clip,
    "huggingFace": remap_hugging_face,
    "safetensors": remap_tower,
}


# --- locating and reading each format ----------------------------------------------------


def detect_format(path: Path) -> str:
    """The format of a local file or directory, from its name and contents."""
    if path.is_dir():
        return "huggingFace"
    if path.suffix == ".safetensors":
        return "safetensors"
    if path.suffix in (".pt", ".pth", ".bin", ".ckpt"):
        return "evaClip"
    raise UserError(
        f"model.format: cannot tell the format of {path.name}; set model.format to "
        "evaClip (.pt/.bin), safetensors or huggingFace (a directory)"
    )


def _hf_files(root: Path) -> list[Path]:
    """The weight files of a Hugging Face-format directory (index + shards or one file)."""
    for index_name in _HF_INDEXES:
        index = root / index_name
        if index.is_file():
            weight_map = json.loads(index.read_text()).get("weight_map") or {}
            shards = sorted(set(weight_map.values()))
            missing = [s for s in shards if not (root / s).is_file()]
            if missing:
                raise UserError(
                    f"model.weights: {index_name} lists {len(missing)} shard(s) that are not "
                    f"in {root}: {', '.join(missing[:3])}"
                )
            return [root / s for s in shards]
    for single in _HF_SINGLE:
        if (root / single).is_file():
            return [root / single]
    raise UserError(
        f"model.weights: {root} has none of {', '.join(_HF_INDEXES + _HF_SINGLE)}; "
        "a Hugging Face-format directory needs one of them"
    )


def _has_own_code(root: Path) -> bool:
    config = root / "config.json"
    return config.is_file() and bool(json.loads(config.read_text()).get("auto_map"))


def _read_hugging_face(root: Path, trust_remote_code: bool) -> tuple[StateDict, str]:
    """The tensors of a Hugging Face-format directory. A repo that ships its own model
    code (config.json `auto_map`) and whose files hold no tensors under names we know is
    loaded through that code, and only when `trust_remote_code` allows it."""
    if not root.is_dir():
        raise UserError(f"model.weights: format huggingFace needs a directory, got file {root}")
    sd: StateDict = {}
    try:
        for shard in _hf_files(root):
            sd.update(unwrap(read_any(shard)))
    except UserError:
        if not _has_own_code(root):
            raise
    known = any(k.startswith(("vision_model.", "visual.")) for k in sd)
    if not known and _has_own_code(root):
        if not trust_remote_code:
            raise UserError(
                f"model.weights: {root} loads only through its own model code (config.json "
                "auto_map, no vision_model.* tensors); set model.trustRemoteCode: true if "
                "you trust that code"
            )
        sd = _state_dict_via_remote_code(root)
    if any(k.startswith("visual.") for k in sd) and not any(
        k.startswith("vision_model.") for k in sd
    ):
        return sd, "evaClip"
    return sd, "huggingFace"


def _state_dict_via_remote_code(root: Path) -> StateDict:
    """Instantiate the repo's own model with transformers and take its tensors."""
    from transformers import AutoModel

    log.warning("Running the model code shipped in %s (trustRemoteCode is on).", root)
    model = AutoModel.from_pretrained(str(root), trust_remote_code=True, local_files_only=True)
    sd = model.state_dict()
    return _strip_prefix(sd, (f"{getattr(model, 'base_model_prefix', '')}.",))


def read_checkpoint(
    path: Path, fmt: str = "auto", trust_remote_code: bool = False
) -> tuple[StateDict, str]:
    """Memory-map the tensors at `path`; returns them with the layout to remap them from."""
    if not path.exists():
        raise UserError(f"model.weights: {path} does not exist")
    if fmt not in FORMATS:
        raise UserError(f"model.format: got {fmt!r}; allowed: {', '.join(FORMATS)}")
    fmt = detect_format(path) if fmt == "auto" else fmt
    if fmt == "huggingFace":
        return _read_hugging_face(path, trust_remote_code)
    if path.is_dir():
        raise UserError(f"model.weights: format {fmt} needs a file, got directory {path}")
    sd = unwrap(read_any(path))
    if fmt == "evaClip" and any(k.startswith("vision_model.") for k in sd):
        return sd, "huggingFace"
    return sd, fmt


# --- checking and assigning --------------------------------------------------------------


def _names(keys: list[str], limit: int = 5) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" (+{len(keys) - limit} more)" if len(keys) > limit else "")


def check_state_dict(sd: StateDict, expected: Mapping[str, torch.Tensor], preset: str) -> None:
    """Fail with one line naming missing, unexpected and mis-shaped tensors."""
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    wrong = sorted(
        f"{k} {tuple(sd[k].shape)} vs {tuple(expected[k].shape)}"
        for k in set(sd) & set(expected)
        if sd[k].shape != expected[k].shape
    )
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing: {_names(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected: {_names(unexpected)}")
    if wrong:
        problems.append(f"{len(wrong)} with wrong shape (file vs {preset}): {_names(wrong)}")
    if problems:
        raise UserError(
            f"model.weights: checkpoint does not match preset {preset}: " + "; ".join(problems)
        )


def _unify_dtype(sd: StateDict, dtype: torch.dtype | None) -> StateDict:
    """Cast to `dtype`, or, for a file that mixes float dtypes, to its dominant one."""
    floats = [v for v in sd.values() if v.is_floating_point()]
    if dtype is None:
        sizes: dict[torch.dtype, int] = {}
        for v in floats:
            sizes[v.dtype] = sizes.get(v.dtype, 0) + v.numel()
        if len(sizes) <= 1:
            return sd
        dtype = max(sizes, key=sizes.__getitem__)
        log.info("Checkpoint mixes %s; casting to %s.", sorted(map(str, sizes)), dtype)
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}


_FILE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".safetensors")


def _local(uri: str | Path, storage: Any, fmt: str) -> Path:
    """A local path for `uri`: local paths as they are; s3:// objects through the node cache
    of `storage` (one download per node, the other ranks wait for it and map the same
    files)."""
    from evaclip.storage import Storage, is_s3

    text = str(uri)
    if not is_s3(text):
        return Path(text.removeprefix("file://")).expanduser()
    storage = storage if storage is not None else Storage.from_env()
    one_file = fmt != "huggingFace" and text.endswith(_FILE_SUFFIXES)
    if one_file:
        return Path(storage.fetch(text, field="model.weights"))
    return Path(storage.fetch_tree(text, field="model.weights"))


def load_weights(
    tower: EvaClipTower,
    uri_or_path: str | Path,
    format: str = "auto",
    storage: Any = None,
    dtype: torch.dtype | None = None,
    trust_remote_code: bool = False,
) -> None:
    """Load a checkpoint into `tower` (meta or materialised), exactly and memory-mapped.

    `format` is one of FORMATS; `storage` (an `evaclip.storage.Storage`) fetches s3://
    URIs to the node's cache, shared by the node's ranks. `dtype` casts floating tensors
    (None keeps the file's precision). The tower ends up on the CPU.
    """
    path = _local(uri_or_path, storage, format)
    raw, layout = read_checkpoint(path, format, trust_remote_code)
    sd = _unify_dtype(REMAPS[layout](raw, tower.preset), dtype)
    check_state_dict(sd, tower.trunk.state_dict(keep_vars=True), tower.preset.name)
    init_buffers(tower, "cpu")
    tower.trunk.load_state_dict(sd, strict=True, assign=True)
    match_buffer_dtype(tower)
    log.info("Loaded %d tensors from %s (%s layout).", len(sd), path, layout)


def save_weights(tower: EvaClipTower, path: str | Path) -> Path:
    """Write the tower's tensors as one safetensors file in its own layout (`trunk.*`).

    The file is written beside the target and renamed into place, so a failed write
    leaves no half file.
    """
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    tensors = {k: v.detach().contiguous() for k, v in tower.state_dict().items()}
    save_file(tensors, str(tmp), metadata={"preset": tower.preset.name})
    tmp.replace(path)
    return path
