"""What every part of a training process needs: the job, its rank, its device and storage.

`JobContext.from_env()` reads the rendered trainer config (the JSON file named by
`EVACLIP_CONFIG`, written by `evaclip run --local` or mounted from the operator's
ConfigMap) and the torch.distributed environment that torchrun sets (RANK, WORLD_SIZE,
LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT), and joins the process group:
gloo on CPU, NCCL on GPUs.

Environment read besides torchrun's:

* `EVACLIP_WORKDIR`: node-local scratch (features, outputs before publishing); default
  `/tmp/evaclip/<namespace>-<name>`.
* `EVACLIP_CACHE_DIR`: node-wide download cache of `evaclip.storage.Storage`; default
  `<workdir>/cache`, so the ranks of a node share one copy of every image and weight file.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from evaclip.errors import UserError
from evaclip.render import CONFIG_ENV
from evaclip.spec import EvaClipFinetune, EvaClipFinetuneSpec
from evaclip.storage import CACHE_ENV, Storage, is_s3
from evaclip.trainer.progress import Reporter

if TYPE_CHECKING:
    import torch

log = logging.getLogger("evaclip.trainer")

WORKDIR_ENV = "EVACLIP_WORKDIR"


def load_config(path: str | os.PathLike[str] | None = None) -> EvaClipFinetune:
    """The job of this process, from the rendered config file."""
    from evaclip.manifest import parse_resource

    path = path or os.environ.get(CONFIG_ENV)
    if not path:
        raise UserError(
            f"{CONFIG_ENV} is not set; point it to the rendered trainer config "
            "(`evaclip render MANIFEST > config.json`)"
        )
    try:
        obj = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{CONFIG_ENV}: {path} does not exist") from None
    except ValueError as err:
        raise UserError(f"{CONFIG_ENV}: {path} is not valid JSON ({err})") from None
    return parse_resource(obj)


def check_weights(storage: Storage, weights: str | None) -> None:
    """Refuse a `model.weights` URI under which nothing is stored (no object or file, or an
    empty prefix or folder), so the mistake shows before any image is downloaded."""
    if not weights:
        return
    field_name = "model.weights"
    if is_s3(weights):
        found = storage.exists(weights, field=field_name)
    else:
        found = bool(storage.list(weights, field=field_name))
    if not found:
        raise UserError(f"{field_name}: nothing is stored under {weights}; check the URI")


def _env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        raise UserError(f"{name}: got {os.environ[name]!r}; expected an integer") from None


@dataclass
class JobContext:
    """The job and this process's place in it."""

    resource: EvaClipFinetune
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    device: torch.device = field(default=None)  # type: ignore[assignment]
    storage: Storage = field(default=None)  # type: ignore[assignment]
    workdir: Path = field(default=None)  # type: ignore[assignment]
    reporter: Reporter = field(default=None)  # type: ignore[assignment]
    distributed: bool = False

    @property
    def spec(self) -> EvaClipFinetuneSpec:
        return self.resource.spec

    @property
    def output_uri(self) -> str:
        return self.spec.output.rstrip("/")

    @property
    def is_primary(self) -> bool:
        return self.rank == 0

    @property
    def name(self) -> str:
        return self.resource.name

    @classmethod
    def from_env(cls, resource: EvaClipFinetune | None = None, *,
                 sinks: list[Any] | None = None, init: bool = True) -> JobContext:
        """Build the context of this process; join the process group when `init`."""
        import torch

        resource = resource or load_config()
        rank = _env_int("RANK", 0)
        world = _env_int("WORLD_SIZE", 1)
        local_rank = _env_int("LOCAL_RANK", 0)
        local_world = _env_int("LOCAL_WORLD_SIZE", 1)
        use_gpu = resource.spec.resources.gpus_per_node > 0 and torch.cuda.is_available()
        device = torch.device(f"cuda:{local_rank}") if use_gpu else torch.device("cpu")
        default_dir = Path("/tmp/evaclip") / f"{resource.namespace}-{resource.name}"
        workdir = Path(os.environ.get(WORKDIR_ENV) or default_dir)
        workdir.mkdir(parents=True, exist_ok=True)
        cache = os.environ.get(CACHE_ENV) or str(workdir / "cache")
        storage = Storage.from_env(resource.spec.storage, cache_dir=cache)
        reporter = Reporter(sinks=sinks, is_primary=rank == 0)
        ctx = cls(resource, rank, world, local_rank, local_world, device, storage, workdir,
                  reporter)
        if init:
            ctx.init_distributed()
        return ctx

    def init_distributed(self) -> None:
        """Join the process group (gloo on CPU, NCCL on GPU) when there is more than one rank."""
        import torch
        import torch.distributed as dist

        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        else:
            # Share the node's cores between its ranks instead of oversubscribing them.
            cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1
            torch.set_num_threads(max(1, cores // max(1, self.local_world_size)))
        if self.world_size <= 1 or dist.is_initialized():
            self.distributed = dist.is_initialized()
            return
        backend = "nccl" if self.device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, rank=self.rank, world_size=self.world_size,
                                timeout=timedelta(minutes=30))
        self.distributed = True
        if self.is_primary:
            log.info("Joined a %s process group of %d ranks.", backend, self.world_size)

    def barrier(self) -> None:
        if self.distributed:
            import torch.distributed as dist

            dist.barrier()

    def close(self) -> None:
        """Leave the process group."""
        if self.distributed:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
            self.distributed = False
