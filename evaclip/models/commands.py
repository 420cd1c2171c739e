"""`evaclip model list`, `evaclip model info PRESET` and `evaclip features`.

torch and timm are imported inside the handlers so that `evaclip --help` stays fast. The
model commands build towers on the meta device only: `model info eva-clip-18b` prints the
exact parameter count without allocating a single weight.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from evaclip.errors import UserError
from evaclip.models.presets import PRESETS, Preset

_PRECISIONS = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def human_count(n: int) -> str:
    """17630494720 -> '17.63 B', 304105152 -> '304.1 M'."""
    if n >= 1e9:
        return f"{n / 1e9:.2f} B"
    if n >= 1e6:
        return f"{n / 1e6:.1f} M"
    return f"{n / 1e3:.1f} K"


def _resolve(name: str) -> Preset:
    from evaclip.models.tower import resolve_preset

    return resolve_preset(name)


# --- model list / info --------------------------------------------------------------------


def _list(args: argparse.Namespace) -> int:
    from evaclip.models.tower import count_parameters

    rows = [("PRESET", "FAMILY", "IMAGE", "WIDTH x DEPTH", "PARAMS", "")]
    for name, p in PRESETS.items():
        rows.append((
            name, p.family, f"{p.image_size}px/{p.patch_size}", f"{p.width} x {p.depth}",
            human_count(count_parameters(p)), "test only" if p.test_only else "",
        ))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    return 0


def describe(preset: Preset, parameters: int) -> list[tuple[str, str]]:
    """The lines of `model info`: architecture facts and the exact parameter count."""
    p = preset
    norm = "RMSNorm (fp32 statistics)" if p.norm == "rmsnorm" else "LayerNorm"
    order = "post-norm: x + norm(f(x))" if p.post_norm else "pre-norm: x + f(norm(x))"
    attn = ("fused qkv" if p.fused_qkv else "separate q/k/v") + (
        ", q and v bias (k bias 0)" if p.qkv_bias else ", no bias"
    )
    if p.scale_attn_inner:
        attn += ", norm before output projection"
    mlp = f"{p.mlp_hidden} hidden, " + ("SwiGLU" if p.swiglu else "GELU")
    if p.scale_mlp:
        mlp += ", inner norm"
    rope = "none"
    if p.rope:
        rope = f"RoPE (reference grid {p.rope_ref_grid or p.image_size // p.patch_size})"
    return [
        ("preset", p.name),
        ("family", p.family),
        ("description", p.description),
        ("image", f"{p.image_size} px, patch {p.patch_size}, {p.tokens} tokens (CLS + patches)"),
        ("width", f"{p.width}, depth {p.depth}, heads {p.heads} x {p.head_dim}"),
        ("norm", f"{norm}, eps {p.norm_eps:g}"),
        ("blocks", order),
        ("attention", attn),
        ("mlp", mlp),
        ("position", "absolute" + (f" + {rope}" if p.rope else "")),
        ("pooling", "CLS token after the final norm"),
        ("projection", f"{p.width} -> {p.embed_dim}, " + ("bias" if p.head_bias else "no bias")),
        ("parameters", f"{parameters:,} ({human_count(parameters)})"),
        ("bf16 size", f"{parameters * 2 / 1e9:.2f} GB"),
    ]


def _info(args: argparse.Namespace) -> int:
    from evaclip.models.tower import count_parameters

    preset = _resolve(args.preset)
    lines = describe(preset, count_parameters(preset))
    width = max(len(k) for k, _ in lines)
    for key, value in lines:
        print(f"{key.ljust(width)}  {value}")
    return 0


# --- features ------------------------------------------------------------------------------


def list_images(root: Path) -> list[Path]:
    """Image files under `root`, sorted by their path relative to it."""
    from evaclip.models.preprocess import IMAGE_SUFFIXES

    if root.is_file():
        return [root]
    files = [p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def _local_images(uri: str, storage: Any) -> Path:
    from evaclip.storage import is_s3

    if not is_s3(uri):
        path = Path(uri).expanduser()
        if not path.exists():
            raise UserError(f"--images: {uri} does not exist; give a folder of images")
        return path
    return Path(storage.fetch_tree(uri, field="--images"))


def _load_tower(args: argparse.Namespace, storage: Any) -> Any:
    import torch

    from evaclip.models.checkpoints import load_weights
    from evaclip.models.tower import build_tower, init_random_weights

    dtype = getattr(torch, _PRECISIONS[args.precision])
    tower = build_tower(args.preset, device="meta", dtype=dtype)
    if args.weights == "random":
        init_random_weights(tower, seed=args.seed)
    else:
        load_weights(tower, args.weights, format=args.format, storage=storage, dtype=dtype,
                     trust_remote_code=args.trust_remote_code)
    return tower.to(dtype).to(args.device).eval()


def embed_images(tower: Any, files: list[Path], batch_size: int, device: str) -> Any:
    """Projected embeddings [len(files), embed_dim] (float32 numpy), logging rate and ETA."""
    import numpy as np
    import torch
    from PIL import Image

    from evaclip.models.preprocess import clip_transform

    transform = clip_transform(tower.preset)
    dtype = next(tower.parameters()).dtype
    out = np.empty((len(files), tower.embed_dim), dtype=np.float32)
    start = last = time.monotonic()
    for lo in range(0, len(files), batch_size):
        chunk = files[lo:lo + batch_size]
        batch = torch.stack([transform(_open(Image, f)) for f in chunk]).to(device, dtype)
        with torch.inference_mode():
            out[lo:lo + len(chunk)] = tower(batch).float().cpu().numpy()
        done = lo + len(chunk)
        now = time.monotonic()
        if now - last >= 10 or done == len(files):
            rate = done / max(now - start, 1e-9)
            eta = (len(files) - done) / rate
            print(f"Embedded {done}/{len(files)} images, {rate:.1f} images/s, "
                  f"ETA {eta:.0f} s.", file=sys.stderr, flush=True)
            last = now
    return out


def _open(image_module: Any, path: Path) -> Any:
    try:
        with image_module.open(path) as img:
            img.load()
            return img.convert("RGB") if img.mode != "RGB" else img.copy()
    except OSError as err:
        raise UserError(f"--images: cannot read {path} as an image ({err})") from None


def _save_npy(array: Any, out: str, storage: Any) -> None:
    """Write through a temporary file and a rename: never a half-written output."""
    import tempfile

    import numpy as np

    from evaclip.storage import is_s3

    if is_s3(out):
        with tempfile.TemporaryDirectory() as tmp_dir:
            local = Path(tmp_dir) / Path(out).name
            np.save(local, array)
            storage.upload_file(local, out, field="--out")
        return
    target = Path(out).expanduser()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".partial")
    with open(tmp, "wb") as f:
        np.save(f, array)
    tmp.replace(target)


def _features(args: argparse.Namespace) -> int:
    import torch

    from evaclip.storage import Storage

    if args.batch_size < 1:
        raise UserError(f"--batch-size: got {args.batch_size}; must be 1 or more")
    if not args.out.endswith(".npy"):
        raise UserError(f"--out: got {args.out!r}; must be a .npy file")
    _resolve(args.preset)
    if args.threads:
        torch.set_num_threads(args.threads)
    storage = Storage.from_env()
    files = list_images(_local_images(args.images, storage))
    if not files:
        raise UserError(f"--images: no image files under {args.images}")
    tower = _load_tower(args, storage)
    features = embed_images(tower, files, args.batch_size, args.device)
    _save_npy(features, args.out, storage)
    print(f"wrote {args.out}: {features.shape[0]} x {features.shape[1]} embeddings "
          f"(rows in sorted path order)")
    return 0


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add `model list`, `model info PRESET` and `features`."""
    model = sub.add_parser("model", help="list and describe the vision tower presets")
    msub = model.add_subparsers(dest="model_command", required=True, metavar="ACTION")
    p = msub.add_parser("list", help="every preset with family, size and parameters")
    p.set_defaults(func=_list)
    p = msub.add_parser("info", help="architecture and exact parameter count of a preset")
    p.add_argument("preset", help="preset name, see `evaclip model list`")
    p.set_defaults(func=_info)

    p = sub.add_parser(
        "features",
        help="write projected image embeddings of a folder of images to a .npy file",
        description="One row per image, in sorted path order; CLIP preprocessing.",
    )
    p.add_argument("--weights", required=True,
                   help="checkpoint URI or path, or 'random' for seeded random weights")
    p.add_argument("--preset", required=True, help="vision tower preset")
    p.add_argument("--images", required=True, help="folder (or s3:// prefix) of images")
    p.add_argument("--out", required=True, help="output .npy file (local or s3://)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--format", default="auto",
                   choices=("auto", "evaClip", "huggingFace", "safetensors"))
    p.add_argument("--precision", default="fp32", choices=tuple(_PRECISIONS))
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="allow a Hugging Face repo's own model code")
    p.add_argument("--seed", type=int, default=0, help="seed of --weights random")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    p.set_defaults(func=_features)

