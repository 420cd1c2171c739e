"""Prometheus metrics of the operator, served on their own port (`--metrics-port`).

    evaclip_operator_jobs_created_total            jobs the operator created
    evaclip_operator_jobs_succeeded_total          resources that reached Succeeded
    evaclip_operator_jobs_failed_total{reason}     resources that reached Failed
    evaclip_operator_reconcile_errors_total{handler}  handler runs that raised
    evaclip_operator_reconcile_seconds{handler}    how long handler runs took

They live in a registry of their own so an embedding process (tests, the benchmark)
can start several operators without name clashes.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server


class OperatorMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        ns = "evaclip_operator"
        self.jobs_created = Counter(
            "jobs_created", "Training jobs the operator created.",
            namespace=ns, registry=self.registry,
        )
        self.jobs_succeeded = Counter(
            "jobs_succeeded", "EvaClipFinetunes that reached phase Succeeded.",
            namespace=ns, registry=self.registry,
        )
        self.jobs_failed = Counter(
            "jobs_failed", "EvaClipFinetunes that reached phase Failed, by reason.",
            ["reason"], namespace=ns, registry=self.registry,
        )
        self.reconcile_errors = Counter(
            "reconcile_errors", "Handler runs that raised an error, by handler.",
            ["handler"], namespace=ns, registry=self.registry,
        )
        self.reconcile_seconds = Histogram(
            "reconcile_seconds", "Duration of handler runs, by handler.",
            ["handler"], namespace=ns, registry=self.registry,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
        )

    @contextlib.contextmanager
    def timed(self, handler: str, expected: tuple[type[BaseException], ...] = ()) -> Iterator[None]:
        """Time one handler run; count it as an error unless it raised an `expected` type
        (a user's mistake is reported on the resource, it is not the operator's error)."""
        started = time.perf_counter()
        try:
            yield
        except expected:
            raise
        except Exception:
            self.reconcile_errors.labels(handler=handler).inc()
            raise
        finally:
            self.reconcile_seconds.labels(handler=handler).observe(time.perf_counter() - started)

    def serve(self, port: int, addr: str = "0.0.0.0") -> None:
        """Serve /metrics on a daemon thread."""
        start_http_server(port, addr=addr, registry=self.registry)
