"""The memory planner: will a job fit its GPUs, and if not, what is the smallest change that does?

`plan(resource)` estimates, per GPU, the bytes of weights, gradients, optimizer states,
activations and DeepSpeed buffers for the manifest's method, precision, ZeRO stage,
offload, nodes x GPUs, batch size and activation checkpointing. Parameter counts come from
the preset's tower built on the meta device (no weights, a fraction of a second even for
eva-clip-18b) or, where torch cannot be imported (the operator's image), from the same
shapes committed in `evaclip/models/shapes.json`; LoRA adapters are counted from the rank
and the shapes of the target linears. When the estimate does not fit, candidate changes
(checkpointing, a higher ZeRO stage, a smaller batch, more nodes, offload, pod memory) are
re-planned one at a time, then in pairs, and the ones that fit are reported, the least
disruptive first.

The arithmetic, per parameter (N = GPUs in the job):

- a trained parameter costs its weight and gradient in the training precision (2 B each
  in bf16/fp16, 4 B in fp32) plus 12 B of AdamW state (fp32 master copy, two moments; in
  fp32 training the master copy is the weight itself, so 8 B); a frozen one only its
  weight. Mixed-precision AdamW is thus 16 B per trained parameter.
- ZeRO-1 and ZeRO-2 follow DeepSpeed's own estimator,
  `deepspeed.runtime.zero.stage_1_and_2.estimate_zero2_model_states_mem_needs`: the 16-bit
  weights (2 B) stay whole on every GPU, and 18 B per trained parameter are divided by N
  (16-bit gradients 2 B, the fp32 gradient partition 4 B, fp32 master weights 4 B, two
  moments 8 B). ZeRO-1 partitions no gradients, so its 16-bit gradients stay whole (2 B
  replicated, 16 B divided by N). In fp32 training there is no separate 16-bit copy: 4 B
  weights replicated, 4 B gradients and 8 B of moments.
- ZeRO-3 divides weights, gradients and optimizer states by N: 16 B per trained parameter
  (the arithmetic of the design notes), plus a working set of two gathered blocks. It does
  not count the transient fp32 gradient partition that DeepSpeed's ZeRO-3 estimator adds
  (2 B more per parameter over N). Optimizer offload moves the AdamW state (and, below
  ZeRO-3, the fp32 gradient partition) to host memory, parameter offload (ZeRO-3) the
  weights.
- Host memory per node is what offload puts there. When `resources.memory` is set the
  plan fits only if that stays under 90 % of it; when unset the need is printed.
- Activations kept for backward per image and block are about tokens x (9 x width + 2 x MLP
  hidden) values (4 x hidden for SwiGLU), assuming fused attention (no tokens^2 term).
  Only blocks from the first trained one upward keep them; checkpointing keeps one block
  input per block and recomputes one block at a time.
- A job fits when the total stays under 90 % of the GPU memory; the rest is left for the
  CUDA context, communication buffers and allocator fragmentation.

With `resources.gpusPerNode: 0` (CPU runs) the same figures are per process, planned for
one process (`evaclip plan --nproc N` plans N local processes, as `evaclip run --local
--nproc N` starts), and are checked against `resources.memory` (a pod's memory, shared by
its processes) when it is set; otherwise they are printed and not checked.

`spec.deepspeed.config` may not override what a spec field renders (ZeRO stage, offload
devices, precision, batch sizes, gradient clipping, optimizer, scheduler): such an override
is refused naming the field to set instead, so that the plan and the run agree.

This module sits in the core layer so that the trainer and the operator can both refuse a
plan that cannot fit; torch is imported only inside the functions that need it.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from evaclip.errors import UserError
from evaclip.spec import EvaClipFinetune, EvaClipFinetuneSpec

GIB = 1024**3
USABLE_FRACTION = 0.9
# Elements in DeepSpeed's default reduce and all-gather buckets (5e8 each).
_BUCKET_ELEMENTS = 500_000_000
_ASSUMED_CLASSES = 1000

_ATTN_SHORT = ("qkv", "proj", "q_proj", "k_proj", "v_proj")
_MLP_SHORT = ("fc1", "fc2", "fc1_g", "fc1_x")
_EMBEDDING = re.compile(r"(?:^|\.)(cls_token|reg_token|pos_embed|patch_embed|norm_pre)(?:\.|$)")
_BLOCK = re.compile(r"(?:^|\.)blocks\.(\d+)(?:\.|$)")

# --- which parameters each method trains ----------------------------------------------


def lora_target_regex(spec: EvaClipFinetuneSpec) -> str:
    """The regular expression (peft `target_modules`) of the LoRA target linears.

    Short names adapt that linear in every block (`qkv` is `...blocks.N.attn.qkv`, never
    `patch_embed.proj`); anything else is taken as a regular expression over full module
    names of the tower (`trunk.blocks.11.attn.qkv`).
    """
    lora = spec.method.lora
    attn = [t for t in lora.target_modules if t in _ATTN_SHORT]
    mlp = [t for t in lora.target_modules if t in _MLP_SHORT]
    custom = [t for t in lora.target_modules if t not in _ATTN_SHORT + _MLP_SHORT]
    if lora.include_mlp:
        mlp += [m for m in _MLP_SHORT if m not in mlp]
    parts = []
    if attn:
        parts.append(rf".*blocks\.\d+\.attn\.({'|'.join(attn)})")
    if mlp:
        parts.append(rf".*blocks\.\d+\.mlp\.({'|'.join(mlp)})")
    for pattern in custom:
        try:
            re.compile(pattern)
        except re.error as err:
            raise UserError(
                f"spec.method.lora.targetModules: {pattern!r} is not a short name "
                f"({', '.join(_ATTN_SHORT + _MLP_SHORT)}) nor a valid regular expression: {err}"
            ) from None
        parts.append(f"(?:{pattern})")
    return "|".join(f"(?:{p})" for p in parts)


def lora_targets(tower: Any, spec: EvaClipFinetuneSpec) -> list[tuple[str, Any]]:
    """The (name, nn.Linear) modules of `tower` that LoRA adapts; UserError if none.

    Names are relative to the `EvaClipTower`, e.g. `trunk.blocks.0.attn.qkv`.
    """
    from torch import nn

    regex = re.compile(lora_target_regex(spec))
    matched = [(n, m) for n, m in tower.named_modules() if n and regex.fullmatch(n)]
    check_lora_matches(spec, [n for n, _ in matched],
                       [n for n, m in matched if not isinstance(m, nn.Linear)])
    return matched


def check_lora_matches(spec: EvaClipFinetuneSpec, matched: list[str],
                       not_linear: list[str]) -> None:
    """Refuse LoRA targets that match no module, or a module that is not a linear layer."""
    targets = spec.method.lora.target_modules
    if not_linear:
        raise UserError(
            f"spec.method.lora.targetModules: {targets} also matches {not_linear[0]!r}, which "
            f"is not a linear layer; narrow it to linears such as 'trunk.blocks.0.attn.qkv'"
        )
    if not matched:
        raise UserError(
            f"spec.method.lora.targetModules: {targets} matches no linear layer of preset "
            f"{spec.model.preset}; use qkv, proj, q_proj, k_proj, v_proj, fc1, fc2 or a "
            "regular expression over names like 'trunk.blocks.0.attn.qkv'"
        )


def partial_trains(name: str, depth: int, trainable_blocks: int) -> bool:
    """Whether a tower parameter trains under method partial: the last K blocks and above."""
    match = _BLOCK.search(name)
    if match:
        return int(match.group(1)) >= depth - trainable_blocks
    return not _EMBEDDING.search(name)


# --- DeepSpeed overrides that would contradict the spec ------------------------------

# Paths in a DeepSpeed config that spec fields render, with the field to set instead.
_RENDERED_KEYS: tuple[tuple[tuple[str, ...], str], ...] = (
    (("train_micro_batch_size_per_gpu",), "spec.training.batchSize"),
    (("gradient_accumulation_steps",), "spec.training.gradientAccumulationSteps"),
    (("train_batch_size",),
     "spec.training.batchSize and spec.training.gradientAccumulationSteps"),
    (("gradient_clipping",), "spec.training.gradientClipping"),
    (("zero_optimization", "stage"), "spec.deepspeed.zeroStage"),
    (("zero_optimization", "offload_optimizer", "device"), "spec.deepspeed.offloadOptimizer"),
    (("zero_optimization", "offload_param", "device"), "spec.deepspeed.offloadParameters"),
    (("bf16", "enabled"), "spec.model.precision"),
    (("bfloat16", "enabled"), "spec.model.precision"),
    (("fp16", "enabled"), "spec.model.precision"),
    (("amp", "enabled"), "spec.model.precision"),
    (("optimizer",), "spec.training.learningRate, backboneLearningRate and weightDecay"),
    (("scheduler",), "spec.training.warmupFraction"),
)


def check_deepspeed_overrides(spec: EvaClipFinetuneSpec) -> None:
    """Refuse a `spec.deepspeed.config` key that a spec field renders.

    The planner, the `fp16`-on-CPU check and the recipe read the spec fields; an override
    of what they render would make DeepSpeed run something else than was planned and
    checked. Everything else (bucket sizes, offload pinning, profilers, ...) may be set.
    """
    config = spec.deepspeed.config
    for path, instead in _RENDERED_KEYS:
        node: Any = config
        for key in path[:-1]:
            node = node.get(key) if isinstance(node, dict) else None
        if isinstance(node, dict) and path[-1] in node:
            raise UserError(
                f"spec.deepspeed.config: {'.'.join(path)} is rendered from {instead}; "
                f"set that instead of overriding it here"
            )


# --- counting on the meta device -------------------------------------------------------


@dataclass(frozen=True)
class Counts:
    """Parameter counts of a job's model (tower plus classifier head)."""

    total: int
    trained: int
    largest_block: int
    # Blocks that keep activations for backward (from the first trained block upward).
    active_blocks: int
    # Parameters of the classifier head (part of total and trained), and its classes.
    head: int = 0
    classes: int = 0

    @property
    def frozen(self) -> int:
        return self.total - self.trained


