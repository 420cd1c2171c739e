"""The trainer's status sink patches the EvaClipFinetune status subresource, throttled."""

from __future__ import annotations

import asyncio
import logging

import pytest
from ecf_harness import manifest, schema_problems

from evaclip.trainer.k8s_status import make_sink
from evaclip.trainer.progress import Reporter

pytestmark = pytest.mark.asyncio


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _client(cluster):
    import kubernetes.config

    return kubernetes.config.new_client_from_config(config_file=str(cluster.kubeconfig))


async def test_sink_patches_status_at_most_every_10_seconds(cluster, ecf_schema):
    await cluster.create(manifest("train"))
    # The operator's part of the status, which the trainer must leave alone.
    await cluster.request(
        "PATCH", "/apis/training.evaclip.io/v1alpha1/namespaces/default/evaclipfinetunes/"
        "train/status", {"status": {"phase": "Running", "conditions": [
            {"type": "Valid", "status": "True", "reason": "Validated", "message": ""}]}})
    clock = Clock()
    sink = make_sink("default/train", api_client=_client(cluster), clock=clock)
    reporter = Reporter(sinks=[sink], min_interval=0.0, clock=clock)

    def status():
        return cluster.ecf("train")["status"]

    reporter.begin("train", total=100, unit="steps", span=(0.0, 100.0), epochs=4)
    clock.now += 1
    await asyncio.to_thread(reporter.advance, 10, epoch=1, train_loss=2.5)
    assert status()["progress"]["percentText"] == "10%"
    assert status()["progress"]["step"] == 10
    assert status()["metrics"]["trainLoss"] == 2.5
    assert status()["phase"] == "Running" and status()["conditions"][0]["type"] == "Valid"

    clock.now += 5  # within 10 s: the report is dropped
    await asyncio.to_thread(reporter.advance, 30, epoch=2)
    assert status()["progress"]["step"] == 10
    clock.now += 6  # 11 s after the last patch
    await asyncio.to_thread(reporter.advance, 10, epoch=2, val_top1=0.5)
    assert status()["progress"]["step"] == 50
    assert status()["metrics"]["valTop1"] == 0.5
    assert status()["progress"]["etaSeconds"] > 0

    clock.now += 1  # the final report always goes through
    await asyncio.to_thread(reporter.close)
    assert status()["progress"]["percentText"] == "100%"
    assert status()["progress"]["stage"] == "done"
    assert sink.patches == 3 and sink.failures == 0
    patches = [r for r in cluster.emulator.requests
               if r.method == "PATCH" and r.subresource == "status"
               and r.headers.get("User-Agent", "").startswith("OpenAPI")]
    assert len(patches) == 3
    assert all(set(r.data["status"]) <= {"progress", "metrics", "artifacts"} for r in patches)

    # Artifacts, once published, reach the status at once.
    await asyncio.to_thread(sink, {"progress": {"stage": "publish"},
                                   "artifacts": {"manifest": "s3://b/run/manifest.json"}})
    assert status()["artifacts"]["manifest"] == "s3://b/run/manifest.json"
    assert schema_problems(cluster.ecf("train"), ecf_schema) == []


async def test_sink_failures_are_logged_not_raised(cluster, caplog):
    sink = make_sink("default/no-such-job", api_client=_client(cluster))
    with caplog.at_level(logging.WARNING, logger="evaclip.trainer"):
        await asyncio.to_thread(sink, {"progress": {"stage": "train", "percent": 5.0}})
    assert sink.failures == 1
    assert "Could not report progress to default/no-such-job" in caplog.text
    with pytest.raises(ValueError, match="<namespace>/<name>"):
        make_sink("just-a-name")
