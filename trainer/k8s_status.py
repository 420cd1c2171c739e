"""Progress from the training pod into the EvaClipFinetune's status subresource.

Rank 0 of a job run by the operator finds `EVACLIP_STATUS_RESOURCE=<namespace>/<name>`
in its environment; `make_sink(target)` returns a `Reporter` sink that JSON-merge-patches
`status.progress`, `status.metrics` and (once published) `status.artifacts` of that
resource, with the pod's service account (in-cluster config). The Helm chart grants that
account `patch` on `evaclipfinetunes/status` in the namespace, nothing else.

The operator writes the other status keys (phase, conditions, ...); neither side ever
writes the other's keys, so their merge patches never undo each other.

At most one patch per `min_interval` seconds (10 s) reaches the API server; the final
report of a run (stage `done`) and reports that carry artifacts always go through. A
failed patch is logged and training goes on: status is a view, never a reason to stop.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

from evaclip.spec import GROUP, PLURAL, VERSION

log = logging.getLogger("evaclip.trainer")

STATUS_KEYS = ("progress", "metrics", "artifacts")
FINAL_STAGES = ("done", "failed")
TIMEOUT = (5.0, 10.0)


def _api_client(kubeconfig: str | None = None) -> Any:
    """A client for the pod's service account, or for a kubeconfig file when given."""
    import kubernetes.client
    import kubernetes.config

    if kubeconfig:
        return kubernetes.config.new_client_from_config(config_file=kubeconfig)
    configuration = kubernetes.client.Configuration()
    kubernetes.config.load_incluster_config(client_configuration=configuration)
    return kubernetes.client.ApiClient(configuration)


class K8sStatusSink:
    """A progress sink that patches the status subresource, throttled."""

    def __init__(
        self,
        target: str,
        *,
        api_client: Any | None = None,
        min_interval: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        namespace, sep, name = target.partition("/")
        if not sep or not namespace or not name:
            raise ValueError(
                f"EVACLIP_STATUS_RESOURCE: got {target!r}; expected <namespace>/<name>"
            )
        self.namespace, self.name = namespace, name
        self.min_interval = min_interval
        self.clock = clock
        self._client = api_client
        self._api: Any = None
        self._last: float | None = None
        self.patches = 0
        self.failures = 0

    def __repr__(self) -> str:  # the reporter names failing sinks in its log line
        return f"K8sStatusSink({self.namespace}/{self.name})"

    def _custom_api(self) -> Any:
        if self._api is None:
            import kubernetes.client

            self._api = kubernetes.client.CustomObjectsApi(self._client or _api_client())
        return self._api

    @staticmethod
    def status_patch(report: Mapping[str, Any]) -> dict[str, Any]:
        """The part of a report that belongs in the status (no throughput units etc.)."""
        return {k: dict(report[k]) for k in STATUS_KEYS if report.get(k)}

    def _due(self, report: Mapping[str, Any]) -> bool:
        stage = (report.get("progress") or {}).get("stage")
        if stage in FINAL_STAGES or report.get("artifacts"):
            return True
        now = self.clock()
        return self._last is None or now - self._last >= self.min_interval

    def __call__(self, report: Mapping[str, Any]) -> None:
        patch = self.status_patch(report)
        if not patch or not self._due(report):
            return
        self._last = self.clock()
        try:
            self._custom_api().patch_namespaced_custom_object_status(
                GROUP, VERSION, self.namespace, PLURAL, self.name, {"status": patch},
                _content_type="application/merge-patch+json", _request_timeout=TIMEOUT,
            )
            self.patches += 1
        except Exception as err:  # noqa: BLE001 - status must never stop training
            self.failures += 1
            log.warning(
                "Could not report progress to %s/%s: %s", self.namespace, self.name,
                getattr(err, "reason", None) or err,
            )


def make_sink(target: str, **kwargs: Any) -> K8sStatusSink:
    """The sink for `EVACLIP_STATUS_RESOURCE` (called by evaclip.trainer.main)."""
    return K8sStatusSink(target, **kwargs)
