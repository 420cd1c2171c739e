"""Starting the training processes: on this machine (`evaclip run --local`) and in a pod.

Both paths end in the same torchrun command (`torchrun_command`): N processes of
`python -m evaclip.trainer.main` with a static rendezvous at MASTER_ADDR:MASTER_PORT.

`run_local` runs a manifest the way a PyTorchJob pod would. In order:

1. validate the manifest and check the memory plan (`evaclip.plan.require_fit`), so a
   mistake fails in one line before anything starts;
2. when an `s3://` URI is used and `storage.endpoint` is empty, start an embedded S3
   store (moto) on 127.0.0.1 for the run, create the buckets and hand its endpoint and
   dummy credentials to the workers through the environment;
3. check the output URI is writable, upload the `--stage` folders, then check that
   something is stored under `model.weights` (the trainer checks again before it
   downloads any image);
4. write the rendered trainer config (the document the operator puts in its ConfigMap),
   set the variables a PyTorchJob injects (MASTER_ADDR, MASTER_PORT, WORLD_SIZE, RANK,
   PET_*) and run torchrun;
5. copy the published outputs to `--copy-to/<job name>/` and print the validation top-1.

`launch_in_pod` is the trainer image's entrypoint (`evaclip launch`): it reads the PET_*
variables of a PyTorchJob pod and replaces itself with the same torchrun command.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from evaclip.errors import UserError
from evaclip.render import CONFIG_ENV, trainer_config_json
from evaclip.spec import EvaClipFinetune
from evaclip.storage import is_s3, join_uri

TRAINER_MODULE = "evaclip.trainer.main"
ERROR_FILE_ENV = "EVACLIP_ERROR_FILE"
LOCALHOST = "127.0.0.1"


# --- the one torchrun command -------------------------------------------------------------


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOCALHOST, 0))
        return int(s.getsockname()[1])


def torchrun_command(nproc: int, *, nnodes: int = 1, node_rank: int = 0,
                     master_addr: str = LOCALHOST, master_port: int = 29500,
                     module: str = TRAINER_MODULE, args: Sequence[str] = ()) -> list[str]:
    """`python -m torch.distributed.run ...` starting `nproc` trainer processes on this node."""
    return [
        sys.executable, "-m", "torch.distributed.run",
        f"--nnodes={nnodes}", f"--nproc-per-node={nproc}", f"--node-rank={node_rank}",
        f"--master-addr={master_addr}", f"--master-port={master_port}",
        "--max-restarts=0", "--module", module, *args,
    ]


def pytorchjob_env(nproc: int, master_port: int, *, nnodes: int = 1, node_rank: int = 0,
                   master_addr: str = LOCALHOST) -> dict[str, str]:
    """The variables the Kubeflow training operator injects into a PyTorchJob pod."""
    return {
        "MASTER_ADDR": master_addr, "MASTER_PORT": str(master_port),
        "WORLD_SIZE": str(nnodes * nproc), "RANK": str(node_rank),
        "PET_MASTER_ADDR": master_addr, "PET_MASTER_PORT": str(master_port),
        "PET_NNODES": str(nnodes), "PET_NPROC_PER_NODE": str(nproc),
        "PET_NODE_RANK": str(node_rank),
    }


def _int_env(env: Mapping[str, str], *names: str, default: int) -> int:
    for name in names:
        if env.get(name):
            try:
                return int(env[name])
            except ValueError:
                raise UserError(f"{name}: got {env[name]!r}; expected an integer") from None
    return default


def pod_nproc(env: Mapping[str, str], gpus_per_node: int | None = None) -> int:
    """Processes per pod: PET_NPROC_PER_NODE when a number, else the pod's GPUs (or 1)."""
    value = env.get("PET_NPROC_PER_NODE", "")
    if value.isdigit() and int(value) > 0:
        return int(value)
    if value in ("", "auto", "gpu"):
        if gpus_per_node:
            return gpus_per_node
        import torch

        return max(1, torch.cuda.device_count()) if value != "" else 1
    if value == "cpu":
        return 1
    raise UserError(f"PET_NPROC_PER_NODE: got {value!r}; expected a number, auto, gpu or cpu")


