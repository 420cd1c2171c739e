"""What a platform team configures about the operator, read from the environment.

Every setting has an environment variable (the Helm chart sets them on the operator's
Deployment) and the few that differ per run also have a command-line flag
(`evaclip operator --help`). User manifests can only choose among what these allow:
the trainer image must match `allowed_images`, remote model code needs
`allow_remote_code`, and unset storage fields fall back to the defaults here.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import re
from collections.abc import Mapping
from typing import Any

from evaclip.errors import UserError
from evaclip.spec import DEFAULT_TRAINER_IMAGE

ENV_PREFIX = "EVACLIP_"


class ImageNotAllowed(UserError):
    """The manifest asks for a trainer image the platform does not allow."""

    reason = "ImageNotAllowed"


class RemoteCodeNotAllowed(UserError):
    """The manifest asks for remote model code the platform does not allow."""

    reason = "RemoteCodeNotAllowed"


class BucketNotAllowed(UserError):
    """The manifest reads or writes a bucket its namespace may not use."""

    reason = "BucketNotAllowed"


# The fields of a manifest that name object storage, checked against `allowed_buckets`.
URI_FIELDS = (("data.train", "spec.data.train"), ("data.validation", "spec.data.validation"),
              ("model.weights", "spec.model.weights"), ("output", "spec.output"))


@dataclasses.dataclass(frozen=True)
class OperatorConfig:
    """The operator's configuration; see docs/operator.md for each variable."""

    trainer_image: str = DEFAULT_TRAINER_IMAGE
    # Glob patterns (fnmatch) of images a manifest may ask for; empty allows only the default.
    allowed_images: tuple[str, ...] = ()
    trainer_service_account: str | None = None
    default_s3_endpoint: str | None = None
    default_s3_region: str | None = None
    default_credentials_secret: str | None = None
    gpu_resource: str = "nvidia.com/gpu"
    default_node_selector: Mapping[str, str] = dataclasses.field(default_factory=dict)
    default_tolerations: tuple[Mapping[str, Any], ...] = ()
    namespaces: tuple[str, ...] = ()
    all_namespaces: bool = False
    allow_remote_code: bool = False
    # Namespace -> bucket patterns (fnmatch) its manifests may use in s3:// URIs; "*" is the
    # entry for namespaces not listed. Empty: any bucket. A namespace with no entry (and no
    # "*") may use no bucket at all.
    allowed_buckets: Mapping[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)
    launcher: str = "pytorchjob"
    # Memory-fit check before a job is created: the planner builds the tower on torch's meta
    # device, so it needs torch (about 800 MB in memory). auto: when torch is installed.
    plan_check: str = "auto"
    # Restart policy of the training replicas: ExitCode retries only signals and OOM kills.
    restart_policy: str = "ExitCode"
    launcher_retry_seconds: float = 60.0
    api_retry_seconds: float = 10.0
    liveness_endpoint: str | None = "http://0.0.0.0:8080/healthz"
    metrics_port: int | None = 9090
    watch_server_timeout: float = 300.0
    watch_client_timeout: float = 330.0
    watch_connect_timeout: float = 10.0
    max_workers: int = 16
    # Kubernetes quantity of node-local disk each training pod requests for its scratch
    # volume (weights, image cache, checkpoints before upload), e.g. "200Gi". None: no
    # ephemeral-storage request.
    scratch_size: str | None = None

    def image_for(self, requested: str | None) -> str:
        """The trainer image to run; raise UserError when the platform does not allow it."""
        image = requested or self.trainer_image
        patterns = self.allowed_images or (self.trainer_image,)
        if not any(fnmatch.fnmatchcase(image, p) for p in patterns):
            raise ImageNotAllowed(
                f"spec.runtime.image: got {image!r}; this platform allows only "
                f"{', '.join(patterns)} (leave it empty for the default)"
            )
        return image

    def check_buckets(self, namespace: str, spec: Any) -> None:
        """Raise BucketNotAllowed when an s3:// URI of `spec` is outside the namespace's list.

        Local paths are not object storage and are not checked.
        """
        if not self.allowed_buckets:
            return
        patterns = self.allowed_buckets.get(namespace, self.allowed_buckets.get("*", ()))
        for attribute, field in URI_FIELDS:
            value: Any = spec
            for part in attribute.split("."):
                value = getattr(value, part)
            if not value or not str(value).startswith("s3://"):
                continue
            bucket = str(value)[len("s3://"):].split("/", 1)[0]
            if not any(fnmatch.fnmatchcase(bucket, p) for p in patterns):
                allowed = ", ".join(patterns) if patterns else "none"
                raise BucketNotAllowed(
                    f"{field}: bucket {bucket!r} is not allowed in namespace {namespace!r}; "
                    f"this platform allows: {allowed} (ask the platform team)"
                )

    @property
    def checks_plan(self) -> bool:
        """Whether jobs are checked for GPU-memory fit before they are created.

        `auto` means on: the planner needs no torch (it reads the committed tower shapes
        where torch is absent, as in the operator image), so only `off` skips the check.
        """
        return self.plan_check != "off"


def _split(value: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in value.split(",") if v.strip())


