"""Checkpoints that survive preemption: save, publish atomically, keep the last K, resume.

Layout under the job's output URI::

    <output>/checkpoints/step-00000120/      one DeepSpeed checkpoint (tag step-00000120)
        mp_rank_00_model_states.pt          module, scheduler and client state (rank 0)
        zero_pp_rank_R_mp_rank_00_optim_states.pt   ZeRO shards, one per rank
        COMPLETE                            written last: the checkpoint counts from then

Saving: every rank calls DeepSpeed's `save_checkpoint` into a node-local folder; the first
process of every other node uploads its node's files; then rank 0 publishes its own files
and writes `COMPLETE` last (`Storage.publish` with that manifest name). Only after that,
older checkpoints beyond `checkpoint.keepLast` (and leftovers of saves that never
completed) are deleted. A job killed while saving thus always keeps its previous complete
checkpoint.

Resuming: the newest folder with a `COMPLETE` object is fetched by every node into its
cache and handed to `load_checkpoint`; folders without it are ignored.

Job fingerprint: `COMPLETE` records, under `extra.job`, the settings that decide the
training trajectory (`job_settings`) and their SHA-256 (`extra.fingerprint`). A job resumes
only from a checkpoint with its own fingerprint; one written by a different job (another
method, data set, learning rate, world size, ...) or by a version that recorded no
fingerprint is refused before anything is loaded, naming `output` and the two ways out (a
new output URI, or deleting `<output>/checkpoints/`). Settings that do not change the
math are left out, so changing them keeps resuming: `suspend`, `runtime`, `storage`,
`checkpoint`, `resources` other than the world size, `data.numWorkers`,
`training.saveFeatures` and `model.trustRemoteCode`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from evaclip.errors import UserError
from evaclip.storage import Storage, join_uri

log = logging.getLogger("evaclip.trainer.checkpointing")

COMPLETE = "COMPLETE"
_TAG = re.compile(r"^step-(\d{8})$")


def tag_for(step: int) -> str:
    """The checkpoint tag (folder name) of optimizer step `step`."""
    return f"step-{step:08d}"


def job_settings(spec: Any, world_size: int) -> dict[str, Any]:
    """The spec settings that decide a job's training trajectory, in wire names.

    Two jobs with equal settings compute the same steps from the same checkpoint, so one
    may resume the other's checkpoints. Only the active method's own settings count.
    """
    def wire(model: Any, *, exclude: set[str] | None = None) -> dict[str, Any]:
        return model.model_dump(mode="json", by_alias=True, exclude=exclude)

    method: dict[str, Any] = {"type": str(spec.method.type)}
    own = getattr(spec.method, str(spec.method.type), None)
    if own is not None and hasattr(own, "model_dump"):
        method[str(spec.method.type)] = wire(own)
    return {
        "model": wire(spec.model, exclude={"trust_remote_code"}),
        "data": wire(spec.data, exclude={"num_workers"}),
        "method": method,
        "training": wire(spec.training, exclude={"save_features"}),
        "deepspeed": wire(spec.deepspeed),
        "worldSize": int(world_size),
    }


def fingerprint(settings: dict[str, Any]) -> str:
    """SHA-256 of `settings` in a canonical JSON form."""
    text = json.dumps(settings, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def _differences(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted wire names whose values differ between two settings dicts."""
    out: list[str] = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        name = f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, name + ".")
        elif a != b:
            out.append(name)
    return out


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


