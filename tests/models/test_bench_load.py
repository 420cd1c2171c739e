"""The checkpoint-loading benchmark runs and shows memory-mapped ranks sharing one copy.

The naive side (ranks x size) is measured by the benchmark itself; see docs/benchmarks.md.
"""

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
    results = bench.run(96, 2, tmp_path, modes=("mmap",))
    size = results["size_mb"]
    (mapped,) = results["modes"]
    assert 80 < size < 110
    # Both ranks hold every weight resident (their RSS grows by the whole file) ...
    assert all(rank["rss_growth"] > 0.9 * size for rank in mapped["ranks"])
    # ... yet the node holds it once: the ranks share the page cache's copy.
    assert mapped["node_total"] < 1.4 * size
    assert "mmap: node total" in bench.report(results)