_Shape = tuple[tuple[tuple[str, int], ...], tuple[tuple[str, int, int], ...]]

# Parameter and module shapes of every preset's tower, for planning where torch is absent
# (the operator's image). Regenerate with `python -m evaclip.plan --write-shapes` after a
# preset or the tower code changes; tests/plan checks that it matches the meta towers.
SHAPES_FILE = Path(__file__).resolve().parent / "models" / "shapes.json"
_SHAPES_FORMAT = 1
_BLOCK_INDEX = re.compile(r"(?:^|\.)blocks\.(\d+)(?=\.|$)")


def _meta_shape(preset: str) -> _Shape:
    """(name, numel) of every tower parameter; (name, in, out) of every module (0, 0 if
    it is not a linear), from the preset's tower on the meta device."""
    from torch import nn

    from evaclip.models import build_tower

    tower = build_tower(preset, device="meta")
    params = tuple((n, p.numel()) for n, p in tower.named_parameters())
    modules = tuple(
        (n, m.in_features, m.out_features) if isinstance(m, nn.Linear) else (n, 0, 0)
        for n, m in tower.named_modules()
        if n
    )
    return params, modules


def _compress(shape: _Shape, depth: int) -> dict[str, Any]:
    """One preset's shapes as templates of one block (`{i}` for the index) plus the rest.

    A template goes into `block` only when every block 0..depth-1 has it with the same
    numbers; anything else is listed whole under `other`, so expanding is always exact.
    """
    out: dict[str, Any] = {"depth": depth}
    for kind, rows in (("params", shape[0]), ("modules", shape[1])):
        groups: dict[str, dict[int, tuple[int, ...]]] = {}
        other: list[list[Any]] = []
        for name, *numbers in rows:
            match = _BLOCK_INDEX.search(name)
            if match is None:
                other.append([name, *numbers])
                continue
            template = name[:match.start(1)] + "{i}" + name[match.end(1):]
            groups.setdefault(template, {})[int(match.group(1))] = tuple(numbers)
        block: list[list[Any]] = []
        for template, by_index in groups.items():
            values = set(by_index.values())
            if sorted(by_index) == list(range(depth)) and len(values) == 1:
                block.append([template, *values.pop()])
            else:
                other += [[template.replace("{i}", str(i)), *v] for i, v in by_index.items()]
        out[kind] = {"block": block, "other": other}
    return out


