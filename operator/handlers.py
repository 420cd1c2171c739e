"""The kopf handlers of the operator, and the reconciler they delegate to.

Handlers are a few lines each; `Reconciler` holds the logic:

* create / resume / update of an EvaClipFinetune -> `Reconciler.reconcile`: validate with
  the same models as the trainer, render, create the ConfigMap and the job (adopting
  ones that exist already), apply `spec.suspend`, reject other spec changes, and write
  the status.
* any event of a job we manage -> `Reconciler.job_changed`: mirror the job's conditions
  into the owner's status (or mark it Failed when the job was deleted by someone else).

Two writers touch the same status (both handlers), so each resource has a lock and both
read the status fresh before writing it; conditions are written as a whole list. The
trainer's rank 0 writes `progress`, `metrics` and `artifacts`, keys the operator never
writes, so a JSON merge patch from either side leaves the other's keys alone.

All handlers are synchronous on purpose: kopf runs them in a thread pool, where the
blocking `kubernetes` client calls cannot freeze the event loop.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import kopf
from kubernetes.client.exceptions import ApiException

from evaclip.errors import SpecError, UserError
from evaclip.manifest import parse_resource
from evaclip.operator import render
from evaclip.operator import status as st
from evaclip.operator.kube import Kube
from evaclip.operator.launcher import (
    ANNOTATION_SUSPEND,
    LAUNCHERS,
    Launcher,
    LauncherUnavailable,
    NotOwned,
    owned_by,
)
from evaclip.operator.metrics import OperatorMetrics
from evaclip.operator.settings import OperatorConfig
from evaclip.spec import GROUP, PLURAL, VERSION, EvaClipFinetune

log = logging.getLogger("evaclip.operator")


def _reason(err: Exception) -> str:
    if isinstance(err, SpecError):
        return "InvalidSpec"
    if isinstance(err, NotOwned):
        return "NameConflict"
    return getattr(err, "reason", "InvalidSpec")


def _require_fit(resource: EvaClipFinetune, config: OperatorConfig) -> None:
    """Run the memory planner's fit check when enabled (raises UserError)."""
    if not config.checks_plan:
        return
    try:
        from evaclip.plan import require_fit
    except ImportError:
        return
    try:
        require_fit(resource)
    except UserError as err:
        if not getattr(err, "reason", None):
            err.reason = "PlanDoesNotFit"  # type: ignore[attr-defined]
        raise


