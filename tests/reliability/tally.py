"""The reliability figures: what each fault or bad-input test saw, and the doc that states them.

Each reliability test calls `record(check, ...)` with what it measured (runs, survived,
lost data, leaks) *before* asserting on it, so the figures are the measured ones even when
a test fails. Tests elsewhere that already cover a fault (a rank killed mid-epoch in
tests/finetune, an operator restarted mid-create in tests/operator) are counted from their
pytest outcome (`EXTERNAL`). `tests/reliability/conftest.py` writes the session's tally to
`.cache/reliability/tally.json`; `test_zz_docs.py` checks that docs/reliability.md states
the same figures, so the doc cannot drift from the tests.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "reliability.md"
TALLY_FILE = ROOT / ".cache" / "reliability" / "tally.json"
FIGURES = ("runs", "survived", "lost", "leaks")

# Every row of the doc's figures table, in order: check id -> what is injected.
CHECKS: dict[str, str] = {
    "rank-sigkill-resume": "SIGKILL of one training rank mid-epoch, then the same command again",
    "s3-transient-storm-job": "503 SlowDown, 500 and connection resets on ~8% of S3 requests "
                              "during a full 2-process job",
    "s3-transient-storm-publish": "a storm on every third publish request; artifacts compared "
                                  "byte for byte with a calm publish",
    "s3-permanent-storm-publish": "every upload of the job's outputs answered 500 / reset",
    "bad-images": "truncated, zero-byte, decompression-bomb and non-image files in the data",
    "nonfinite-loss": "a learning rate that drives the loss to inf/NaN",
    "disk-full-cache": "the cache's file system refuses writes (RLIMIT_FSIZE) / reports too "
                       "little free space",
    "operator-restart": "the operator killed between creating the ConfigMap and the job",
    "api-errors": "the API server answering 409, 410 and 500",
    "bad-manifest-validate": "every bad manifest through `evaclip validate`",
    "bad-manifest-run": "every bad manifest through `evaclip run --local`",
    "bad-manifest-plan": "every bad manifest through `evaclip plan`",
    "bad-manifest-operator": "every bad manifest that is a resource, through the operator",
    "fuzz": "hypothesis-generated manifests and argument lists",
    "secrets-full-job": "known secret values in a full job: logs, status, config, artifacts",
    "secrets-operator": "known secret names/values: ConfigMap, job, events, status",
    "web-identity": "AWS_ROLE_ARN + AWS_WEB_IDENTITY_TOKEN_FILE and no keys, in every rank",
    "trust-policy": "remote code, trainer images, buckets outside the platform's allow-lists",
    "pod-security": "the rendered PyTorchJob's pod and container security contexts",
}

# Tests in other areas that cover a fault; counted as one run each from their outcome.
EXTERNAL: dict[str, str] = {
    "tests/finetune/test_runs.py::test_sigkill_of_a_rank_resumes_from_the_last_checkpoint":
        "rank-sigkill-resume",
    "tests/operator/test_lifecycle.py::test_deletion_and_restarts_create_no_duplicates":
        "operator-restart",
}

_RESULTS: dict[str, dict[str, Any]] = defaultdict(
    lambda: {"runs": 0, "survived": 0, "lost": 0, "leaks": 0, "detail": {}}
)


def record(check: str, *, runs: int = 1, survived: int, lost: int = 0, leaks: int = 0,
           **detail: Any) -> None:
    """Add what a test measured to the row `check` (figures add up over calls)."""
    if check not in CHECKS:
        raise KeyError(f"{check!r} is not a row of docs/reliability.md; add it to CHECKS")
    row = _RESULTS[check]
    row["runs"] += runs
    row["survived"] += survived
    row["lost"] += lost
    row["leaks"] += leaks
    for key, value in detail.items():
        if isinstance(value, int | float) and isinstance(row["detail"].get(key), int | float):
            row["detail"][key] += value
        else:
            row["detail"][key] = value


def results() -> dict[str, dict[str, Any]]:
    """The rows recorded so far in this session."""
    return {k: dict(v) for k, v in _RESULTS.items()}


def count_external(stats: dict[str, list[Any]]) -> None:
    """Count the EXTERNAL tests from pytest's terminal statistics (passed or failed)."""
    for outcome in ("passed", "failed"):
        for report in stats.get(outcome, []):
            nodeid = getattr(report, "nodeid", "")
            if getattr(report, "when", "call") != "call" or nodeid not in EXTERNAL:
                continue
            check = EXTERNAL[nodeid]
            if _RESULTS.get(check, {}).get("detail", {}).get(nodeid):
                continue
            record(check, survived=int(outcome == "passed"), **{nodeid: outcome})


def write(path: Path = TALLY_FILE) -> None:
    """Write the session's rows as JSON (machine-readable figures)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"checks": results()}, indent=1, sort_keys=True, default=str))


_ROW = re.compile(r"^\|\s*`([a-z0-9-]+)`\s*\|(.*)\|\s*$")


def doc_rows(text: str | None = None) -> dict[str, dict[str, int]]:
    """The figures table of docs/reliability.md: check id -> runs, survived, lost, leaks."""
    text = DOC.read_text() if text is None else text
    rows: dict[str, dict[str, int]] = {}
    for line in text.splitlines():
        match = _ROW.match(line)
        if not match:
            continue
        cells = [c.strip() for c in match.group(2).split("|")]
        numbers = cells[-len(FIGURES):]
        rows[match.group(1)] = {k: int(v) for k, v in zip(FIGURES, numbers, strict=True)}
    return rows