def _expand(entry: dict[str, Any]) -> _Shape:
    """The inverse of `_compress`."""
    def rows(kind: str) -> list[tuple[Any, ...]]:
        part = entry[kind]
        found = [tuple(r) for r in part["other"]]
        for template, *numbers in part["block"]:
            found += [(template.replace("{i}", str(i)), *numbers) for i in range(entry["depth"])]
        return found

    return tuple(rows("params")), tuple(rows("modules"))  # type: ignore[return-value]


def shape_table() -> dict[str, Any]:
    """The shapes of every preset's tower, computed on the meta device (needs torch)."""
    from evaclip.models.presets import PRESETS

    if not _torch_importable():
        raise RuntimeError("the shape table is computed from meta towers, which need torch")
    return {
        "format": _SHAPES_FORMAT,
        "regenerate": "python -m evaclip.plan --write-shapes",
        "presets": {name: _compress(_tower_shape(name), p.depth)
                    for name, p in sorted(PRESETS.items())},
    }


def write_shapes(path: Path = SHAPES_FILE) -> Path:
    """Write `shape_table()` to `path` (the committed evaclip/models/shapes.json), one
    preset part per line so that a change shows as a short diff."""
    table = shape_table()
    lines = []
    for name, entry in table["presets"].items():
        parts = [f'   "{key}": {json.dumps(entry[key], sort_keys=True)}' for key in sorted(entry)]
        lines.append(f'  "{name}": {{\n' + ",\n".join(parts) + "\n  }")
    head = {k: v for k, v in table.items() if k != "presets"}
    text = ("{\n" + "".join(f" {json.dumps(k)}: {json.dumps(v)},\n" for k, v in head.items())
            + ' "presets": {\n' + ",\n".join(lines) + "\n }\n}\n")
    json.loads(text)  # written by hand above: make sure it is JSON
    path.write_text(text)
    return path


