"""How fast the operator turns a burst of EvaClipFinetunes into PyTorchJobs, and its memory.

    .venv/bin/python bench/operator_scale.py            # 500 resources
    .venv/bin/python bench/operator_scale.py --count 100 --plan-check on

It starts the API server emulator of the operator tests (kmock, on 127.0.0.1) in this
process and `evaclip operator --all-namespaces` as a subprocess against it, exactly as
the tests do, then creates all resources at once (concurrent POSTs). For each resource
it measures the time from the server receiving its create to the server receiving the
create of its PyTorchJob (both stamped by the emulator on one clock), and samples the
operator's resident memory every 50 ms.

Prints p50 / p95 / max of that latency, the time until the last job existed, and the
operator's peak RSS, with the targets (p95 <= 1 s, RSS <= 200 MB). The emulator runs on
the same CPUs as the operator, so the figures are an upper bound for one machine.

`--plan-check off` (the default) leaves the memory planner out: in this virtual
environment it would import torch and timm (about 800 MB), which the operator image does
not have (there it reads the committed tower shapes instead).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

import kmock
import psutil
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "operator"))

from ecf_harness import (  # noqa: E402
    OUR_CRD,
    PYTORCHJOBS,
    ApiServerEmulator,
    Cluster,
    declare,
    manifest,
)

P95_TARGET_S = 1.0
RSS_TARGET_MB = 200.0


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


async def sample_rss(pid: int, peak: list[float], stop: asyncio.Event) -> None:
    proc = psutil.Process(pid)
    while not stop.is_set():
        try:
            peak[0] = max(peak[0], proc.memory_info().rss / 2**20)
        except psutil.NoSuchProcess:
            return
        await asyncio.sleep(0.05)


def create_times(emulator: ApiServerEmulator, resource: str) -> dict[str, float]:
    """Name -> server time of the first create request of that resource's objects."""
    out: dict[str, float] = {}
    for r in emulator.requests:
        if r.action == kmock.action.CREATE and r.resource == resource and isinstance(
            r.data, dict
        ):
            name = r.data.get("metadata", {}).get("name")
            if name and name not in out:
                out[name] = emulator.time_of(r)
    return out


async def run(count: int, plan_check: str, workdir: Path, timeout: float) -> int:
    emulator = ApiServerEmulator()
    declare(emulator)
    async with emulator, kmock.Server(emulator) as server:
        cluster = Cluster(emulator, server, workdir)
        await cluster.create(yaml.safe_load(OUR_CRD.read_text()))
        op = await cluster.start_operator(
            EVACLIP_PLAN_CHECK=plan_check, EVACLIP_LAUNCHER_RETRY_SECONDS="60"
        )
        peak = [0.0]
        stop = asyncio.Event()
        sampler = asyncio.create_task(sample_rss(op.proc.pid, peak, stop))
        idle_rss = psutil.Process(op.proc.pid).memory_info().rss / 2**20
        print(f"Operator ready, {idle_rss:.0f} MB resident; creating {count} resources at once.")
        names = [f"scale-{i:04d}" for i in range(count)]
        started = time.monotonic()
        await asyncio.gather(*(cluster.create(manifest(n)) for n in names))
        posted = time.monotonic() - started
        print(f"All {count} creates answered in {posted:.2f} s; waiting for their jobs.")

        def jobs_done() -> bool:
            return len(create_times(emulator, PYTORCHJOBS)) >= count

        last = time.monotonic()
        while not jobs_done():
            if time.monotonic() - started > timeout:
                print(f"Timed out after {timeout:.0f} s with "
                      f"{len(create_times(emulator, PYTORCHJOBS))}/{count} jobs.")
                break
            if time.monotonic() - last > 5:
                done = len(create_times(emulator, PYTORCHJOBS))
                rate = done / (time.monotonic() - started)
                print(f"{done}/{count} jobs, {rate:.0f}/s, "
                      f"ETA {(count - done) / rate if rate else float('inf'):.0f} s.")
                last = time.monotonic()
            await asyncio.sleep(0.05)
        await asyncio.sleep(1.0)  # let status writes land; they count towards the peak
        stop.set()
        await sampler
        op_cpu = sum(psutil.Process(op.proc.pid).cpu_times()[:2])
        own_cpu = sum(psutil.Process().cpu_times()[:2])
        await op.stop()

    submitted = create_times(emulator, "training.evaclip.io/v1alpha1/evaclipfinetunes")
    jobs = create_times(emulator, PYTORCHJOBS)
    latencies = [jobs[n] - submitted[n] for n in names if n in jobs and n in submitted]
    if not latencies:
        print("No job was created; see the operator log above.")
        print(op.output()[-3000:])
        return 1
    p50, p95 = percentile(latencies, 50), percentile(latencies, 95)
    span = max(jobs.values()) - min(submitted.values())
    print(f"Create -> PyTorchJob over {len(latencies)} resources: p50 {p50:.3f} s, "
          f"p95 {p95:.3f} s, max {max(latencies):.3f} s, mean {statistics.mean(latencies):.3f} s "
          f"(target p95 <= {P95_TARGET_S:g} s).")
    print(f"Last job created {span:.2f} s after the first resource "
          f"({len(latencies) / span:.0f} jobs/s).")
    print(f"CPU time: operator {op_cpu:.1f} s, emulator and client {own_cpu:.1f} s "
          f"({len(emulator.requests)} API requests served).")
    print(f"Operator peak RSS {peak[0]:.0f} MB (idle {idle_rss:.0f} MB; "
          f"target <= {RSS_TARGET_MB:g} MB).")
    ok = len(latencies) == count and p95 <= P95_TARGET_S and peak[0] <= RSS_TARGET_MB
    print("Targets met." if ok else "Targets missed.")
    return 0 if ok else 2


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=500, help="resources created at once")
    parser.add_argument("--plan-check", choices=["off", "on", "auto"], default="off",
                        help="EVACLIP_PLAN_CHECK of the operator (off: as in its image)")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds to wait")
    parser.add_argument("--workdir", type=Path, default=Path(".cache/bench-operator"))
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    return asyncio.run(run(args.count, args.plan_check, args.workdir, args.timeout))


if __name__ == "__main__":
    sys.exit(main())
