"""Progress of a training job: log lines with rate and ETA, and status updates.

A `Reporter` keeps one progress record (stage, epoch, step, percent, images per second,
ETA and the latest metrics, shaped like `evaclip.spec.Progress` and `Metrics`) and
pushes it to its sinks. A sink is any callable taking the report dict
(`{"progress": {...}, "metrics": {...}}`, camelCase keys as in the resource status):

    reporter = Reporter(sinks=[log_sink, k8s_status_sink])

Pushes are throttled to at most one per `min_interval` seconds (10 s by default) so a
status subresource is not patched on every step; `close()` always pushes the final
record. Only the primary rank reports: on other ranks the reporter is silent.

A long loop is tracked with `begin(stage, total)` and `advance(n)`; the rate is measured
since `begin` and the ETA is the remaining work divided by that rate. Each stage covers a
span of the whole run's percent (for example features 0-90 %, training 90-99 %), so the
percent shown by `kubectl get` only grows.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from evaclip.spec import Metrics, Progress

log = logging.getLogger("evaclip.trainer")

Report = dict[str, dict[str, Any]]
Sink = Callable[[Report], None]


def format_duration(seconds: float | None) -> str:
    """A short human duration: '42 s', '3 min 05 s', '2 h 07 min'."""
    if seconds is None:
        return "unknown"
    s = max(0, int(round(seconds)))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {(s % 3600) // 60:02d} min"


def describe(report: Report) -> str:
    """One log sentence for a report, e.g. 'Features: 512/1797 images (28%), ...'."""
    p = report["progress"]
    stage = (p.get("stage") or "run").capitalize()
    unit = report.get("unit", {}).get("name", "steps")
    parts = []
    if p.get("epochs"):
        parts.append(f"epoch {p.get('epoch', 0)}/{p['epochs']}")
    if unit is not None and (unit != "epochs" or not p.get("epochs")):  # None: no loop
        parts.append(f"{p.get('step', 0)}/{p.get('totalSteps', 0)} {unit}")
    head = f"{stage}: {', '.join(parts)}" if parts else stage
    text = f"{head} ({p.get('percentText') or '0%'} of the run)"
    rate = report.get("unit", {}).get("value")
    if rate is not None:
        text += f", {rate:.1f} {unit}/s"
    if p.get("etaSeconds") is not None:
        text += f", ETA {format_duration(p['etaSeconds'])}"
    m = report.get("metrics") or {}
    if m.get("trainLoss") is not None:
        text += f", loss {m['trainLoss']:.4f}"
    if m.get("valTop1") is not None:
        text += f", val top-1 {m['valTop1']:.3f}"
    return text + "."


def log_sink(report: Report) -> None:
    """The default sink: one log line per pushed report."""
    log.info(describe(report))


class Reporter:
    """Tracks progress on the primary rank and pushes throttled reports to sinks."""

    def __init__(
        self,
        sinks: list[Sink] | None = None,
        *,
        is_primary: bool = True,
        min_interval: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.sinks: list[Sink] = list(sinks if sinks is not None else [log_sink])
        self.is_primary = is_primary
        self.min_interval = min_interval
        self.clock = clock
        self.progress: dict[str, Any] = {"stage": None, "epoch": 0, "epochs": 0, "step": 0,
                                         "total_steps": 0, "percent": 0.0}
        self.metrics: dict[str, float | None] = {}
        self._span = (0.0, 100.0)
        self._unit: str | None = "images"
        self._closed = False
        self._rate: float | None = None
        self._started = self.clock()
        self._last_push: float | None = None
        self.pushes = 0

    # --- stages and loops ---------------------------------------------------------------

    def begin(self, stage: str, total: int, *, unit: str = "images",
              span: tuple[float, float] | None = None, epochs: int = 0) -> None:
        """Start a loop of `total` units (images, steps) for `stage`; a negative total (a
        run resumed past its end) counts as none."""
        self.progress.update(stage=stage, step=0, total_steps=max(0, int(total)), epochs=epochs,
                             epoch=0, images_per_second=None, eta_seconds=None)
        if span is not None:
            self._span = span
        self._unit = unit
        self._rate = None
        self._started = self.clock()
        self._set_percent(0)

    def advance(self, n: int = 1, *, epoch: int | None = None, **metrics: float) -> None:
        """Record `n` more units done (and the latest metrics); push when due."""
        p = self.progress
        p["step"] = min(p["step"] + n, p["total_steps"] or p["step"] + n)
        if epoch is not None:
            p["epoch"] = epoch
        self._set_rate()
        self._set_percent(p["step"])
        self.metrics.update({k: float(v) for k, v in metrics.items() if v is not None})
        self.push()

    def set_metrics(self, **metrics: float | None) -> None:
        self.metrics.update({k: (None if v is None else float(v)) for k, v in metrics.items()})

    def stage(self, stage: str, percent: float | None = None) -> None:
        """Move to a stage without a counted loop (download, publish); the log lines of
        this stage leave out the counts of the loop before it."""
        self.progress.update(stage=stage, images_per_second=None, eta_seconds=None)
        self._rate = None
        self._unit = None
        if percent is not None:
            self.progress["percent"] = round(float(percent), 1)

    # --- reports ------------------------------------------------------------------------

    def report(self) -> Report:
        """The current record, shaped and named like the resource status."""
        p = self.progress
        progress = Progress(
            epoch=p["epoch"], epochs=p["epochs"], step=p["step"],
            total_steps=p["total_steps"], percent=p["percent"],
            percent_text=f"{int(p['percent'])}%", images_per_second=p.get("images_per_second"),
            eta_seconds=p.get("eta_seconds"), stage=p["stage"],
            updated_at=datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        )
        metrics = Metrics(**{k: v for k, v in self.metrics.items()
                             if k in Metrics.model_fields})
        return {
            "progress": progress.model_dump(by_alias=True, exclude_none=True),
            "metrics": metrics.model_dump(by_alias=True, exclude_none=True),
            "unit": {"name": self._unit, "value": self._rate},
        }

    def push(self, *, force: bool = False) -> bool:
        """Send the record to every sink unless one was sent under `min_interval` ago."""
        if not self.is_primary:
            return False
        now = self.clock()
        if not force and self._last_push is not None and now - self._last_push < self.min_interval:
            return False
        self._last_push = now
        self.pushes += 1
        report = self.report()
        for sink in self.sinks:
            try:
                sink(report)
            except Exception as err:  # a status sink must never stop training
                log.warning("Progress sink %s failed: %s", getattr(sink, "__name__", sink), err)
        return True

    def close(self, stage: str = "done") -> None:
        """Push the final record once, whatever the throttle says; later calls do nothing.

        A run that is done has done all its epochs (a run resumed at its end counts none).
        """
        if self._closed:
            return
        self._closed = True
        if stage == "done" and self.progress["epochs"]:
            self.progress["epoch"] = self.progress["epochs"]
        self.stage(stage, percent=100.0)
        self.push(force=True)

    # --- internals ----------------------------------------------------------------------

    def _set_rate(self) -> None:
        p = self.progress
        elapsed = self.clock() - self._started
        if elapsed <= 0 or p["step"] <= 0:
            return
        rate = p["step"] / elapsed
        self._rate = rate
        # The status field counts images; other units (epochs, steps) only reach the log.
        p["images_per_second"] = round(rate, 2) if self._unit == "images" else None
        p["eta_seconds"] = round(max(0, p["total_steps"] - p["step"]) / rate, 1)

    def _set_percent(self, done: int) -> None:
        lo, hi = self._span
        total = self.progress["total_steps"]
        share = done / total if total else 0.0
        self.progress["percent"] = round(lo + (hi - lo) * min(1.0, share), 1)