@lru_cache(maxsize=1)
def _shape_file() -> dict[str, Any]:
    table = json.loads(SHAPES_FILE.read_text())
    if table.get("format") != _SHAPES_FORMAT:
        raise RuntimeError(f"{SHAPES_FILE} has format {table.get('format')}, not "
                           f"{_SHAPES_FORMAT}; regenerate it")
    return table


def _torch_importable() -> bool:
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


@lru_cache(maxsize=64)
def _tower_shape(preset: str) -> _Shape:
    """(name, numel) of every tower parameter; (name, in, out) of every module (0, 0 if
    it is not a linear): from the meta tower with torch, from shapes.json without."""
    if _torch_importable():
        return _meta_shape(preset)
    entry = _shape_file()["presets"].get(preset)
    if entry is None:
        raise RuntimeError(f"{SHAPES_FILE} has no preset {preset!r} and torch is absent; "
                           "regenerate it with `python -m evaclip.plan --write-shapes`")
    return _expand(entry)


def count(spec: EvaClipFinetuneSpec) -> Counts:
    """Count total and trained parameters of `spec`'s job on the meta device."""
    from evaclip.models.presets import get_preset

    preset = get_preset(spec.model.preset)
    params, linears = _tower_shape(preset.name)
    classes = len(spec.data.class_names or []) or _ASSUMED_CLASSES
    head = preset.embed_dim * classes + classes
    per_block: dict[int, int] = {}
    for name, n in params:
        match = _BLOCK.search(name)
        if match:
            per_block[int(match.group(1))] = per_block.get(int(match.group(1)), 0) + n
    tower_total = sum(n for _, n in params)
    method = spec.method.type
    depth = preset.depth
    if method == "full":
        trained, active = tower_total, depth
    elif method == "partial":
        k = spec.method.partial.trainable_blocks
        trained = sum(n for name, n in params if partial_trains(name, depth, k))
        active = k
    elif method == "lora":
        regex = re.compile(lora_target_regex(spec))
        named = [(name, i, o) for name, i, o in linears if regex.fullmatch(name)]
        check_lora_matches(spec, [n for n, _, _ in named], [n for n, i, _ in named if not i])
        hits = [(i, o) for _, i, o in named]
        adapters = sum(spec.method.lora.rank * (i + o) for i, o in hits)
        tower_total += adapters
        trained, active = adapters, depth
    else:
        trained, active = 0, 0
    return Counts(
        total=tower_total + head,
        trained=trained + head,
        largest_block=max(per_block.values(), default=0),
        active_blocks=active,
        head=head,
        classes=classes,
    )


# --- the plan --------------------------------------------------------------------------


@dataclass
class Change:
    """A candidate change to the manifest and the plan it leads to."""

    description: str
    updates: dict[str, Any]
    plan: Plan


