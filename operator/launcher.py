"""Launchers: how an EvaClipFinetune becomes a running training job on some job API.

The handlers only ever talk to a `Launcher`, so a second backend (for example Kubeflow
Trainer v2's `TrainJob`) is one more subclass registered in `LAUNCHERS`, with no change
to the handlers: it says which API it uses (`group`, `version`, `plural`), renders its
objects, and translates its job's status into a launcher-neutral `JobState`.

`PyTorchJobLauncher` is the first backend: a `kubeflow.org/v1` PyTorchJob (training
operator v1.9) plus the ConfigMap with the trainer config.
"""

from __future__ import annotations

import abc
import threading
import time
from typing import Any, ClassVar

from evaclip.errors import UserError
from evaclip.operator import render
from evaclip.operator.kube import Kube
from evaclip.operator.settings import OperatorConfig, RemoteCodeNotAllowed
from evaclip.operator.status import JobState, job_phase
from evaclip.spec import EvaClipFinetune


class LauncherUnavailable(Exception):
    """The cluster does not serve the job API this launcher needs (its CRD is missing)."""


class NotOwned(UserError):
    """An object with our deterministic name exists but belongs to someone else."""


def owned_by(obj: dict[str, Any], uid: str) -> bool:
    refs = obj.get("metadata", {}).get("ownerReferences") or []
    return any(r.get("uid") == uid and r.get("controller") for r in refs)


class Launcher(abc.ABC):
    """The small interface the handlers use; one subclass per job API."""

    kind: ClassVar[str]
    group: ClassVar[str]
    version: ClassVar[str]
    plural: ClassVar[str]
    availability_ttl: ClassVar[float] = 300.0

    def __init__(self, kube: Kube, config: OperatorConfig) -> None:
        self.kube = kube
        self.config = config
        self._available_until = 0.0
        self._lock = threading.Lock()
        self._seen_missing = False
        # Set once the job API is served after this process found it missing.
        self.appeared_after_start = False

    @property
    def api_name(self) -> str:
        return f"{self.group}/{self.version} {self.kind}"

    # --- what backends provide ------------------------------------------------------------

    @abc.abstractmethod
    def render_job(
        self, resource: EvaClipFinetune, image: str, owner: dict[str, Any]
    ) -> dict[str, Any]:
        """The job object for a resource whose platform defaults are already applied."""

    @abc.abstractmethod
    def observe(self, job: dict[str, Any], *, user_suspended: bool) -> JobState:
        """The job's phase, conditions and times in launcher-neutral terms."""

    @abc.abstractmethod
    def suspend_patch(self, suspended: bool) -> dict[str, Any]:
        """The merge patch that suspends or resumes the job."""

    @abc.abstractmethod
    def is_suspended(self, job: dict[str, Any]) -> bool:
        """Whether the job's spec asks for suspension."""

    # --- shared behaviour -----------------------------------------------------------------

    def render(
        self, resource: EvaClipFinetune, config: OperatorConfig, *, owner: dict[str, Any]
    ) -> list[dict[str, Any]]:
        """Every object a resource runs as, the job last (it needs the others)."""
        image = config.image_for(resource.spec.runtime.image)
        if resource.spec.model.trust_remote_code and not config.allow_remote_code:
            raise RemoteCodeNotAllowed(
                "spec.model.trustRemoteCode: got true; this platform does not allow remote "
                "model code (ask the platform team, or set it to false)"
            )
        config.check_buckets(resource.namespace, resource.spec)
        effective = render.with_platform_defaults(resource, config)
        digest = render.spec_hash(resource)
        cm = render.config_map(effective, owner)
        job = self.render_job(effective, image, owner)
        for obj in (cm, job):
            obj["metadata"]["annotations"][render.ANNOTATION_SPEC_HASH] = digest
        return [cm, job]

    def check_available(self) -> None:
        """Raise LauncherUnavailable unless the cluster serves the job API (cached)."""
        if time.monotonic() < self._available_until:
            return
        with self._lock:
            if time.monotonic() < self._available_until:
                return
            if not self.kube.serves(self.group, self.version, self.plural):
                self._seen_missing = True
                raise LauncherUnavailable(
                    f"the cluster serves no {self.api_name} API ({self.plural}.{self.group} "
                    f"{self.version}); install its CRD and controller"
                )
            self._available_until = time.monotonic() + self.availability_ttl
            self.appeared_after_start = self._seen_missing

    def forget_availability(self) -> None:
        self._available_until = 0.0

    def get(self, namespace: str, name: str) -> dict[str, Any] | None:
        self.check_available()
        return self.kube.get_custom(
            self.group, self.version, self.plural, namespace, render.job_name(name)
        )

    def create(self, objects: list[dict[str, Any]], *, uid: str) -> tuple[dict[str, Any], bool]:
        """Create the objects in order, adopting ones we created before; (job, created).

        A ConfigMap left by an earlier run is brought up to date only when the job is new
        here: an adopted job keeps reading the config it was created with.
        """
        from kubernetes.client.exceptions import ApiException

        self.check_available()
        *others, job = objects
        stale = [obj for obj in others if not self._create_config_map(obj, uid)]
        try:
            created = self.kube.create_custom(self.group, self.version, self.plural, job)
        except ApiException as err:
            if err.status == 404:
                self.forget_availability()
            if err.status != 409:
                raise
        else:
            for obj in stale:
                meta = obj["metadata"]
                self.kube.patch_config_map(
                    meta["namespace"], meta["name"],
                    {"data": obj["data"], "metadata": {"annotations": meta["annotations"]}},
                )
            return created, True
        meta = job["metadata"]
        existing = self.kube.get_custom(
            self.group, self.version, self.plural, meta["namespace"], meta["name"]
        )
        if existing is None:  # deleted between the conflict and the read: try once more
            return self.kube.create_custom(self.group, self.version, self.plural, job), True
        self._check_owned(existing, uid)
        return existing, False

    def _create_config_map(self, obj: dict[str, Any], uid: str) -> bool:
        """Create the ConfigMap; False when ours exists already with other data."""
        from kubernetes.client.exceptions import ApiException

        try:
            self.kube.create_config_map(obj)
            return True
        except ApiException as err:
            if err.status != 409:
                raise
        meta = obj["metadata"]
        existing = self.kube.get_config_map(meta["namespace"], meta["name"])
        if existing is None:
            self.kube.create_config_map(obj)
            return True
        self._check_owned(existing, uid)
        return existing.get("data") == obj["data"]

    def _check_owned(self, obj: dict[str, Any], uid: str) -> None:
        if not owned_by(obj, uid):
            meta = obj["metadata"]
            raise NotOwned(
                f"metadata.name: {obj.get('kind', 'object')} {meta.get('namespace')}/"
                f"{meta.get('name')} already exists and belongs to something else; delete it "
                "or give this EvaClipFinetune another name"
            )

    def set_suspended(self, namespace: str, name: str, suspended: bool) -> dict[str, Any]:
        patch = self.suspend_patch(suspended)
        patch.setdefault("metadata", {}).setdefault("annotations", {})[
            ANNOTATION_SUSPEND
        ] = str(suspended).lower()
        return self.kube.patch_custom(
            self.group, self.version, self.plural, namespace, render.job_name(name), patch
        )

    def suspend(self, namespace: str, name: str) -> dict[str, Any]:
        return self.set_suspended(namespace, name, True)

    def resume(self, namespace: str, name: str) -> dict[str, Any]:
        return self.set_suspended(namespace, name, False)

    def delete(self, namespace: str, name: str) -> bool:
        """Delete the job and its config (garbage collection normally does this)."""
        gone = self.kube.delete_custom(
            self.group, self.version, self.plural, namespace, render.job_name(name)
        )
        self.kube.delete_config_map(namespace, render.config_map_name(name))
        return gone