class CheckpointManager:
    """Saves and finds the checkpoints of one job under `<output>/checkpoints/`.

    `rank` and `local_rank` say which process does which upload. `exclude_frozen` leaves
    frozen tower weights out of checkpoints (lora, partial: they come from the preset's
    weights again on resume). `job` is this job's `job_settings`: recorded in every saved
    checkpoint, and required of the checkpoint it resumes from (None: no check, for
    tests of the mechanics only). `barrier` lets tests run it in one process.
    """

    def __init__(
        self,
        storage: Storage,
        output_uri: str,
        local_root: str | Path,
        *,
        keep_last: int,
        rank: int = 0,
        local_rank: int = 0,
        exclude_frozen: bool = False,
        job: dict[str, Any] | None = None,
        barrier: Callable[[], None] = _barrier,
    ) -> None:
        self.storage = storage
        self.root_uri = join_uri(output_uri, "checkpoints")
        self.local_root = Path(local_root)
        self.keep_last = keep_last
        self.rank = rank
        self.local_rank = local_rank
        self.exclude_frozen = exclude_frozen
        self.job = job
        self.fingerprint = fingerprint(job) if job is not None else None
        self.barrier = barrier

    def uri(self, step: int) -> str:
        return join_uri(self.root_uri, tag_for(step))

    def _tags(self) -> tuple[set[int], set[int]]:
        """Steps with a folder under checkpoints/, and those of them that are complete."""
        seen: set[int] = set()
        complete: set[int] = set()
        for obj in self.storage.list(self.root_uri):
            head, _, rest = obj.relpath.partition("/")
            match = _TAG.match(head)
            if not match:
                continue
            step = int(match.group(1))
            seen.add(step)
            if rest == COMPLETE:
                complete.add(step)
        return seen, complete

    def complete_steps(self) -> list[int]:
        """Steps of the complete checkpoints, oldest first."""
        return sorted(self._tags()[1])

    def latest(self) -> int | None:
        """The step of the newest complete checkpoint, or None."""
        steps = self.complete_steps()
        return steps[-1] if steps else None

    def save(self, engine: Any, step: int, client_state: dict[str, Any]) -> str:
        """Save on all ranks, publish, then prune; every rank must call it. Returns the URI."""
        tag = tag_for(step)
        local = self.local_root / tag
        if self.local_rank == 0 and local.exists():
            shutil.rmtree(local)
        self.barrier()
        engine.save_checkpoint(str(self.local_root), tag=tag, client_state=client_state,
                               save_latest=False, exclude_frozen_parameters=self.exclude_frozen)
        self.barrier()
        uri = self.uri(step)
        if self.local_rank == 0 and self.rank != 0:
            self.storage.upload_tree(local, uri, field="output")
        self.barrier()
        if self.rank == 0:
            extra: dict[str, Any] = {"step": step, "tag": tag}
            if self.job is not None:
                extra.update(fingerprint=self.fingerprint, job=self.job)
            self.storage.publish(local, uri, manifest_name=COMPLETE, extra=extra)
            self.prune(step)
            log.info("Saved checkpoint %s.", uri)
        self.barrier()
        if self.local_rank == 0:
            shutil.rmtree(local, ignore_errors=True)
        return uri

    def prune(self, newest: int) -> list[int]:
        """Delete complete checkpoints beyond the last K and incomplete ones older than
        `newest`; return the deleted steps. Called by rank 0 after `newest` is complete."""
        seen, complete = self._tags()
        if newest not in complete:
            return []
        keep = set(sorted(complete)[-self.keep_last:])
        doomed = sorted(s for s in seen if s not in keep and s <= newest)
        for step in doomed:
            self.storage.delete_prefix(self.uri(step), field="output")
        if doomed:
            log.info("Deleted old checkpoints at steps %s.", ", ".join(map(str, doomed)))
        return doomed

    def check_job(self) -> int | None:
        """Refuse the newest complete checkpoint unless this job wrote it; return its step.

        Cheap (one listing and one small read), so a job calls it before building its
        model. Raises UserError naming `output` when the checkpoint records a different
        job fingerprint, or none. Returns None when there is no complete checkpoint.
        """
        step = self.latest()
        if step is None or self.job is None:
            return step
        uri = self.uri(step)
        extra = self.storage.read_published(uri, COMPLETE, field="output").get("extra", {})
        if extra.get("fingerprint") == self.fingerprint:
            return step
        recorded = extra.get("job")
        if isinstance(recorded, dict):
            changed = _differences(recorded, self.job)
            named = ", ".join(changed[:6]) + (", ..." if len(changed) > 6 else "")
            what = f"a different job (settings that differ: {named or 'none named'})"
        else:
            what = ("a different job, or of one whose settings they do not record (written "
                    "by an earlier evaclip version)")
        raise UserError(
            f"spec.output: {self.root_uri} holds checkpoints of {what}, up to step {step}; "
            f"this job cannot resume from them: set spec.output to a new URI, or delete "
            f"{self.root_uri}/ to start this job from scratch there"
        )

    def restore(self, engine: Any) -> dict[str, Any] | None:
        """Load the newest complete checkpoint into `engine` on every rank.

        Returns its client state (with `step` added), or None when there is none. The
        checkpoint must be this job's (`check_job`).
        """
        step = self.check_job()
        if step is None:
            return None
        tag = tag_for(step)
        fetched = self.storage.fetch_tree(self.uri(step), field="output")
        # DeepSpeed wants <load_dir>/<tag>/...; point a per-rank folder at the fetched copy.
        load_dir = self.local_root / f"restore-rank{self.rank}"
        shutil.rmtree(load_dir, ignore_errors=True)
        load_dir.mkdir(parents=True)
        (load_dir / tag).symlink_to(Path(fetched).resolve(), target_is_directory=True)
        path, client_state = engine.load_checkpoint(
            str(load_dir), tag=tag, load_module_strict=not self.exclude_frozen
        )
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load checkpoint {self.uri(step)}")
        state = dict(client_state or {})
        state.setdefault("step", step)
        log.info("Resumed from checkpoint %s at step %d.", self.uri(step), state["step"])
        return state