@dataclass
class Plan:
    """Per-device memory of one job; `fits` says whether it stays under the usable memory."""

    spec: EvaClipFinetuneSpec
    counts: Counts
    world_size: int
    weights: int
    gradients: int
    optimizer: int
    activations: int
    buffers: int
    host_per_node: int
    capacity: int | None
    device: str
    # resources.memory of a GPU job's pod (None: not set, or a CPU job, checked per process).
    host_capacity: int | None = None
    # Processes per node: GPUs per node, or the local processes of a CPU run.
    processes: int = 1
    advice: list[Change] = field(default_factory=list)

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.activations + self.buffers

    @property
    def usable(self) -> int | None:
        return None if self.capacity is None else int(self.capacity * USABLE_FRACTION)

    @property
    def checked(self) -> bool:
        return self.capacity is not None

    @property
    def host_usable(self) -> int | None:
        return None if self.host_capacity is None else int(self.host_capacity * USABLE_FRACTION)

    @property
    def host_fits(self) -> bool:
        return self.host_usable is None or self.host_per_node <= self.host_usable

    @property
    def fits(self) -> bool:
        return (self.usable is None or self.total <= self.usable) and self.host_fits

    def summary(self) -> str:
        """One line: the setting and its per-device total."""
        s = self.spec
        ckpt = ", checkpointing" if s.deepspeed.activation_checkpointing else ""
        off = []
        if s.deepspeed.offload_optimizer == "cpu":
            off.append("optimizer")
        if s.deepspeed.offload_parameters == "cpu":
            off.append("parameters")
        offload = f", offload {'+'.join(off)}" if off else ""
        return (
            f"ZeRO-{s.deepspeed.zero_stage}{offload}{ckpt}, {s.resources.nodes} x "
            f"{self.processes} {'GPUs' if self.device == 'GPU' else 'processes'}, batch "
            f"{s.training.batch_size}: {_gib(self.total)} per {self.device}"
        )

    def table(self) -> str:
        """The printable report: counts, a per-device table, the verdict and the advice."""
        s = self.spec
        c = self.counts
        zero = ("no DeepSpeed (frozen tower, cached features)" if s.method.type == "linearProbe"
                else f"ZeRO-{s.deepspeed.zero_stage}")
        if s.resources.gpus_per_node:
            layout = (f"{s.resources.nodes} node(s) x {s.resources.gpus_per_node} GPU(s) "
                      f"(world size {self.world_size})")
        else:
            layout = (f"CPU, {self.processes} local process(es) per node (world size "
                      f"{self.world_size}; `evaclip run --local --nproc N` sets it, plan it "
                      "with `evaclip plan --nproc N`)")
        lines = [
            f"Plan for {s.model.preset}, method {s.method.type}, {s.model.precision}, "
            f"{zero}, {layout}, batch {s.training.batch_size} per {self.device}",
            f"Parameters: {c.total / 1e9:.3f} B total, {c.trained / 1e9:.3f} B trained, "
            f"{c.frozen / 1e9:.3f} B frozen (tower {c.total - c.head:,}, head {c.head:,} for "
            f"{c.classes} {'classes' if s.data.class_names else 'assumed classes'})",
            "",
            f"{'per ' + self.device:<22}{'GiB':>10}{'GB':>10}",
        ]
        rows = [
            ("weights", self.weights),
            ("gradients", self.gradients),
            ("optimizer states", self.optimizer),
            ("activations", self.activations),
            ("DeepSpeed buffers", self.buffers),
            ("total", self.total),
        ]
        for label, value in rows:
            lines.append(f"{label:<22}{value / GIB:>10.2f}{value / 1e9:>10.2f}")
        if self.host_per_node:
            lines.append(f"{'host memory per node':<22}{self.host_per_node / GIB:>10.2f}"
                         f"{self.host_per_node / 1e9:>10.2f}")
        lines.append("")
        lines.append(self.verdict())
        gpu_only_fits = self.usable is not None and self.total <= self.usable
        if self.host_per_node and self.device == "GPU" and (self.host_fits or not gpu_only_fits):
            lines.append(self.host_verdict())
        if self.advice:
            first, *rest = self.advice
            lines.append(f"Smallest change that fits: {first.description} "
                         f"({_gib(first.plan.total)} per {self.device}).")
            for other in rest:
                lines.append(f"  or: {other.description} "
                             f"({_gib(other.plan.total)} per {self.device})")
        return "\n".join(lines) + "\n"

    def verdict(self) -> str:
        if not self.checked:
            return (f"Fits: not checked (no GPUs and no resources.memory); needs about "
                    f"{_gib(self.total)} per process.")
        word = "Fits" if self.fits else "Does not fit"
        if self.usable is not None and self.total <= self.usable and not self.host_fits:
            return (f"Does not fit: the GPUs would hold it ({_gib(self.total)} of "
                    f"{_gib(self.usable)} usable per GPU), but host memory does not: "
                    f"{_gib(self.host_per_node)} per node of {_gib(self.host_usable or 0)} "
                    f"usable ({int(USABLE_FRACTION * 100)}% of resources.memory "
                    f"{self.spec.resources.memory}).")
        return (f"{word}: {_gib(self.total)} of {_gib(self.usable or 0)} usable per "
                f"{self.device} ({int(USABLE_FRACTION * 100)}% of {_gib(self.capacity or 0)}).")

    def host_verdict(self) -> str:
        """One line on the host memory that offload needs per node."""
        if self.host_capacity is None:
            return (f"Host memory: needs about {_gib(self.host_per_node)} per node for "
                    "offloaded state, not checked (resources.memory is not set); give each "
                    f"pod at least {host_request(self.host_per_node)} of memory.")
        word = "fits" if self.host_fits else "does not fit"
        return (f"Host memory {word}: {_gib(self.host_per_node)} per node of "
                f"{_gib(self.host_usable or 0)} usable ({int(USABLE_FRACTION * 100)}% of "
                f"resources.memory {self.spec.resources.memory}).")


