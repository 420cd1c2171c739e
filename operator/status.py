"""The status of an EvaClipFinetune: its phase and conditions, from what was observed.

Pure functions: the handlers feed them the observed job state and the current status,
and write back what they return (through kopf's `patch.status` or a status-subresource
patch). The phase follows the job's conditions whose status is "True":

    Succeeded or Failed          -> Succeeded / Failed (they win over everything)
    Suspended, spec.suspend      -> Suspended
    suspended by Kueue, queued   -> Queued (the job carries a queue-name label and the
                                    user did not ask for suspension)
    Running or Restarting        -> Running
    Created only, or nothing yet -> Pending

Conditions of our own (`Valid`, `JobCreated`, `SpecApplied`) sit beside copies of the
job's conditions (`Created`, `Running`, `Restarting`, `Succeeded`, `Failed`,
`Suspended`), so `kubectl describe` tells the whole story in one place.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

OWN_CONDITIONS = ("Valid", "JobCreated", "SpecApplied")
JOB_CONDITIONS = ("Created", "Running", "Restarting", "Succeeded", "Failed", "Suspended")
FINAL_PHASES = ("Succeeded", "Failed")


def now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclasses.dataclass(frozen=True)
class JobState:
    """What a launcher observed about its job, in launcher-neutral terms."""

    phase: str
    conditions: tuple[dict[str, Any], ...] = ()
    start_time: str | None = None
    completion_time: str | None = None
    message: str = ""
    reason: str = ""


def _true(conditions: Iterable[Mapping[str, Any]]) -> dict[str, Mapping[str, Any]]:
    return {c.get("type", ""): c for c in conditions if c.get("status") == "True"}


def job_phase(
    conditions: Iterable[Mapping[str, Any]],
    *,
    suspended: bool = False,
    user_suspended: bool = False,
    queued: bool = False,
) -> tuple[str, str, str]:
    """(phase, reason, message) from job conditions; see the module docstring."""
    true = _true(conditions)
    for kind in FINAL_PHASES:
        if kind in true:
            c = true[kind]
            return kind, c.get("reason") or kind, c.get("message") or ""
    if suspended or "Suspended" in true:
        c = true.get("Suspended", {})
        if queued and not user_suspended:
            return "Queued", "WaitingForAdmission", "The job waits for its queue to admit it."
        return "Suspended", c.get("reason") or "Suspended", c.get("message") or (
            "The job is suspended; set spec.suspend to false to resume it."
        )
    if "Restarting" in true:
        c = true["Restarting"]
        return "Running", c.get("reason") or "Restarting", c.get("message") or "Restarting."
    if "Running" in true:
        c = true["Running"]
        return "Running", c.get("reason") or "Running", c.get("message") or ""
    if "Created" in true:
        c = true["Created"]
        return "Pending", c.get("reason") or "Created", c.get("message") or (
            "The job is created and waits for its pods."
        )
    return "Pending", "JobPending", "The job is submitted and waits for the training operator."


def set_condition(
    conditions: Iterable[Mapping[str, Any]],
    type_: str,
    status: str,
    reason: str,
    message: str = "",
    *,
    at: str | None = None,
) -> list[dict[str, Any]]:
    """Conditions with one set or replaced; the transition time moves only on a change."""
    out: list[dict[str, Any]] = []
    previous = None
    for c in conditions:
        if c.get("type") == type_:
            previous = c
        else:
            out.append(dict(c))
    when = at or now()
    if previous is not None and previous.get("status") == status:
        when = previous.get("lastTransitionTime") or when
    out.append(
        {
            "type": type_,
            "status": status,
            "reason": reason,
            "message": message,
            "lastTransitionTime": when,
        }
    )
    return _ordered(out)


def merge_job_conditions(
    conditions: Iterable[Mapping[str, Any]], job_conditions: Iterable[Mapping[str, Any]]
) -> list[dict[str, Any]]:
    """Our own conditions, followed by fresh copies of the job's conditions."""
    own = [dict(c) for c in conditions if c.get("type") not in JOB_CONDITIONS]
    copied = []
    for c in job_conditions:
        if c.get("type") not in JOB_CONDITIONS:
            continue
        entry = {
            "type": c["type"],
            "status": c.get("status", "Unknown"),
            "reason": c.get("reason") or "",
            "message": c.get("message") or "",
        }
        when = c.get("lastTransitionTime") or c.get("lastUpdateTime")
        if when:
            entry["lastTransitionTime"] = when
        copied.append(entry)
    return _ordered(own + copied)


def _ordered(conditions: list[dict[str, Any]]) -> list[dict[str, Any]]:
    order = {t: i for i, t in enumerate(OWN_CONDITIONS + JOB_CONDITIONS)}
    return sorted(conditions, key=lambda c: order.get(c.get("type", ""), len(order)))


def condition(conditions: Iterable[Mapping[str, Any]], type_: str) -> Mapping[str, Any] | None:
    for c in conditions:
        if c.get("type") == type_:
            return c
    return None


def failed(
    current: Mapping[str, Any],
    *,
    condition_type: str,
    reason: str,
    message: str,
    generation: int | None,
) -> dict[str, Any]:
    """A status patch for a resource that cannot run until its manifest is fixed."""
    conditions = set_condition(
        current.get("conditions") or [], condition_type, "False", reason, message
    )
    return _with_generation(
        {"phase": "Failed", "message": message, "conditions": conditions}, generation
    )


def from_job(
    current: Mapping[str, Any], state: JobState, *, generation: int | None
) -> dict[str, Any]:
    """A status patch that mirrors the observed job into the resource status."""
    conditions = merge_job_conditions(current.get("conditions") or [], state.conditions)
    patch: dict[str, Any] = {
        "phase": state.phase,
        "message": state.message,
        "conditions": conditions,
        "startTime": state.start_time,
        "completionTime": state.completion_time,
    }
    return _with_generation(patch, generation)


def _with_generation(patch: dict[str, Any], generation: int | None) -> dict[str, Any]:
    if generation is not None:
        patch["observedGeneration"] = generation
    return patch


def changed(current: Mapping[str, Any], patch: Mapping[str, Any]) -> bool:
    """Whether applying the merge patch would change anything (to skip no-op writes)."""
    for key, value in patch.items():
        old = current.get(key)
        if isinstance(value, Mapping) and isinstance(old, Mapping):
            if changed(old, value):
                return True
        elif old != value:
            return True
    return False
