"""The checkpoint-loading benchmark runs and shows memory-mapped ranks sharing one copy."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench" / "load_checkpoint.py"


@pytest.mark.slow
def test_two_ranks_share_one_copy(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("load_checkpoint_bench", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    results = bench.run(96, 2, tmp_path)
    size = results["size_mb"]
    modes = {m["mode"]: m for m in results["modes"]}
    assert 80 < size < 110
    # Each naive rank holds its own copy; mapped ranks share the page cache's one.
    assert modes["naive"]["node_total"] > 1.8 * size
    assert modes["mmap"]["node_total"] < 1.4 * size
    assert "node total" in bench.report(results)