def _gib(value: int) -> str:
    return f"{value / GIB:.1f} GiB"


def host_request(host_bytes: int) -> str:
    """The smallest whole-GiB `resources.memory` whose usable share holds `host_bytes`."""
    return f"{math.ceil(host_bytes / USABLE_FRACTION / GIB)}Gi"


_QUANTITY = re.compile(r"^([0-9.]+)\s*(Ki|Mi|Gi|Ti|Pi|K|M|G|T|P|k)?$")
_FACTORS = {None: 1, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50,
            "k": 10**3, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15}


def parse_quantity(text: str) -> int:
    """A Kubernetes memory quantity ('200Gi', '64G', '1024Mi') in bytes."""
    match = _QUANTITY.match(text.strip())
    if not match:
        raise UserError(
            f"spec.resources.memory: got {text!r}; use a Kubernetes quantity such as 200Gi"
        )
    return int(float(match.group(1)) * _FACTORS[match.group(2)])


def _estimate(spec: EvaClipFinetuneSpec, processes: int = 1) -> Plan:
    """The plan of `spec` as it stands, without advice; `processes`: local processes of a
    CPU run (gpusPerNode 0), ignored on GPUs."""
    from evaclip.models.presets import get_preset

    check_deepspeed_overrides(spec)
    preset = get_preset(spec.model.preset)
    c = count(spec)
    ds = spec.deepspeed
    res = spec.resources
    on_gpu = res.gpus_per_node > 0
    per_node = res.gpus_per_node if on_gpu else max(1, processes)
    n = res.nodes * per_node
    p = 4 if spec.model.precision == "fp32" else 2
    stage = ds.zero_stage if spec.method.type != "linearProbe" else 0
    # Per trained parameter: AdamW moments (8 B) plus, in mixed precision, the fp32 master
    # copy (4 B); the fp32 gradient partition of ZeRO-1/2 (4 B) is counted with gradients.
    opt_bytes = 8 if p == 4 else 12
    fp32_grads = c.trained * 4 if p == 2 and stage in (1, 2) else 0

    weights = c.total * p
    gradients = c.trained * p
    optimizer = c.trained * opt_bytes
    host = 0
    if stage >= 1:
        optimizer //= n
        fp32_grads //= n
    if stage >= 2:
        gradients //= n
    if ds.offload_optimizer == "cpu" and stage >= 1:
        host += (optimizer + fp32_grads) * per_node
        optimizer = fp32_grads = 0
    gradients += fp32_grads
    if stage == 3:
        weights //= n
        if ds.offload_parameters == "cpu":
            host += weights * per_node
            weights = 0
    buffers = _buffers(stage, c, p)
    activations = _activations(spec, preset, c, p)
    capacity: int | None = int(res.gpu_memory_gib * GIB) if on_gpu else None
    host_capacity = parse_quantity(res.memory) if res.memory else None
    if not on_gpu and host_capacity is not None:
        capacity = (host_capacity - host) // per_node
        host_capacity = None  # host use is part of the per-process check
    return Plan(
        spec=spec, counts=c, world_size=n, weights=weights, gradients=gradients,
        optimizer=optimizer, activations=activations, buffers=buffers,
        host_per_node=host, capacity=capacity, device="GPU" if on_gpu else "process",
        host_capacity=host_capacity, processes=per_node,
    )


def _buffers(stage: int, c: Counts, p: int) -> int:
    """DeepSpeed's communication buckets, and ZeRO-3's gathered working set."""
    if c.trained == 0:
        return 0
    bucket = min(_BUCKET_ELEMENTS, c.trained) * p
    if stage == 3:
        return bucket + 2 * c.largest_block * p
    return 2 * bucket