def pod_command(env: Mapping[str, str], gpus_per_node: int | None = None) -> list[str]:
    """The torchrun command of one PyTorchJob pod, from the variables it was given."""
    return torchrun_command(
        pod_nproc(env, gpus_per_node),
        nnodes=_int_env(env, "PET_NNODES", default=1),
        node_rank=_int_env(env, "PET_NODE_RANK", "RANK", default=0),
        master_addr=env.get("PET_MASTER_ADDR") or env.get("MASTER_ADDR") or LOCALHOST,
        master_port=_int_env(env, "PET_MASTER_PORT", "MASTER_PORT", default=23456),
    )


def launch_in_pod(env: Mapping[str, str] | None = None) -> None:
    """Replace this process with the pod's torchrun (the trainer image's entrypoint)."""
    env = dict(os.environ if env is None else env)
    gpus = None
    if env.get(CONFIG_ENV) and Path(env[CONFIG_ENV]).is_file():
        from evaclip.trainer.context import load_config

        gpus = load_config(env[CONFIG_ENV]).spec.resources.gpus_per_node or None
    argv = pod_command(env, gpus)
    sys.stdout.flush()
    os.execvpe(argv[0], argv, env)


# --- evaclip run --local -------------------------------------------------------------------


@dataclass(frozen=True)
class Stage:
    """A local folder uploaded to a URI before the run (`--stage DIR=URI`)."""

    local: Path
    uri: str

    @classmethod
    def parse(cls, text: str) -> Stage:
        local, sep, uri = text.partition("=")
        if not sep or not local or not uri:
            raise UserError(f"--stage: got {text!r}; expected LOCAL_DIR=URI, e.g. "
                            "data/digits=s3://bucket/digits")
        if not Path(local).is_dir():
            raise UserError(f"--stage: {local} is not a directory; create it first "
                            "(for the demo: evaclip datasets digits DIR)")
        return cls(Path(local), uri.rstrip("/"))


def s3_uris(resource: EvaClipFinetune, stages: Sequence[Stage] = ()) -> list[str]:
    """Every s3:// URI the run touches."""
    spec = resource.spec
    uris = [spec.data.train, spec.data.validation, spec.output, spec.model.weights,
            *(s.uri for s in stages)]
    return [u for u in uris if u and is_s3(u)]


def check_plan(resource: EvaClipFinetune, processes: int) -> None:
    """Refuse a job whose memory plan does not fit, before anything starts."""
    from evaclip.plan import require_fit

    require_fit(resource, processes=processes)


def _start_store(stack: ExitStack, resource: EvaClipFinetune, uris: Sequence[str],
                 log: Any) -> dict[str, str]:
    """Start the embedded store when needed; the environment the workers should get."""
    if not uris or resource.spec.storage.endpoint:
        return {}
    from evaclip.s3server import EmbeddedS3

    buckets = sorted({u[len("s3://"):].split("/", 1)[0] for u in uris})
    store = stack.enter_context(EmbeddedS3(buckets=buckets))
    log(f"Started an embedded S3 store on {store.endpoint} with bucket(s) {', '.join(buckets)}.")
    return store.env()


def _storage(resource: EvaClipFinetune, env: Mapping[str, str], cache: Path) -> Any:
    from evaclip.storage import Storage

    credentials = None
    if env.get("AWS_ACCESS_KEY_ID"):
        credentials = {"aws_access_key_id": env["AWS_ACCESS_KEY_ID"],
                       "aws_secret_access_key": env["AWS_SECRET_ACCESS_KEY"]}
    return Storage(resource.spec.storage, credentials=credentials,
                   endpoint=env.get("EVACLIP_S3_ENDPOINT"), cache_dir=cache)