def _flag(name: str, value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise UserError(f"{name}: got {value!r}; use true or false")


def _json(name: str, value: str, kind: type) -> Any:
    if not value.strip():
        return kind()
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as err:
        raise UserError(f"{name}: not valid JSON ({err.msg}); got {value!r}") from None
    if not isinstance(parsed, kind):
        raise UserError(f"{name}: must be a JSON {kind.__name__}; got {value!r}")
    return parsed


def _buckets(name: str, value: str) -> dict[str, tuple[str, ...]]:
    parsed = _json(name, value, dict)
    for namespace, buckets in parsed.items():
        if not isinstance(buckets, list) or not all(isinstance(b, str) for b in buckets):
            raise UserError(
                f"{name}: the entry of {namespace!r} must be a list of bucket names; "
                f'got {buckets!r} (e.g. {{"team-a": ["team-a-data"]}})'
            )
    return {namespace: tuple(buckets) for namespace, buckets in parsed.items()}


def _number(name: str, value: str, kind: type = float) -> Any:
    try:
        return kind(value)
    except ValueError:
        raise UserError(f"{name}: got {value!r}; expected a number") from None


# A Kubernetes resource quantity as users write disk sizes (the API server accepts more).
_QUANTITY = re.compile(r"^[0-9]+(\.[0-9]+)?([KMGTPE]i|[kMGTPE])?$")


def _quantity_or_none(name: str, value: str) -> str | None:
    text = value.strip()
    if not text:
        return None
    if not _QUANTITY.match(text):
        raise UserError(f"{name}: got {value!r}; expected a size such as 200Gi or 500G")
    return text


def _port_or_none(name: str, value: str) -> int | None:
    if value.strip().lower() in ("", "0", "off", "none"):
        return None
    return int(_number(name, value, int))


# Environment variable (without the prefix) -> (field, parser). The Helm chart sets these.
_ENV: dict[str, tuple[str, Any]] = {
    "TRAINER_IMAGE": ("trainer_image", lambda n, v: v.strip()),
    "ALLOWED_TRAINER_IMAGES": ("allowed_images", lambda n, v: _split(v)),
    "TRAINER_SERVICE_ACCOUNT": ("trainer_service_account", lambda n, v: v.strip() or None),
    "S3_ENDPOINT": ("default_s3_endpoint", lambda n, v: v.strip() or None),
    "S3_REGION": ("default_s3_region", lambda n, v: v.strip() or None),
    "S3_CREDENTIALS_SECRET": ("default_credentials_secret", lambda n, v: v.strip() or None),
    "GPU_RESOURCE_NAME": ("gpu_resource", lambda n, v: v.strip()),
    "DEFAULT_NODE_SELECTOR": ("default_node_selector", lambda n, v: _json(n, v, dict)),
    "DEFAULT_TOLERATIONS": ("default_tolerations", lambda n, v: tuple(_json(n, v, list))),
    "WATCH_NAMESPACES": ("namespaces", lambda n, v: _split(v)),
    "ALL_NAMESPACES": ("all_namespaces", _flag),
    "ALLOW_REMOTE_CODE": ("allow_remote_code", _flag),
    "ALLOWED_BUCKETS": ("allowed_buckets", _buckets),
    "LAUNCHER": ("launcher", lambda n, v: v.strip()),
    "PLAN_CHECK": ("plan_check", lambda n, v: v.strip().lower()),
    "RESTART_POLICY": ("restart_policy", lambda n, v: v.strip()),
    "LAUNCHER_RETRY_SECONDS": ("launcher_retry_seconds", _number),
    "API_RETRY_SECONDS": ("api_retry_seconds", _number),
    "LIVENESS_ENDPOINT": ("liveness_endpoint", lambda n, v: v.strip() or None),
    "METRICS_PORT": ("metrics_port", _port_or_none),
    "WATCH_SERVER_TIMEOUT": ("watch_server_timeout", _number),
    "WATCH_CLIENT_TIMEOUT": ("watch_client_timeout", _number),
    "WATCH_CONNECT_TIMEOUT": ("watch_connect_timeout", _number),
    "MAX_WORKERS": ("max_workers", lambda n, v: _number(n, v, int)),
    "SCRATCH_SIZE": ("scratch_size", _quantity_or_none),
}

ENV_VARS = tuple(ENV_PREFIX + name for name in _ENV)


def from_env(environ: Mapping[str, str], **overrides: Any) -> OperatorConfig:
    """Build the configuration from EVACLIP_* variables, then apply flag overrides."""
    values: dict[str, Any] = {}
    for suffix, (field, parse) in _ENV.items():
        name = ENV_PREFIX + suffix
        if name in environ:
            values[field] = parse(name, environ[name])
    values.update({k: v for k, v in overrides.items() if v is not None})
    config = OperatorConfig(**values)
    _check(config)
    return config


def _check(config: OperatorConfig) -> None:
    if config.restart_policy not in ("OnFailure", "ExitCode"):
        raise UserError(
            f"{ENV_PREFIX}RESTART_POLICY: got {config.restart_policy!r}; use OnFailure or ExitCode"
        )
    if config.plan_check not in ("auto", "on", "off"):
        raise UserError(f"{ENV_PREFIX}PLAN_CHECK: got {config.plan_check!r}; use auto, on or off")
    if config.all_namespaces and config.namespaces:
        raise UserError(
            "--all-namespaces and --namespace exclude each other; give one of them"
        )
    if not config.gpu_resource:
        raise UserError(f"{ENV_PREFIX}GPU_RESOURCE_NAME: must not be empty, e.g. nvidia.com/gpu")
    for toleration in config.default_tolerations:
        if not isinstance(toleration, dict):
            raise UserError(
                f"{ENV_PREFIX}DEFAULT_TOLERATIONS: each entry must be an object; "
                f"got {toleration!r}"
            )