def _activations(spec: EvaClipFinetuneSpec, preset: Any, c: Counts, p: int) -> int:
    """Bytes of activations for one micro-batch: kept for backward plus one block's work."""
    t, w, h = preset.tokens, preset.width, preset.mlp_hidden
    per_block = t * (9 * w + (4 if preset.swiglu else 2) * h) * p
    batch = spec.training.batch_size
    images = batch * 3 * preset.image_size**2 * 4
    if c.active_blocks == 0:
        return images + batch * per_block
    if spec.deepspeed.activation_checkpointing:
        kept = c.active_blocks * t * w * p + per_block
    else:
        kept = c.active_blocks * per_block
    return images + batch * kept


# --- advice: re-plan candidate changes -------------------------------------------------


def _variant(spec: EvaClipFinetuneSpec, updates: dict[str, Any]) -> EvaClipFinetuneSpec | None:
    """`spec` with dotted-path updates applied, or None if that is not a valid spec."""
    from pydantic import ValidationError

    data = spec.model_dump()
    for path, value in updates.items():
        node = data
        *parents, leaf = path.split(".")
        for part in parents:
            node = node[part]
        node[leaf] = value
    try:
        return EvaClipFinetuneSpec.model_validate(data)
    except ValidationError:
        return None


_MEMORY = "resources.memory"


def _candidate_families(spec: EvaClipFinetuneSpec,
                        base: Plan) -> list[list[tuple[str, dict[str, Any]]]]:
    """Changes grouped by kind, least disruptive kind first; within a kind, mildest first."""
    ds, t, r = spec.deepspeed, spec.training, spec.resources
    families: list[list[tuple[str, dict[str, Any]]]] = []
    if not ds.activation_checkpointing:
        families.append([("set deepspeed.activationCheckpointing: true",
                          {"deepspeed.activation_checkpointing": True})])
    families.append([
        (f"set deepspeed.zeroStage: {s}", {"deepspeed.zero_stage": s})
        for s in range(ds.zero_stage + 1, 4)
    ])
    batches, b = [], t.batch_size // 2
    while b >= 1:
        batches.append((f"set training.batchSize: {b} (raise gradientAccumulationSteps to "
                        "keep the global batch)", {"training.batch_size": b}))
        b //= 2
    families.append(batches)
    nodes = [r.nodes * k for k in (2, 3, 4, 6, 8, 12, 16, 24, 32) if r.nodes * k <= 1024]
    families.append([(f"set resources.nodes: {m}", {"resources.nodes": m}) for m in nodes])
    if ds.offload_optimizer != "cpu":
        families.append([("set deepspeed.offloadOptimizer: cpu",
                          {"deepspeed.offload_optimizer": "cpu"})])
    if ds.offload_parameters != "cpu":
        families.append([("set deepspeed.offloadParameters: cpu (with zeroStage 3)",
                          {"deepspeed.offload_parameters": "cpu", "deepspeed.zero_stage": 3})])
    if not base.host_fits:
        # The value is what the plan with the other changes needs (see _resolve_memory).
        families.append([("set resources.memory", {_MEMORY: None})])
    return [f for f in families if f]


def _resolve_memory(spec: EvaClipFinetuneSpec, description: str, updates: dict[str, Any],
                    processes: int) -> tuple[str, dict[str, Any]] | None:
    """Fill in a `resources.memory` change with the host memory the changed plan needs."""
    if _MEMORY not in updates or updates[_MEMORY] is not None:
        return description, updates
    others = {k: v for k, v in updates.items() if k != _MEMORY}
    trial = _variant(spec, {**others, _MEMORY: None})
    if trial is None:
        return None
    memory = host_request(_estimate(trial, processes).host_per_node)
    return (description.replace("set resources.memory", f"set resources.memory: {memory}"),
            {**others, _MEMORY: memory})


def _first_fit(spec: EvaClipFinetuneSpec, family: list[tuple[str, dict[str, Any]]],
               base: tuple[str, dict[str, Any]] | None = None,
               processes: int = 1) -> Change | None:
    for description, updates in family:
        if base is not None:
            description = f"{base[0]} and {description}"
            updates = {**base[1], **updates}
        resolved = _resolve_memory(spec, description, updates, processes)
        if resolved is None:
            continue
        description, updates = resolved
        variant = _variant(spec, updates)
        if variant is None:
            continue
        planned = _estimate(variant, processes)
        if planned.fits:
            return Change(description, updates, planned)
    return None


