"""The progress reporter: throttled pushes, final push, rate and ETA, silent non-primary."""

from __future__ import annotations

import logging

import pytest

from evaclip.spec import Metrics, Progress
from evaclip.trainer.progress import Reporter, describe, format_duration


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make(clock: Clock, **kw) -> tuple[Reporter, list[dict]]:
    seen: list[dict] = []
    return Reporter(sinks=[seen.append], clock=clock, **kw), seen


def test_at_most_one_push_per_interval_and_the_final_one_always() -> None:
    clock = Clock()
    reporter, seen = make(clock)
    reporter.begin("features", 1000, span=(0.0, 90.0))
    pushed_at = []
    for _ in range(100):  # 100 updates over 50 s
        clock.now += 0.5
        before = len(seen)
        reporter.advance(10)
        if len(seen) > before:
            pushed_at.append(clock.now)
    gaps = [b - a for a, b in zip(pushed_at, pushed_at[1:], strict=False)]
    assert len(pushed_at) == 5
    assert all(g >= 10.0 for g in gaps)
    reporter.close()
    assert len(seen) == 6
    final = seen[-1]["progress"]
    assert final["percent"] == 100.0 and final["percentText"] == "100%"
    assert final["stage"] == "done"


def test_rate_eta_and_percent_within_the_stage_span() -> None:
    clock = Clock()
    reporter, seen = make(clock)
    reporter.begin("features", 400, span=(0.0, 80.0))
    clock.now += 10.0
    reporter.advance(100)
    p = seen[-1]["progress"]
    assert p["imagesPerSecond"] == pytest.approx(10.0)
    assert p["etaSeconds"] == pytest.approx(30.0)
    assert p["percent"] == pytest.approx(20.0) and p["percentText"] == "20%"
    assert p["step"] == 100 and p["totalSteps"] == 400
    text = describe(seen[-1])
    assert "100/400 images" in text and "10.0 images/s" in text and "ETA 30 s" in text


def test_report_matches_the_status_models_in_camel_case() -> None:
    clock = Clock()
    reporter, seen = make(clock)
    reporter.begin("train", 10, unit="epochs", span=(90.0, 99.0), epochs=10)
    clock.now += 2
    reporter.advance(1, epoch=1, train_loss=1.5, val_top1=0.5)
    report = seen[-1]
    Progress.model_validate(report["progress"])
    Metrics.model_validate(report["metrics"])
    assert report["metrics"] == {"trainLoss": 1.5, "valTop1": 0.5}
    assert report["progress"]["epoch"] == 1 and report["progress"]["epochs"] == 10
    # epochs per second are not images per second: the status field stays empty.
    assert "imagesPerSecond" not in report["progress"]
    assert "epoch 1/10" in describe(report) and "loss 1.5000" in describe(report)


def test_other_ranks_push_nothing() -> None:
    reporter, seen = make(Clock(), is_primary=False)
    reporter.begin("features", 10)
    reporter.advance(5)
    reporter.close()
    assert seen == []


def test_a_failing_sink_does_not_stop_training(caplog: pytest.LogCaptureFixture) -> None:
    def broken(report: dict) -> None:
        raise ConnectionError("API server unreachable")

    seen: list[dict] = []
    reporter = Reporter(sinks=[broken, seen.append], clock=Clock())
    with caplog.at_level(logging.WARNING):
        reporter.close()
    assert len(seen) == 1
    assert "API server unreachable" in caplog.text


def test_durations_read_as_text() -> None:
    assert format_duration(42) == "42 s"
    assert format_duration(185) == "3 min 05 s"
    assert format_duration(7620) == "2 h 07 min"
    assert format_duration(None) == "unknown"


def test_the_final_line_is_logged_once_without_the_counts_of_the_last_loop() -> None:
    clock = Clock()
    reporter, seen = make(clock)
    reporter.begin("train", 11776, span=(5.0, 95.0), epochs=3)
    clock.now += 60
    reporter.advance(11504, epoch=3, train_loss=1.25, val_top1=0.75)
    reporter.stage("publish", percent=96.0)
    reporter.close()
    reporter.close()  # a second close (an error path, a finally) adds nothing
    assert [r["progress"]["stage"] for r in seen] == ["train", "done"]
    assert describe(seen[-1]) == "Done: epoch 3/3 (100% of the run), loss 1.2500, val top-1 0.750."


def test_a_run_resumed_past_its_end_reports_no_negative_counts() -> None:
    clock = Clock()
    reporter, seen = make(clock)
    reporter.begin("train", (69 - 126) * 64, span=(5.0, 95.0), epochs=3)  # resumed at step 126
    reporter.advance(0)
    assert seen[-1]["progress"]["totalSteps"] == 0
    assert describe(seen[-1]) == "Train: epoch 0/3, 0/0 images (5% of the run)."
    reporter.close()
    assert describe(seen[-1]) == "Done: epoch 3/3 (100% of the run)."


def test_a_stage_without_a_loop_is_described_without_counts() -> None:
    reporter, seen = make(Clock())
    reporter.stage("download", 0.0)
    reporter.push(force=True)
    assert describe(seen[-1]) == "Download (0% of the run)."
