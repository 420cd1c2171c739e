"""`evaclip operator`: run the controller against the current cluster.

    evaclip operator --all-namespaces
    evaclip operator --namespace team-a --namespace team-b --metrics-port 9090

It logs in with the in-cluster service account when it runs in a pod, else with the
current kubeconfig context. kopf is imported only when the command runs, so
`evaclip --help` stays fast.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from collections.abc import Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from evaclip.operator.settings import OperatorConfig


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add this area's sub-commands to the `evaclip` parser."""
    p = sub.add_parser(
        "operator",
        help="run the EvaClipFinetune controller (kopf) against the current cluster",
        description="Watch EvaClipFinetune resources and run them as training jobs. "
        "Settings not given as flags come from EVACLIP_* environment variables "
        "(docs/operator.md).",
    )
    scope = p.add_mutually_exclusive_group()
    scope.add_argument(
        "--namespace", "-n", action="append", default=None, metavar="NS",
        help="watch this namespace (repeat for several)",
    )
    scope.add_argument(
        "--all-namespaces", "-A", action="store_true", default=None,
        help="watch every namespace (the default when no --namespace is given)",
    )
    p.add_argument(
        "--liveness", metavar="URL_OR_PORT", default=None,
        help="liveness endpoint, e.g. http://0.0.0.0:8080/healthz or just 8080; 'off' disables",
    )
    p.add_argument("--liveness-port", type=int, default=None, metavar="PORT",
                   help="shorthand for --liveness http://0.0.0.0:PORT/healthz")
    p.add_argument("--metrics-port", type=int, default=None, metavar="PORT",
                   help="serve Prometheus metrics on this port (0 disables; default 9090)")
    p.add_argument("--log-level", default="INFO",
                   choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="log verbosity")
    p.set_defaults(func=_operator)


def _liveness(args: argparse.Namespace) -> str | None:
    value = args.liveness
    if args.liveness_port is not None:
        value = str(args.liveness_port)
    if value is None:
        return None
    if value.lower() in ("off", "none", "0"):
        return ""
    if value.isdigit():
        return f"http://0.0.0.0:{value}/healthz"
    return value


def _operator(args: argparse.Namespace) -> int:
    config = config_from_args(args, os.environ)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(ResourceFormatter(LOG_FORMAT))
    logging.basicConfig(level=getattr(logging, args.log_level), handlers=[handler])
    return run_operator(config)


LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class ResourceFormatter(logging.Formatter):
    """Starts each line about one object with `[namespace/name]`.

    kopf's per-object loggers (the `logger` argument of handlers, and kopf's own messages
    about an object) attach the object's reference to every record; without this prefix
    a line such as "Handler 'create' failed permanently" would not say which resource.
    """

    def format(self, record: logging.LogRecord) -> str:
        ref = getattr(record, "k8s_ref", None)
        if isinstance(ref, dict) and ref.get("name"):
            where = f"{ref['namespace']}/{ref['name']}" if ref.get("namespace") else ref["name"]
            record = logging.makeLogRecord(record.__dict__)
            record.msg = f"[{where}] {record.msg}"
        return super().format(record)


def config_from_args(args: argparse.Namespace, environ: Mapping[str, str]) -> OperatorConfig:
    """The operator's configuration: EVACLIP_* variables, overridden by the flags."""
    from evaclip.operator.settings import from_env

    liveness = _liveness(args)
    overrides = {
        # A flag wins over the environment, for either scope.
        "namespaces": tuple(args.namespace) if args.namespace else (
            () if args.all_namespaces else None
        ),
        "all_namespaces": False if args.namespace else args.all_namespaces,
        "metrics_port": args.metrics_port,
        "liveness_endpoint": liveness,
    }
    config = from_env(environ, **overrides)
    if liveness == "":
        config = dataclasses.replace(config, liveness_endpoint=None)
    if args.metrics_port == 0:
        config = dataclasses.replace(config, metrics_port=None)
    return config


def run_operator(config: OperatorConfig) -> int:
    """Start kopf with our registry and settings; returns when the operator stops.

    SIGTERM and SIGINT stop it (kopf's own signal handlers); it then returns 0. It returns
    EXIT_RESTART when it stopped itself to start again (see `restart` below).
    """
    import asyncio

    return asyncio.run(_serve(config))


async def _serve(config: OperatorConfig) -> int:
    """The operator's event loop: kopf until a signal or a restart request stops it."""
    import asyncio

    import kopf

    from evaclip.operator.handlers import build_registry, configure_kopf
    from evaclip.operator.metrics import OperatorMetrics

    log = logging.getLogger("evaclip.operator")
    metrics = OperatorMetrics()
    if config.metrics_port:
        metrics.serve(config.metrics_port)
    settings = kopf.OperatorSettings()
    configure_kopf(settings, config)
    # SIGTERM and SIGINT go to kopf's own signal handlers. A restart cancels kopf's task
    # rather than raising a stop flag: kopf waits on a stop flag in a task (or, for a
    # threading.Event, in an executor thread) that it does not cancel when a signal stops
    # it first, which delays every shutdown by 5 s (or, with a thread, forever).
    loop = asyncio.get_running_loop()
    reasons: list[str] = []
    tasks: list[asyncio.Task[None]] = []

    def restart(why: str) -> None:
        # Called from the handlers' worker threads.
        if not reasons:
            reasons.append(why)
            log.warning("Stopping to start again: %s, and kopf watches only the APIs it "
                        "found when it started.", why)
            loop.call_soon_threadsafe(tasks[0].cancel)

    registry = build_registry(config, metrics, restart=restart)
    scope = (
        {"namespaces": list(config.namespaces)}
        if config.namespaces and not config.all_namespaces
        else {"clusterwide": True}
    )
    where = ", ".join(config.namespaces) if "namespaces" in scope else "all namespaces"
    log.info("Starting the operator for %s with the %s launcher.", where, config.launcher)
    tasks.append(asyncio.create_task(kopf.operator(
        registry=registry,
        settings=settings,
        standalone=True,
        liveness_endpoint=config.liveness_endpoint,
        **scope,
    )))
    try:
        await tasks[0]
    except asyncio.CancelledError:
        if not reasons:
            raise
    log.info("The operator stopped.")
    # Exit non-zero so the pod's container restarts at once (Deployment: Always).
    return EXIT_RESTART if reasons else 0


EXIT_RESTART = 75  # EX_TEMPFAIL: start again