def advise(spec: EvaClipFinetuneSpec, processes: int = 1) -> list[Change]:
    """Changes that make `spec` fit, one per kind of change, the least disruptive first.

    For each kind (checkpointing, ZeRO stage, batch size, nodes, offload, pod memory) the
    mildest setting that fits alone is taken; when none does, the mildest one that fits
    together with a change of another kind. Changes that fit alone come before pairs; a
    pair found from both of its kinds is listed once.
    """
    families = _candidate_families(spec, _estimate(spec, processes))
    singles: list[Change] = []
    pairs: list[Change] = []
    for i, family in enumerate(families):
        alone = _first_fit(spec, family, processes=processes)
        if alone is not None:
            singles.append(alone)
            continue
        for other in families[:i] + families[i + 1:]:
            paired = next(
                (ch for base in family
                 if (ch := _first_fit(spec, other, base, processes)) is not None),
                None,
            )
            if paired is not None:
                pairs.append(paired)
                break
    unique: list[Change] = []
    seen: list[frozenset[tuple[str, str]]] = []
    for change in singles + pairs:
        key = frozenset((k, repr(v)) for k, v in change.updates.items())
        # The same set of changes, or a pair that adds to a change that fits alone.
        if not any(key >= other for other in seen):
            seen.append(key)
            unique.append(change)
    return unique


def plan_spec(spec: EvaClipFinetuneSpec, processes: int = 1) -> Plan:
    """The plan of a job spec, with advice when it does not fit. `processes`: the local
    processes of a CPU run (`--nproc`); GPU jobs take theirs from the spec."""
    result = _estimate(spec, processes)
    if not result.fits:
        result.advice = advise(spec, processes)
    return result


def plan(resource: EvaClipFinetune, processes: int = 1) -> Plan:
    """The plan of a whole EvaClipFinetune resource."""
    return plan_spec(resource.spec, processes)


def require_fit(resource: EvaClipFinetune | EvaClipFinetuneSpec, processes: int = 1) -> Plan:
    """Return the plan, or raise UserError with the verdict and the smallest fitting change."""
    spec = resource.spec if isinstance(resource, EvaClipFinetune) else resource
    result = plan_spec(spec, processes)
    if result.fits:
        return result
    if result.usable is None or result.total <= result.usable:
        hint = (f"smallest change that fits: {result.advice[0].description}" if result.advice
                else f"set resources.memory to at least {host_request(result.host_per_node)}")
        raise UserError(
            f"spec.resources.memory: the job's offloaded state needs {_gib(result.host_per_node)}"
            f" of host memory per node but {_gib(result.host_usable or 0)} of "
            f"{result.spec.resources.memory} is usable; {hint}; see `evaclip plan`"
        )
    if result.advice:
        hint = f"smallest change that fits: {result.advice[0].description}"
    else:
        more = "use GPUs with more memory" if result.device == "GPU" else \
            "raise resources.memory or use fewer processes"
        hint = "no single or paired change of ZeRO stage, offload, nodes, batch size or " \
               f"checkpointing fits; {more}"
    where = "gpuMemoryGib" if result.device == "GPU" else "memory"
    raise UserError(
        f"spec.resources.{where}: the job needs {_gib(result.total)} per "
        f"{result.device} but {_gib(result.usable or 0)} is usable ({result.summary()}); "
        f"{hint}; see `evaclip plan`"
    )


# --- command line ----------------------------------------------------------------------


def _plan_command(args: argparse.Namespace) -> int:
    from evaclip.manifest import load_manifest

    if args.nproc < 1:
        raise UserError(f"--nproc: got {args.nproc}; use 1 or more local processes")
    result = plan(load_manifest(args.manifest), processes=args.nproc)
    print(result.table(), end="")
    return 0 if result.fits else 1


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add `evaclip plan MANIFEST`."""
    p = sub.add_parser(
        "plan",
        help="print per-GPU memory of a manifest's job and whether it fits",
        description="Estimate per-GPU bytes of weights, gradients, optimizer states and "
        "activations; exit 0 when the job fits, 1 with the smallest fitting change when not.",
    )
    p.add_argument("manifest", help="EvaClipFinetune manifest file")
    p.add_argument("--nproc", type=int, default=1, metavar="N",
                   help="CPU jobs (gpusPerNode 0): plan N local processes, as "
                   "`evaclip run --local --nproc N` starts (default 1)")
    p.set_defaults(func=_plan_command)


if __name__ == "__main__":  # python -m evaclip.plan --write-shapes
    if sys.argv[1:] != ["--write-shapes"]:
        sys.exit("usage: python -m evaclip.plan --write-shapes")
    print(f"Wrote {write_shapes()}.")