class Reconciler:
    """Turns observed state into children and status; shared by all handlers."""

    def __init__(
        self,
        kube: Kube,
        launcher: Launcher,
        config: OperatorConfig,
        metrics: OperatorMetrics,
        restart: Callable[[str], None] | None = None,
    ) -> None:
        self.kube = kube
        self.launcher = launcher
        self.config = config
        self.metrics = metrics
        self.restart = restart
        self._locks: dict[tuple[str, str], threading.Lock] = collections.defaultdict(
            threading.Lock
        )
        self._guard = threading.Lock()

    def lock(self, namespace: str, name: str) -> threading.Lock:
        with self._guard:
            return self._locks[(namespace, name)]

    # --- status I/O -----------------------------------------------------------------------

    def read(self, namespace: str, name: str) -> dict[str, Any] | None:
        return self.kube.get_custom(GROUP, VERSION, PLURAL, namespace, name)

    def write_status(
        self, namespace: str, name: str, current: dict[str, Any], patch: dict[str, Any]
    ) -> None:
        if st.changed(current, patch):
            self.kube.patch_custom_status(GROUP, VERSION, PLURAL, namespace, name, patch)
            self._count_transition(current.get("phase"), patch)

    def _count_transition(self, before: str | None, patch: dict[str, Any]) -> None:
        after = patch.get("phase")
        if after == before:
            return
        if after == "Succeeded":
            self.metrics.jobs_succeeded.inc()
        elif after == "Failed":
            reason = next(
                (c["reason"] for c in patch.get("conditions", []) if c.get("status") == "False"
                 and c.get("type") in st.OWN_CONDITIONS),
                "JobFailed",
            )
            self.metrics.jobs_failed.labels(reason=reason).inc()

    # --- create / resume / update ---------------------------------------------------------

    def reconcile(self, body: dict[str, Any], *, fresh: bool) -> None:
        """Bring children and status in line with the resource; `fresh`: status may be stale.

        Raises kopf.PermanentError for the user's mistakes (after reporting them on the
        resource) and kopf.TemporaryError when the job API is missing.
        """
        meta = body["metadata"]
        namespace, name = meta.get("namespace", "default"), meta["name"]
        if meta.get("deletionTimestamp"):
            return
        with self.lock(namespace, name):
            current = body.get("status") or {}
            if fresh:
                latest = self.read(namespace, name)
                if latest is None:
                    return
                current = latest.get("status") or {}
            self._reconcile_locked(body, current, look_up=fresh)

    def _reconcile_locked(
        self, body: dict[str, Any], current: dict[str, Any], *, look_up: bool
    ) -> None:
        meta = body["metadata"]
        namespace, name = meta.get("namespace", "default"), meta["name"]
        generation = meta.get("generation")
        created_before = (st.condition(current.get("conditions") or [], "JobCreated") or {}).get(
            "status"
        ) == "True"
        try:
            resource = parse_resource(body)
            _require_fit(resource, self.config)
            owner = render.owner_reference(name, meta["uid"])
            objects = self.launcher.render(resource, self.config, owner=owner)
        except UserError as err:
            self._reject(body, current, err, job_exists=created_before)
            raise kopf.PermanentError(str(err)) from None

        try:
            # A new resource has no job yet: create at once, and adopt on AlreadyExists (an
            # earlier run that stopped midway). Otherwise look the job up by name first.
            self.launcher.check_available()
            job = self.launcher.get(namespace, name) if look_up or created_before else None
        except LauncherUnavailable as err:
            self._launcher_unavailable(body, current, err, generation)
            raise kopf.TemporaryError(str(err), delay=self.config.launcher_retry_seconds) from None
        if self.launcher.appeared_after_start and not_scanning(self.config) and self.restart:
            # kopf watches only the APIs it found at start-up when it does not scan CRDs.
            self.restart(f"the {self.launcher.api_name} API appeared after start-up")

        conditions = current.get("conditions") or []
        conditions = st.set_condition(
            conditions, "Valid", "True", "Validated", "The spec is valid."
        )
        if job is None and created_before:
            self._job_gone(body, current)
            return
        if job is None:
            try:
                job, created = self.launcher.create(objects, uid=meta["uid"])
            except NotOwned as err:
                self._reject(body, current, err, job_exists=False)
                raise kopf.PermanentError(str(err)) from None
            except ApiException as err:
                if err.status not in (400, 403, 422):
                    raise
                self._api_refused(body, current, err)
                raise
            if created:
                self.metrics.jobs_created.inc()
                kopf.info(body, reason="JobCreated", message=(
                    f"Created {self.launcher.kind} {name} and ConfigMap "
                    f"{render.config_map_name(name)}."
                ))
        elif not owned_by(job, meta["uid"]):
            err = NotOwned(
                f"metadata.name: {self.launcher.kind} {namespace}/{name} already exists and "
                "belongs to something else; delete it or give this EvaClipFinetune another name"
            )
            self._reject(body, current, err, job_exists=False)
            raise kopf.PermanentError(str(err))
        else:
            job = self._apply_suspend(body, resource, job)
        conditions = st.set_condition(
            conditions, "JobCreated", "True", "Created",
            f"{self.launcher.kind} {name} runs the training.",
        )
        conditions = self._spec_applied(body, resource, job, conditions)
        state = self.launcher.observe(job, user_suspended=resource.spec.suspend)
        patch = st.from_job({**current, "conditions": conditions}, state, generation=generation)
        patch.update(jobName=render.job_name(name), configMapName=render.config_map_name(name))
        self.write_status(namespace, name, current, patch)

    def _apply_suspend(
        self, body: dict[str, Any], resource: EvaClipFinetune, job: dict[str, Any]
    ) -> dict[str, Any]:
        """Suspend or resume the job when spec.suspend differs from what we last asked."""
        wanted = resource.spec.suspend
        asked = (job["metadata"].get("annotations") or {}).get(ANNOTATION_SUSPEND)
        if asked == str(wanted).lower():
            return job
        meta = body["metadata"]
        job = self.launcher.set_suspended(meta.get("namespace", "default"), meta["name"], wanted)
        if wanted:
            kopf.info(body, reason="Suspended", message="Suspended the job; its pods stop.")
        else:
            kopf.info(body, reason="Resumed", message=(
                "Resumed the job; training continues from its last checkpoint."
            ))
        return job

    def _spec_applied(
        self,
        body: dict[str, Any],
        resource: EvaClipFinetune,
        job: dict[str, Any],
        conditions: list[dict[str, Any]],
    ) -> list[dict[str, Any]]:
        """Condition SpecApplied: whether the running job was made from the current spec."""
        ran = (job["metadata"].get("annotations") or {}).get(render.ANNOTATION_SPEC_HASH)
        if ran in (None, render.spec_hash(resource)):
            return st.set_condition(
                conditions, "SpecApplied", "True", "Applied", "The job runs the current spec."
            )
        generation = body["metadata"].get("generation")
        message = (
            f"spec changed after the job was created (generation {generation}); only "
            "spec.suspend can change a created job, which keeps its original spec. Revert "
            "the change, or delete and re-create the EvaClipFinetune to run the new spec."
        )
        previous = st.condition(conditions, "SpecApplied") or {}
        if previous.get("message") != message:
            kopf.warn(body, reason="SpecChangeRejected", message=message)
        return st.set_condition(conditions, "SpecApplied", "False", "SpecChangeRejected", message)

    def _reject(
        self, body: dict[str, Any], current: dict[str, Any], err: Exception, *, job_exists: bool
    ) -> None:
        """Report a user's mistake: a Warning event and a False condition naming the field."""
        meta = body["metadata"]
        namespace, name = meta.get("namespace", "default"), meta["name"]
        reason, message = _reason(err), str(err)
        said = [(c.get("reason"), c.get("message")) for c in current.get("conditions") or []]
        if (reason, message) not in said:  # once, not again on every operator restart
            kopf.warn(body, reason=reason, message=message)
        if job_exists:
            # The job keeps running what it was created from; only the condition says no.
            conditions = st.set_condition(
                current.get("conditions") or [], "SpecApplied", "False", reason, message
            )
            patch = {"conditions": conditions, "observedGeneration": meta.get("generation")}
        else:
            patch = st.failed(
                current, condition_type="Valid", reason=reason, message=message,
                generation=meta.get("generation"),
            )
        self.write_status(namespace, name, current, patch)

    def _api_refused(self, body: dict[str, Any], current: dict[str, Any], err: Any) -> None:
        """The API server refused a child: a policy (admission) or missing permissions."""
        meta = body["metadata"]
        detail = _api_message(err)
        if err.status == 403:
            reason = "Forbidden"
            message = (f"The operator may not create the job's objects ({detail}); check its "
                       "RBAC. Retrying.")
            patch: dict[str, Any] = {"phase": "Pending", "message": message}
        else:
            reason = "JobRejected"
            message = f"The API server refused the job's objects: {detail}"
            patch = {"phase": "Failed", "message": message}
        previous = st.condition(current.get("conditions") or [], "JobCreated") or {}
        if previous.get("message") != message:
            kopf.warn(body, reason=reason, message=message)
        patch["conditions"] = st.set_condition(
            current.get("conditions") or [], "JobCreated", "False", reason, message
        )
        self.write_status(meta.get("namespace", "default"), meta["name"], current, patch)

    def _launcher_unavailable(
        self, body: dict[str, Any], current: dict[str, Any], err: Exception,
        generation: int | None,
    ) -> None:
        meta = body["metadata"]
        message = (
            f"{str(err)[0].upper()}{str(err)[1:]}; retrying every "
            f"{self.config.launcher_retry_seconds:g} s."
        )
        previous = st.condition(current.get("conditions") or [], "JobCreated") or {}
        if previous.get("reason") != "LauncherUnavailable":
            kopf.warn(body, reason="LauncherUnavailable", message=message)
        conditions = st.set_condition(
            current.get("conditions") or [], "JobCreated", "False", "LauncherUnavailable", message
        )
        patch = {"phase": "Pending", "message": message, "conditions": conditions}
        if generation is not None:
            patch["observedGeneration"] = generation
        self.write_status(meta.get("namespace", "default"), meta["name"], current, patch)

    def _job_gone(self, owner: dict[str, Any], current: dict[str, Any]) -> None:
        """The job disappeared without its owner being deleted."""
        meta = owner["metadata"]
        namespace, name = meta.get("namespace", "default"), meta["name"]
        if current.get("phase") in st.FINAL_PHASES:
            # A finished job is removed by its TTL (runPolicy.ttlSecondsAfterFinished).
            return
        message = (
            f"{self.launcher.kind} {name} was deleted while the training ran; the operator "
            "does not re-create it. Delete and re-apply this EvaClipFinetune to train again."
        )
        kopf.warn(owner, reason="JobDeleted", message=message)
        conditions = st.set_condition(
            current.get("conditions") or [], "JobCreated", "False", "JobDeleted", message
        )
        patch = {"phase": "Failed", "message": message, "conditions": conditions}
        self.write_status(namespace, name, current, patch)

    # --- job events -----------------------------------------------------------------------

    def job_changed(self, event_type: str | None, job: dict[str, Any]) -> None:
        """Mirror one observed job event into its owner's status."""
        meta = job.get("metadata", {})
        namespace = meta.get("namespace", "default")
        name = (meta.get("labels") or {}).get(render.LABEL_FINETUNE)
        if not name:
            return
        if event_type == "ADDED" and not job.get("status"):
            return  # just created: the create handler wrote the status it implies
        with self.lock(namespace, name):
            owner = self.read(namespace, name)
            if owner is None or owner["metadata"].get("deletionTimestamp"):
                return
            if not owned_by(job, owner["metadata"].get("uid", "")):
                return  # left over from an earlier resource of the same name
            current = owner.get("status") or {}
            if event_type == "DELETED":
                self._job_gone(owner, current)
                return
            user_suspended = bool((owner.get("spec") or {}).get("suspend"))
            state = self.launcher.observe(job, user_suspended=user_suspended)
            patch = st.from_job(current, state, generation=None)
            if st.changed(current, patch) and state.phase != current.get("phase"):
                self._announce(owner, state)
            self.write_status(namespace, name, current, patch)

    def _announce(self, owner: dict[str, Any], state: st.JobState) -> None:
        text = f"Phase {state.phase}" + (f": {state.message}" if state.message else ".")
        if state.phase == "Failed":
            kopf.warn(owner, reason=state.reason or "Failed", message=text)
        else:
            kopf.info(owner, reason=state.reason or state.phase, message=text)