# The suspension the operator last asked for, kept on the job: the operator acts only when
# spec.suspend differs from it, so it never fights Kueue, which suspends jobs itself.
ANNOTATION_SUSPEND = "training.evaclip.io/suspend"


class PyTorchJobLauncher(Launcher):
    """Kubeflow training operator v1.9: `kubeflow.org/v1` PyTorchJob."""

    kind = "PyTorchJob"
    group = "kubeflow.org"
    version = "v1"
    plural = "pytorchjobs"

    def render_job(
        self, resource: EvaClipFinetune, image: str, owner: dict[str, Any]
    ) -> dict[str, Any]:
        job = render.pytorch_job(resource, self.config, image, owner)
        job["metadata"]["annotations"][ANNOTATION_SUSPEND] = str(resource.spec.suspend).lower()
        return job

    def observe(self, job: dict[str, Any], *, user_suspended: bool) -> JobState:
        status = job.get("status") or {}
        conditions = tuple(status.get("conditions") or ())
        labels = job.get("metadata", {}).get("labels") or {}
        phase, reason, message = job_phase(
            conditions,
            suspended=self.is_suspended(job),
            user_suspended=user_suspended,
            queued=render.LABEL_QUEUE in labels,
        )
        return JobState(
            phase=phase,
            conditions=conditions,
            start_time=status.get("startTime"),
            completion_time=status.get("completionTime"),
            message=message,
            reason=reason,
        )

    def suspend_patch(self, suspended: bool) -> dict[str, Any]:
        return {"spec": {"runPolicy": {"suspend": suspended}}}

    def is_suspended(self, job: dict[str, Any]) -> bool:
        return bool(job.get("spec", {}).get("runPolicy", {}).get("suspend"))


LAUNCHERS: dict[str, type[Launcher]] = {"pytorchjob": PyTorchJobLauncher}


def make_launcher(kube: Kube, config: OperatorConfig) -> Launcher:
    try:
        cls = LAUNCHERS[config.launcher]
    except KeyError:
        raise UserError(
            f"EVACLIP_LAUNCHER: got {config.launcher!r}; use one of {', '.join(LAUNCHERS)}"
        ) from None
    return cls(kube, config)
