"""The program of every training process: `python -m evaclip.trainer.main` under torchrun.

It reads the job (`EVACLIP_CONFIG`), joins the process group and runs the method:
`linearProbe` here (`evaclip.trainer.linear_probe`), `lora`, `partial` and `full` in
`evaclip.trainer.finetune`. Rank 0 logs to stdout; the other ranks log warnings only.

Progress goes to the log and, when `EVACLIP_STATUS_RESOURCE=<namespace>/<name>` is set
(the operator sets it in pods), to the resource's status through
`evaclip.trainer.k8s_status.make_sink(resource)` if that module is installed.

A mistake in the input (a `UserError`) or object storage that keeps failing after every
retry (a `StorageError`) ends the process with exit code 1 and one line on stderr, also
written to `EVACLIP_ERROR_FILE` when set so `evaclip run --local` can show it instead of
torchrun's report.

SIGINT and SIGTERM (torchrun forwards either to its workers when it is stopped) end the
process with 128 + the signal's number and one log line, without a traceback and
without publishing: outputs are only published at the very end of a run.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import signal
import sys
from collections.abc import Sequence
from typing import Any

from evaclip.errors import UserError

log = logging.getLogger("evaclip.trainer")

STATUS_ENV = "EVACLIP_STATUS_RESOURCE"
STATUS_MODULE = "evaclip.trainer.k8s_status"
ERROR_FILE_ENV = "EVACLIP_ERROR_FILE"
FINETUNE_METHODS = ("lora", "partial", "full")


def setup_logging(rank: int) -> None:
    """Rank 0 logs INFO sentences to stdout; other ranks only warnings, with their rank."""
    handler = logging.StreamHandler(sys.stdout if rank == 0 else sys.stderr)
    prefix = "" if rank == 0 else f"[rank {rank}] "
    handler.setFormatter(logging.Formatter(f"%(asctime)s {prefix}%(message)s", "%H:%M:%S"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    # botocore announces where it found credentials on every client; not news in a job.
    logging.getLogger("botocore.credentials").setLevel(logging.WARNING)


def progress_sinks(rank: int) -> list[Any]:
    """The log sink, plus the Kubernetes status sink in a pod that names its resource."""
    from evaclip.trainer.progress import log_sink

    sinks: list[Any] = [log_sink]
    target = os.environ.get(STATUS_ENV)
    if rank == 0 and target and importlib.util.find_spec(STATUS_MODULE) is not None:
        sinks.append(importlib.import_module(STATUS_MODULE).make_sink(target))
    return sinks


def run_method(ctx: Any) -> Any:
    """Dispatch on spec.method.type."""
    method = ctx.spec.method.type
    if method == "linearProbe":
        from evaclip.trainer import linear_probe

        return linear_probe.run(ctx)
    if method in FINETUNE_METHODS:
        finetune = importlib.import_module("evaclip.trainer.finetune")
        return finetune.run(ctx)
    raise UserError(f"method.type: got {method!r}; allowed: linearProbe, lora, partial, full")


def _report_error(message: str) -> None:
    print(f"error: {message}", file=sys.stderr, flush=True)
    path = os.environ.get(ERROR_FILE_ENV)
    if path:
        try:
            with open(path, "x") as fh:  # the first rank to fail tells the story
                fh.write(message + "\n")
        except FileExistsError:
            pass


class Stopped(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived; `signum` says which."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _raise_stopped(signum: int, frame: Any) -> None:
    # Once is enough: further signals while the process winds down are ignored.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    raise Stopped(signum)


def install_signal_handlers() -> dict[int, Any]:
    """Turn SIGINT and SIGTERM into `Stopped`, which `main` reports in one line; returns
    the handlers they replace."""
    return {sig: signal.signal(sig, _raise_stopped) for sig in (signal.SIGINT, signal.SIGTERM)}


def main(argv: Sequence[str] | None = None) -> int:
    """Run this process's part of the job; 0 on success, 1 on a user mistake, 128 + the
    signal's number when SIGINT or SIGTERM stopped it."""
    from evaclip.storage import StorageError
    from evaclip.trainer.context import JobContext, check_weights

    rank = int(os.environ.get("RANK", "0") or 0)
    previous = install_signal_handlers()
    setup_logging(rank)
    os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")
    ctx = None
    try:
        ctx = JobContext.from_env(sinks=progress_sinks(rank))
        check_weights(ctx.storage, ctx.spec.model.weights)  # before any data download
        run_method(ctx)
        ctx.reporter.close("done")
        return 0
    except (UserError, StorageError) as err:
        # StorageError: object storage still failing after every retry, a one-line story too.
        _report_error(str(err))
        return 1
    except KeyboardInterrupt as err:
        signum = err.signum if isinstance(err, Stopped) else signal.SIGINT
        if rank == 0:  # stderr: the job's log, not the terminal of `evaclip run --local`
            print(f"Stopped by {signal.Signals(signum).name} before the run finished.",
                  file=sys.stderr, flush=True)
        return 128 + signum
    finally:
        if ctx is not None:
            ctx.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


if __name__ == "__main__":
    sys.exit(main())
