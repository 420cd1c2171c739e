"""Pure functions that turn a validated EvaClipFinetune into the objects it runs as.

Nothing here talks to the API: the handlers and launchers call these, and tests call
them directly. Names are derived from the resource name only, so a restarted operator
computes the same names and finds what it created before.

The ConfigMap holds the rendered trainer config (`evaclip.render.trainer_config_json`),
which carries only the *name* of the credentials Secret; the pods read the keys through
`valueFrom.secretKeyRef`, so no secret value is ever copied into an object we write.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from evaclip.operator.settings import OperatorConfig
from evaclip.render import CONFIG_ENV, CONFIG_FILE, CONFIG_MOUNT, trainer_config_json
from evaclip.spec import API_VERSION, KIND, EvaClipFinetune, SecretRef, Toleration

MANAGED_BY = "evaclip-operator"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
LABEL_NAME = "app.kubernetes.io/name"
LABEL_FINETUNE = "training.evaclip.io/finetune"
LABEL_QUEUE = "kueue.x-k8s.io/queue-name"
ANNOTATION_SPEC_HASH = "training.evaclip.io/spec-hash"
STATUS_RESOURCE_ENV = "EVACLIP_STATUS_RESOURCE"
CONTAINER_NAME = "pytorch"
MASTER_PORT = 23456

# The pod's only writable disk: an emptyDir mounted at /tmp, where the trainer image keeps
# every cache (HF_HOME and TORCH_EXTENSIONS_DIR point into /tmp), so the container runs
# with a read-only root filesystem. It holds the weights, the image cache and the
# checkpoints before upload: tens of GB for the large towers (EVACLIP_SCRATCH_SIZE).
SCRATCH_VOLUME = "scratch"
SCRATCH_MOUNT = "/tmp"
WORKDIR = f"{SCRATCH_MOUNT}/evaclip/work"
CACHE_DIR = f"{SCRATCH_MOUNT}/evaclip/cache"
# Trainer environment variables (trainer/context.py, evaclip/storage.py) and the tool
# caches that would otherwise default to the read-only home directory.
SCRATCH_ENV = {
    "EVACLIP_WORKDIR": WORKDIR,
    "EVACLIP_CACHE_DIR": CACHE_DIR,
    "XDG_CACHE_HOME": f"{SCRATCH_MOUNT}/cache",
    "TRITON_HOME": SCRATCH_MOUNT,
    "MPLCONFIGDIR": f"{SCRATCH_MOUNT}/matplotlib",
}


def config_map_name(name: str) -> str:
    return f"{name}-trainer-config"


def job_name(name: str) -> str:
    return name


def owner_reference(name: str, uid: str) -> dict[str, Any]:
    """The controller reference that lets the garbage collector delete our children."""
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "name": name,
        "uid": uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def labels(resource: EvaClipFinetune) -> dict[str, str]:
    """Labels on every child: who manages it and which resource it belongs to."""
    return {
        LABEL_NAME: "evaclip-trainer",
        LABEL_MANAGED_BY: MANAGED_BY,
        LABEL_FINETUNE: resource.name,
    }


def spec_hash(resource: EvaClipFinetune) -> str:
    """A digest of the user's spec minus `suspend` (the one field that may change).

    Taken before platform defaults are applied, so reconfiguring the operator does not
    make running jobs look changed.
    """
    spec = resource.spec.model_dump(mode="json", by_alias=True, exclude={"suspend"})
    text = json.dumps(spec, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def with_platform_defaults(resource: EvaClipFinetune, config: OperatorConfig) -> EvaClipFinetune:
    """Fill storage and pod fields the manifest left empty with the platform's defaults.

    The result is what gets rendered, so the ConfigMap and the pod environment agree.
    """
    spec = resource.spec
    storage_changes: dict[str, Any] = {}
    if spec.storage.endpoint is None and config.default_s3_endpoint:
        storage_changes["endpoint"] = config.default_s3_endpoint
    if "region" not in spec.storage.model_fields_set and config.default_s3_region:
        storage_changes["region"] = config.default_s3_region
    if spec.storage.credentials_secret is None and config.default_credentials_secret:
        storage_changes["credentials_secret"] = SecretRef(name=config.default_credentials_secret)
    runtime_changes: dict[str, Any] = {}
    if spec.runtime.service_account_name is None and config.trainer_service_account:
        runtime_changes["service_account_name"] = config.trainer_service_account
    if config.default_node_selector:
        runtime_changes["node_selector"] = {
            **config.default_node_selector, **spec.runtime.node_selector
        }
    if not spec.runtime.tolerations and config.default_tolerations:
        runtime_changes["tolerations"] = [
            Toleration.model_validate(t) for t in config.default_tolerations
        ]
    new_spec = spec.model_copy(
        update={
            "storage": spec.storage.model_copy(update=storage_changes),
            "runtime": spec.runtime.model_copy(update=runtime_changes),
        }
    )
    return resource.model_copy(update={"spec": new_spec})


def config_map(resource: EvaClipFinetune, owner: dict[str, Any]) -> dict[str, Any]:
    """The ConfigMap the trainer reads its config from (mounted at /etc/evaclip)."""
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": config_map_name(resource.name),
            "namespace": resource.namespace,
            "labels": labels(resource),
            "annotations": {},
            "ownerReferences": [owner],
        },
        "data": {CONFIG_FILE: trainer_config_json(resource)},
    }


def _env(resource: EvaClipFinetune) -> list[dict[str, Any]]:
    storage = resource.spec.storage
    env: list[dict[str, Any]] = [
        {"name": CONFIG_ENV, "value": f"{CONFIG_MOUNT}/{CONFIG_FILE}"},
        {"name": STATUS_RESOURCE_ENV, "value": f"{resource.namespace}/{resource.name}"},
        {"name": "AWS_REGION", "value": storage.region},
        {"name": "AWS_DEFAULT_REGION", "value": storage.region},
        {"name": "PYTHONUNBUFFERED", "value": "1"},
        *({"name": k, "value": v} for k, v in SCRATCH_ENV.items()),
    ]
    if storage.endpoint:
        env.append({"name": "EVACLIP_S3_ENDPOINT", "value": storage.endpoint})
    secret = storage.credentials_secret
    if secret is not None:
        keys = [
            ("AWS_ACCESS_KEY_ID", secret.access_key_id_key),
            ("AWS_SECRET_ACCESS_KEY", secret.secret_access_key_key),
        ]
        if secret.session_token_key:
            keys.append(("AWS_SESSION_TOKEN", secret.session_token_key))
        env += [
            {"name": var, "valueFrom": {"secretKeyRef": {"name": secret.name, "key": key}}}
            for var, key in keys
        ]
    return env


def _container_resources(resource: EvaClipFinetune, config: OperatorConfig) -> dict[str, Any]:
    res = resource.spec.resources
    requests: dict[str, Any] = {}
    limits: dict[str, Any] = {}
    if res.gpus_per_node:
        requests[config.gpu_resource] = res.gpus_per_node
        limits[config.gpu_resource] = res.gpus_per_node
    if res.cpu:
        requests["cpu"] = res.cpu
    if res.memory:
        requests["memory"] = res.memory
        limits["memory"] = res.memory
    if config.scratch_size:
        # A request only: the scheduler picks a node with that much free disk, and a job
        # that needs more is not evicted for it (there is no per-job size in the spec).
        requests["ephemeral-storage"] = config.scratch_size
    out: dict[str, Any] = {}
    if requests:
        out["requests"] = requests
    if limits:
        out["limits"] = limits
    return out


def _container(resource: EvaClipFinetune, config: OperatorConfig, image: str) -> dict[str, Any]:
    # No command: the trainer image's entrypoint (`evaclip launch`) reads the PET_* variables
    # the training operator injects and starts torchrun.
    return {
        "name": CONTAINER_NAME,
        "image": image,
        "imagePullPolicy": "IfNotPresent",
        "env": _env(resource),
        "ports": [{"name": "pytorchjob-port", "containerPort": MASTER_PORT, "protocol": "TCP"}],
        "resources": _container_resources(resource, config),
        "volumeMounts": [
            {"name": "trainer-config", "mountPath": CONFIG_MOUNT, "readOnly": True},
            {"name": "dshm", "mountPath": "/dev/shm"},
            {"name": SCRATCH_VOLUME, "mountPath": SCRATCH_MOUNT},
        ],
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "privileged": False,
            "readOnlyRootFilesystem": True,
            "runAsNonRoot": True,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
    }


def pod_template(resource: EvaClipFinetune, config: OperatorConfig, image: str) -> dict[str, Any]:
    """The pod template shared by every replica (any launcher can reuse it)."""
    runtime = resource.spec.runtime
    spec: dict[str, Any] = {
        "containers": [_container(resource, config, image)],
        "securityContext": {
            "runAsNonRoot": True,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "volumes": [
            {
                "name": "trainer-config",
                "configMap": {"name": config_map_name(resource.name)},
            },
            {
                # DataLoader workers share batches through /dev/shm; the container default
                # of 64 MiB crashes them, so it is a memory-backed volume of shmSize.
                "name": "dshm",
                "emptyDir": {"medium": "Memory", "sizeLimit": resource.spec.resources.shm_size},
            },
            # Node-local disk, deleted with the pod; see SCRATCH_MOUNT.
            {"name": SCRATCH_VOLUME, "emptyDir": {}},
        ],
    }
    if runtime.service_account_name:
        spec["serviceAccountName"] = runtime.service_account_name
    if runtime.node_selector:
        spec["nodeSelector"] = dict(runtime.node_selector)
    if runtime.tolerations:
        spec["tolerations"] = [
            t.model_dump(mode="json", by_alias=True, exclude_none=True) for t in runtime.tolerations
        ]
    if runtime.affinity:
        spec["affinity"] = runtime.affinity
    if runtime.priority_class_name:
        spec["priorityClassName"] = runtime.priority_class_name
    return {
        "metadata": {
            "labels": labels(resource),
            # An Istio sidecar never exits, so a finished pod would never complete.
            "annotations": {"sidecar.istio.io/inject": "false"},
        },
        "spec": spec,
    }


def run_policy(resource: EvaClipFinetune) -> dict[str, Any]:
    runtime = resource.spec.runtime
    policy: dict[str, Any] = {
        "cleanPodPolicy": "Running",
        "backoffLimit": runtime.backoff_limit,
        "suspend": resource.spec.suspend,
    }
    if runtime.active_deadline_seconds is not None:
        policy["activeDeadlineSeconds"] = runtime.active_deadline_seconds
    if runtime.ttl_seconds_after_finished is not None:
        policy["ttlSecondsAfterFinished"] = runtime.ttl_seconds_after_finished
    return policy


def nproc_per_node(resource: EvaClipFinetune) -> str:
    """torchrun processes per pod: one per GPU, or a single process on a CPU-only pod."""
    return str(resource.spec.resources.gpus_per_node or 1)


def pytorch_job(
    resource: EvaClipFinetune, config: OperatorConfig, image: str, owner: dict[str, Any]
) -> dict[str, Any]:
    """A kubeflow.org/v1 PyTorchJob: one Master plus nodes-1 Workers."""
    template = pod_template(resource, config, image)
    replicas: dict[str, Any] = {
        "Master": {"replicas": 1, "restartPolicy": config.restart_policy, "template": template},
    }
    workers = resource.spec.resources.nodes - 1
    if workers:
        replicas["Worker"] = {
            "replicas": workers,
            "restartPolicy": config.restart_policy,
            "template": template,
        }
    job_labels = labels(resource)
    if resource.spec.runtime.queue_name:
        job_labels[LABEL_QUEUE] = resource.spec.runtime.queue_name
    return {
        "apiVersion": "kubeflow.org/v1",
        "kind": "PyTorchJob",
        "metadata": {
            "name": job_name(resource.name),
            "namespace": resource.namespace,
            "labels": job_labels,
            "annotations": {},
            "ownerReferences": [owner],
        },
        "spec": {
            "nprocPerNode": nproc_per_node(resource),
            "runPolicy": run_policy(resource),
            "pytorchReplicaSpecs": replicas,
        },
    }
