"""Host memory and time of loading one checkpoint into several ranks of one node.

Writes a synthetic fp16 checkpoint of an EVA-CLIP-18B-structured tower sized to about
--size-mb, then starts --ranks processes twice:

- mmap: `build_tower(meta)` + `load_weights` (memory-mapped safetensors, assign=True),
- naive: a materialised tower + `torch.load` without mmap + `load_state_dict` (copy),

and reads every weight once in each rank (as a first forward would); build, load and
first-read times are reported apart. While all ranks of
a mode are alive and loaded, each one's RSS, USS and PSS are read with psutil. The node
total is the sum of the ranks' PSS growth over their baseline after imports (PSS splits
a shared page between the processes mapping it, so the sum counts the shared page-cache
copy of the file once); the baseline (Python, torch, timm) is printed apart. The page
cache is warm (the file was just written), so load times exclude disk reads.

    .venv/bin/python bench/load_checkpoint.py --size-mb 1024 --ranks 2
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

MB = 1e6


def bench_preset(size_mb: float) -> Any:
    """An EVA-CLIP-18B-structured preset whose fp16 weights take about `size_mb`."""
    from evaclip.models.presets import get_preset

    width = 1536 if size_mb >= 512 else 512
    per_block = 12 * width * width  # qkv 3, proj 1, fc1 4, fc2 4 (x width^2)
    depth = max(1, round(size_mb * MB / 2 / per_block))
    return dataclasses.replace(
        get_preset("eva-clip-18b-tiny"), name=f"bench-{width}x{depth}", image_size=224,
        width=width, depth=depth, heads=width // 128, mlp_hidden=4 * width, embed_dim=1024,
    )


def _memory(pid: int) -> dict[str, float]:
    import psutil

    info = psutil.Process(pid).memory_full_info()
    return {"rss": info.rss / MB, "uss": info.uss / MB, "pss": info.pss / MB}


def _read_all(tower: Any) -> float:
    """Touch every weight (what a first forward does); returns a checksum."""
    import torch

    total = 0.0
    with torch.no_grad():
        for p in tower.parameters():
            total += float(p.sum(dtype=torch.float32))
    return total


def worker(mode: str, path: str, size_mb: float) -> None:
    """One rank: report baseline, load, read every weight, report, wait to be released."""
    import torch

    from evaclip.models import build_tower, load_weights

    torch.set_num_threads(1)
    preset = bench_preset(size_mb)
    print(json.dumps({"stage": "baseline", **_memory(os.getpid())}), flush=True)
    start = time.perf_counter()
    # The naive way materialises (and randomly initialises) the tower before loading.
    tower = build_tower(preset, device="meta" if mode == "mmap" else "cpu", dtype=torch.float16)
    built = time.perf_counter()
    if mode == "mmap":
        load_weights(tower, path)
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
        tower.trunk.load_state_dict(state)
        del state
    loaded = time.perf_counter()
    _read_all(tower)
    ready = time.perf_counter()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3  # KiB -> MB
    print(json.dumps({"stage": "loaded", "build_s": built - start, "load_s": loaded - built,
                      "read_s": ready - loaded, "peak_rss": peak}), flush=True)
    sys.stdin.readline()  # stay alive (and mapped) until the parent has measured


def write_checkpoints(size_mb: float, root: Path) -> tuple[Path, Path, int]:
    """The same random fp16 weights as safetensors (tower layout) and as a torch .pt."""
    import torch

    from evaclip.models import build_tower, save_weights

    tower = build_tower(bench_preset(size_mb), device="cpu", dtype=torch.float16)
    st = save_weights(tower, root / "tower.safetensors")
    pt = root / "tower.pt"
    torch.save({k: v.contiguous() for k, v in tower.trunk.state_dict().items()}, pt)
    return st, pt, st.stat().st_size


def run_mode(mode: str, path: Path, size_mb: float, ranks: int) -> dict[str, Any]:
    """Start `ranks` workers of `mode` at once; measure them while all hold the weights."""
    cmd = [sys.executable, __file__, "--worker", mode, "--path", str(path),
           "--size-mb", str(size_mb)]
    procs = [subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
             for _ in range(ranks)]
    try:
        reports = []
        for proc in procs:
            base = json.loads(proc.stdout.readline())
            done = json.loads(proc.stdout.readline())
            reports.append((proc, base, done))
        rows = []
        for proc, base, done in reports:
            now = _memory(proc.pid)
            rows.append({**done, **now, "pss_growth": now["pss"] - base["pss"],
                         "rss_growth": now["rss"] - base["rss"], "baseline_pss": base["pss"]})
    finally:
        for proc in procs:
            if proc.stdin:
                proc.stdin.write("\n")
                proc.stdin.close()
            proc.wait(timeout=120)
    return {"mode": mode, "ranks": rows,
            "node_total": sum(r["pss_growth"] for r in rows),
            "baseline": sum(r["baseline_pss"] for r in rows)}


def run(
    size_mb: float, ranks: int, workdir: Path, modes: tuple[str, ...] = ("mmap", "naive")
) -> dict[str, Any]:
    st, pt, size = write_checkpoints(size_mb, workdir)
    results = {"size_mb": size / MB, "ranks": ranks, "modes": []}
    for mode in modes:
        path = st if mode == "mmap" else pt
        results["modes"].append(run_mode(mode, path, size_mb, ranks))
    return results


def report(results: dict[str, Any]) -> str:
    size = results["size_mb"]
    lines = [f"checkpoint {size:.0f} MB fp16, {results['ranks']} ranks on one node "
             "(page cache warm)"]
    head = (f"{'mode':6} {'rank':>4} {'build s':>8} {'load s':>7} {'read s':>7} "
            f"{'peak RSS':>9} {'RSS':>7} {'USS':>7} {'PSS':>7} {'PSS growth':>11}")
    lines.append(head)
    for m in results["modes"]:
        for i, r in enumerate(m["ranks"]):
            lines.append(
                f"{m['mode']:6} {i:>4} {r['build_s']:>8.2f} {r['load_s']:>7.2f} "
                f"{r['read_s']:>7.2f} "
                f"{r['peak_rss']:>7.0f}MB {r['rss']:>5.0f}MB {r['uss']:>5.0f}MB "
                f"{r['pss']:>5.0f}MB {r['pss_growth']:>9.0f}MB"
            )
    for m in results["modes"]:
        lines.append(
            f"{m['mode']}: node total {m['node_total']:.0f} MB = "
            f"{m['node_total'] / size:.2f}x the checkpoint (plus {m['baseline']:.0f} MB of "
            "interpreter and libraries before loading)"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=float, default=1024)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--dir", help="where to write the checkpoints (default: a temp dir)")
    parser.add_argument("--json", action="store_true", help="print the raw numbers as JSON")
    parser.add_argument("--worker", choices=("mmap", "naive"), help=argparse.SUPPRESS)
    parser.add_argument("--path", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.path, args.size_mb)
        return
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        results = run(args.size_mb, args.ranks, Path(tmp))
    print(json.dumps(results, indent=2) if args.json else report(results))


if __name__ == "__main__":
    main()