def not_scanning(config: OperatorConfig) -> bool:
    """Whether kopf serves only what it found at start-up (named namespaces)."""
    return bool(config.namespaces) and not config.all_namespaces


def _api_message(err: Any) -> str:
    """The message of a Kubernetes Status in an ApiException's body, else its reason."""
    import json

    try:
        return str(json.loads(err.body).get("message")) or str(err.reason)
    except (TypeError, ValueError, AttributeError):
        return str(err.reason)


def _retrying(fn: Callable[[], None], attempts: int = 3, delay: float = 0.5) -> None:
    """Run a status mirror a few times: event handlers are not retried by kopf."""
    for attempt in range(attempts):
        try:
            fn()
            return
        except ApiException as err:
            if attempt == attempts - 1 or (400 <= err.status < 500 and err.status != 409):
                raise
            time.sleep(delay * 2**attempt)


def _temporary(err: Exception, config: OperatorConfig) -> kopf.TemporaryError:
    return kopf.TemporaryError(f"API call failed, retrying: {err}", delay=config.api_retry_seconds)


def build_registry(
    config: OperatorConfig,
    metrics: OperatorMetrics,
    kube_factory: Callable[[], Kube] | None = None,
    restart: Callable[[str], None] | None = None,
) -> kopf.OperatorRegistry:
    """All handlers, registered on a registry of their own (no import-time globals).

    `restart(why)` is called when the operator must start again to serve a job API that
    appeared after it started (only when it does not scan CRDs; see configure_kopf).
    """
    registry = kopf.OperatorRegistry()
    launcher_cls = LAUNCHERS[config.launcher]
    state: dict[str, Reconciler] = {}
    expected = (kopf.PermanentError,)

    def reconciler() -> Reconciler:
        if "r" not in state:
            kube = kube_factory() if kube_factory else Kube(pool_size=config.max_workers + 4)
            state["r"] = Reconciler(
                kube, launcher_cls(kube, config), config, metrics, restart=restart
            )
        return state["r"]

    @kopf.on.login(id="login", registry=registry)
    def login(**kwargs: Any) -> Any:
        return kopf.login_via_client(**kwargs)

    @kopf.on.startup(id="warm-up", registry=registry)
    def warm_up(logger: Any, **_: Any) -> None:
        # Load the API classes now (about 2 s), not while the first resource waits.
        from kubernetes.client import CoreV1Api, CustomObjectsApi  # noqa: F401

        if config.checks_plan:
            # Where torch is installed the planner builds meta towers (seconds to import);
            # elsewhere it reads the committed shape table. Load it before the first resource.
            logger.info("Loading the memory planner for fit checks.")
            import evaclip.plan  # noqa: F401
        else:
            logger.info("Memory-fit checks are off (EVACLIP_PLAN_CHECK=off).")

    def run(body: Any, *, fresh: bool, handler: str) -> None:
        with metrics.timed(handler, expected):
            try:
                reconciler().reconcile(dict(body), fresh=fresh)
            except ApiException as err:
                if err.status in (400, 422):
                    raise kopf.PermanentError(
                        f"API refused the request: {_api_message(err)}"
                    ) from None
                raise _temporary(err, config) from None

    common = dict(registry=registry, retries=None, backoff=config.api_retry_seconds)

    @kopf.on.create(GROUP, VERSION, PLURAL, id="create", **common)
    def create_fn(body: kopf.Body, **_: Any) -> None:
        run(body, fresh=False, handler="create")

    @kopf.on.resume(GROUP, VERSION, PLURAL, id="resume", **common)
    def resume_fn(body: kopf.Body, **_: Any) -> None:
        run(body, fresh=True, handler="resume")

    @kopf.on.update(GROUP, VERSION, PLURAL, id="update", **common)
    def update_fn(body: kopf.Body, **_: Any) -> None:
        run(body, fresh=True, handler="update")

    @kopf.on.event(
        launcher_cls.group, launcher_cls.version, launcher_cls.plural,
        labels={render.LABEL_MANAGED_BY: render.MANAGED_BY}, id="job-event", registry=registry,
    )
    def job_event_fn(type: str | None, body: kopf.Body, **_: Any) -> None:
        with metrics.timed("job_event"):
            job = dict(body)
            _retrying(lambda: reconciler().job_changed(type, job))

    return registry


def configure_kopf(settings: kopf.OperatorSettings, config: OperatorConfig) -> None:
    """Kopf settings for production: explicit timeouts, annotations-only bookkeeping."""
    prefix = GROUP
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=prefix)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix=prefix)
    settings.persistence.finalizer = f"{prefix}/finalizer"
    settings.posting.reporting_component = "evaclip-operator"
    settings.posting.event_name_prefix = "evaclip-"
    settings.posting.level = logging.INFO
    # A watch that silently stops is the most reported kopf failure: bound every stream.
    settings.watching.server_timeout = config.watch_server_timeout
    settings.watching.client_timeout = config.watch_client_timeout
    settings.watching.connect_timeout = config.watch_connect_timeout
    settings.networking.request_timeout = 60.0
    settings.networking.connect_timeout = config.watch_connect_timeout
    settings.execution.max_workers = config.max_workers
    # Watching named namespaces, kopf would list all namespaces to match them, which a
    # namespaced Role refuses (kopf then retries for about a minute before it starts).
    # The names are exact, so serve them as given. That also stops kopf from watching
    # CRDs: when the job API appears later, the operator restarts itself to serve it.
    settings.scanning.disabled = not_scanning(config)