def _worker_env(base: Mapping[str, str], extra: Mapping[str, str], nproc: int) -> dict[str, str]:
    env = {**base, **extra}
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1
    env.setdefault("OMP_NUM_THREADS", str(max(1, cores // nproc)))
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _failure(rc: int, error_file: Path, log_file: Path) -> Exception:
    """The one-line error of a failed run: the trainer's own message when it left one."""
    if error_file.is_file() and error_file.read_text().strip():
        return UserError(error_file.read_text().strip().splitlines()[0])
    tail = log_file.read_text(errors="replace").splitlines()[-40:] if log_file.is_file() else []
    sys.stderr.write("\n".join(tail) + "\n")
    return TrainingFailed(f"training failed with exit code {rc}; the full log is {log_file}")


class TrainingFailed(UserError):
    """The trainer processes failed for a reason they did not describe (see the log)."""


class RunInterrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM stopped the run; the message says where it can resume from."""


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
# torchrun's exit when a stop signal reached it other than through this process.
SIGNAL_EXITS = {code for sig in STOP_SIGNALS for code in (-sig, 128 + sig)}
GRACE_SECONDS = 45.0  # torchrun waits 30 s for its workers before it kills them itself


def _descendants(proc: Any) -> list[Any]:
    """The live descendants of a psutil.Process (none once it is gone)."""
    import psutil

    try:
        return proc.children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _kill_all(procs: Sequence[Any]) -> None:
    """SIGKILL each psutil.Process still running (psutil refuses a reused pid) and reap it."""
    import psutil

    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(list(procs), timeout=10)


def supervise(argv: Sequence[str], env: Mapping[str, str], *, stdout: Any = None,
              stderr: Any = None, grace: float = GRACE_SECONDS,
              poll: float = 0.5) -> tuple[int, bool]:
    """Run torchrun and leave no process behind; returns (exit code, interrupted).

    torchrun runs in a session of its own and its workers in sessions of theirs, so a
    Ctrl-C on the terminal reaches only this process. SIGINT or SIGTERM here is forwarded
    to torchrun, which forwards it to the workers (they stop without publishing). After
    `grace` seconds whatever is left of torchrun and of every worker seen while it ran
    is killed. The workers' pids are collected while torchrun runs because once it is
    gone they are children of PID 1 and no longer found under it.
    """
    import psutil

    proc = subprocess.Popen(list(argv), env=dict(env), stdout=stdout, stderr=stderr,
                            start_new_session=True)
    leader = psutil.Process(proc.pid)
    seen: dict[int, Any] = {}
    received: list[int] = []

    def forward(signum: int, frame: Any) -> None:
        received.append(signum)
        try:
            os.kill(proc.pid, signum)
        except ProcessLookupError:
            pass

    handlers = {}
    for sig in STOP_SIGNALS:
        try:
            handlers[sig] = signal.signal(sig, forward)
        except ValueError:  # not the main thread: signals stay with the caller
            break
    try:
        deadline = None
        while True:
            for child in _descendants(leader):
                seen.setdefault(child.pid, child)
            try:
                rc = proc.wait(timeout=poll)
                break
            except subprocess.TimeoutExpired:
                pass
            if received and deadline is None:
                deadline = time.monotonic() + grace
            if deadline is not None and time.monotonic() > deadline:
                _kill_all([leader, *seen.values()])
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        survivors = [p for p in seen.values() if p.is_running()]
        if survivors:  # torchrun gone (or killed) before its workers
            _kill_all(survivors)
    return rc, bool(received) or rc in SIGNAL_EXITS


def _resume_hint(resource: EvaClipFinetune, storage: Any, work: Path) -> str:
    """Where a rerun of the same manifest resumes from (empty when there is no checkpoint)."""
    from evaclip.storage import StorageError
    from evaclip.trainer.checkpointing import CheckpointManager

    if resource.spec.method.type == "linearProbe":
        return ""
    try:
        manager = CheckpointManager(storage, resource.spec.output, work / "checkpoints",
                                    keep_last=1)
        step = manager.latest()
    except (UserError, StorageError):
        return ""
    if step is None:
        return ""
    return (f"the same command resumes from checkpoint {manager.uri(step)} "
            f"(step {step})")


def copy_outputs(storage: Any, output_uri: str, dest: Path) -> dict[str, Any]:
    """Download a completed publish (by its manifest) into `dest`; returns the manifest."""
    from evaclip.storage import MANIFEST_NAME

    manifest = storage.read_published(output_uri, field="output")
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    for entry in manifest["files"]:
        storage.download(join_uri(output_uri, entry["path"]), dest / entry["path"])
    (dest / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1))
    return manifest


def run_local(manifest: str | Path, *, nproc: int | None = None, stages: Sequence[str] = (),
              copy_to: str | Path | None = None, workdir: str | Path | None = None,
              log: Any = print) -> dict[str, Any]:
    """Run a manifest on this machine with torchrun; returns the published metrics."""
    from evaclip.manifest import load_manifest
    from evaclip.trainer.context import check_weights

    if nproc is not None and nproc < 1:  # 0 is a mistake, not "the default"
        raise UserError(f"--nproc: got {nproc}; use 1 or more processes")
    resource = load_manifest(manifest)
    staged = [Stage.parse(s) for s in stages]
    if nproc is None:
        nproc = resource.spec.resources.gpus_per_node or 1
    check_plan(resource, nproc)
    work = Path(workdir or Path(".cache") / "evaclip" / "runs" / resource.name).resolve()
    work.mkdir(parents=True, exist_ok=True)
    output = resource.spec.output
    with ExitStack() as stack:
        if not is_s3(output):  # no store needed to find out
            _storage(resource, os.environ, work / "cache").check_writable(output, field="output")
        store_env = _start_store(stack, resource, s3_uris(resource, staged), log)
        storage = _storage(resource, {**os.environ, **store_env}, work / "cache")
        storage.check_writable(output, field="output")
        for stage in staged:
            log(f"Uploading {stage.local} to {stage.uri}.")
            storage.upload_tree(stage.local, stage.uri, field="--stage")
        check_weights(storage, resource.spec.model.weights)
        metrics = _torchrun(resource, nproc, work, store_env, storage, log)
        if copy_to is not None:
            dest = Path(copy_to) / resource.name
            copy_outputs(storage, resource.spec.output, dest)
            metrics["copiedTo"] = str(dest)
        else:
            metrics["copiedTo"] = None
    return metrics


def _torchrun(resource: EvaClipFinetune, nproc: int, work: Path, store_env: Mapping[str, str],
              storage: Any, log: Any) -> dict[str, Any]:
    config = work / "config.json"
    config.write_text(trainer_config_json(resource))
    error_file, log_file = work / "error.txt", work / "torchrun.log"
    error_file.unlink(missing_ok=True)
    port = free_port()
    env = _worker_env(os.environ, {
        **store_env, **pytorchjob_env(nproc, port),
        CONFIG_ENV: str(config), "EVACLIP_WORKDIR": str(work),
        "EVACLIP_CACHE_DIR": str(work / "cache"), ERROR_FILE_ENV: str(error_file),
    }, nproc)
    log(f"Starting {nproc} training process{'es' if nproc > 1 else ''} with torchrun "
        f"(rendezvous on {LOCALHOST}:{port}).")
    with open(log_file, "w") as err:
        rc, interrupted = supervise(torchrun_command(nproc, master_port=port), env, stderr=err)
    if interrupted:
        raise RunInterrupted(_resume_hint(resource, storage, work))
    if rc != 0:
        raise _failure(rc, error_file, log_file)
    metrics_file = work / "outputs" / "metrics.json"
    return json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}
