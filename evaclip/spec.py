"""The EvaClipFinetune resource: the one source of truth for its spec and status.

The trainer, the CLI and the operator all validate with these models, and the CRD in
`crds/` is generated from them (`evaclip crd`), so every field is documented once, here,
and `kubectl explain evaclipfinetune.spec...` shows the same text.

Python attributes are snake_case; the wire names (YAML, JSON, the CRD) are camelCase.
"""

from __future__ import annotations

import re
from enum import Enum, StrEnum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic.alias_generators import to_camel

from evaclip.models.presets import PRESET_NAMES, get_preset

GROUP = "training.evaclip.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "EvaClipFinetune"
PLURAL = "evaclipfinetunes"
SINGULAR = "evaclipfinetune"
SHORT_NAMES = ("ecf",)

DEFAULT_TRAINER_IMAGE = "ghcr.io/evaclip/evaclip-trainer:0.1.0"

_DNS1123 = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_URI = re.compile(r"^(s3://[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9](/.*)?|/.*|file://.+|\./.*)$")

PresetName = Enum("PresetName", {n: n for n in PRESET_NAMES}, type=str)  # type: ignore[misc]


class _Model(BaseModel):
    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        use_enum_values=True,
        validate_default=True,
    )


# Kubernetes resource quantities ("16", "500m", "200Gi", "1.5e3"), as the API server parses them.
QUANTITY = (
    r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))"
    r"(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"
)
ENDPOINT = r"^https?://[^\s/?#]+(/[^\s]*)?$"


def _check_quantity(value: str | None) -> str | None:
    if value is not None and not re.match(QUANTITY, value):
        raise ValueError("use a Kubernetes quantity such as 16, 500m, 200Gi or 1.5Ti")
    return value


def _quantity_field(default: str | None, description: str) -> Any:
    return Field(default=default, description=description,
                 json_schema_extra={"pattern": QUANTITY})


def _check_uri(value: str | None, what: str) -> str | None:
    if value is None:
        return None
    if not _URI.match(value):
        raise ValueError(
            "must be an s3://bucket/key URI (bucket of 3-63 lowercase letters, digits, "
            "'.' or '-') or a local path"
        )
    return value


# --- model -----------------------------------------------------------------------------


class WeightsFormat(StrEnum):
    auto = "auto"
    eva_clip = "evaClip"
    hugging_face = "huggingFace"
    safetensors = "safetensors"


class Precision(StrEnum):
    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"


class ModelSpec(_Model):
    """Which EVA-CLIP vision tower to train and where its weights are."""

    preset: PresetName = Field(
        description="Name of the vision tower preset, for example eva-clip-18b or "
        "eva02-clip-l14; `evaclip model list` shows them all."
    )
    weights: str | None = Field(
        default=None,
        description="URI of the pretrained weights (s3://bucket/key or a local path): an "
        "EVA-CLIP .pt/.bin checkpoint, a safetensors file, or a Hugging Face-format "
        "directory. Leave empty only for random weights (tests and demos).",
    )
    format: WeightsFormat = Field(
        default=WeightsFormat.auto,
        description="Layout of the weights: auto (detected from the files), evaClip "
        "(original release, visual.* keys), huggingFace (config.json plus shards) or "
        "safetensors.",
    )
    precision: Precision = Field(
        default=Precision.bf16,
        description="Numeric precision of training and inference: bf16, fp16 or fp32.",
    )
    trust_remote_code: bool = Field(
        default=False,
        description="Allow loading a Hugging Face repository through its own model code. "
        "Off unless the platform also allows it.",
    )

    _weights = field_validator("weights")(lambda v: _check_uri(v, "model.weights"))


# --- data ------------------------------------------------------------------------------


class DataFormat(StrEnum):
    image_folder = "imageFolder"
    csv = "csv"
    jsonl = "jsonl"


class DataSpec(_Model):
    """The labelled images to train and validate on."""

    train: str = Field(
        description="URI of the training images: a folder laid out as <uri>/<class>/<image> "
        "(format imageFolder) or a CSV/JSONL manifest file."
    )
    validation: str | None = Field(
        default=None,
        description="URI of the validation images, in the same format as train. When empty, "
        "validationFraction of the training images is held out with a fixed seed.",
    )
    validation_fraction: float = Field(
        default=0.2,
        gt=0.0,
        lt=1.0,
        description="Share of the training images held out for validation when no "
        "validation URI is given; between 0 and 1.",
    )
    format: DataFormat = Field(
        default=DataFormat.image_folder,
        description="Layout of the data: imageFolder, csv or jsonl.",
    )
    image_column: str = Field(
        default="image",
        min_length=1,
        description="Column (csv) or key (jsonl) holding the image path, relative to the "
        "manifest, or a full s3:// URI.",
    )
    label_column: str = Field(
        default="label",
        min_length=1,
        description="Column (csv) or key (jsonl) holding the class name.",
    )
    class_names: list[str] | None = Field(
        default=None,
        description="Class names in label order. When empty, they are discovered from the "
        "data and sorted.",
    )
    max_bad_fraction: float = Field(
        default=0.01,
        ge=0.0,
        le=1.0,
        description="Largest share of unreadable images that is skipped before the job "
        "stops; between 0 and 1.",
    )
    num_workers: int = Field(
        default=2, ge=0, le=64, description="Data loader worker processes per rank."
    )

    _train = field_validator("train")(lambda v: _check_uri(v, "data.train"))
    _val = field_validator("validation")(lambda v: _check_uri(v, "data.validation"))

    @field_validator("class_names")
    @classmethod
    def _unique_classes(cls, v: list[str] | None) -> list[str] | None:
        if v is not None and len(set(v)) != len(v):
            raise ValueError("data.classNames must not repeat a name")
        if v is not None and len(v) < 2:
            raise ValueError("data.classNames needs at least 2 classes")
        return v


# --- method ----------------------------------------------------------------------------


class MethodType(StrEnum):
    linear_probe = "linearProbe"
    lora = "lora"
    partial = "partial"
    full = "full"


class LoraSpec(_Model):
    """Low-rank adapters on the tower's linear layers (peft LoRA)."""

    rank: int = Field(default=8, ge=1, le=1024, description="Rank r of each adapter.")
    alpha: float = Field(default=16.0, gt=0, description="LoRA scaling alpha.")
    dropout: float = Field(
        default=0.0, ge=0.0, lt=1.0, description="Dropout on the adapter input; 0 to 1."
    )
    target_modules: list[str] = Field(
        default=["qkv", "proj"],
        min_length=1,
        description="Attention linears to adapt, by short name: qkv, proj, q_proj, k_proj, "
        "v_proj, or a regular expression over full module names.",
    )
    include_mlp: bool = Field(
        default=False, description="Also adapt the MLP linears (fc1, fc2)."
    )

    @field_validator("target_modules")
    @classmethod
    def _patterns_compile(cls, v: list[str]) -> list[str]:
        for i, pattern in enumerate(v):
            try:
                re.compile(pattern)
            except re.error as err:
                raise ValueError(
                    f"entry {i} ({pattern!r}) is not a short name or a valid regular "
                    f"expression: {err}"
                ) from None
        return v


class PartialSpec(_Model):
    """Train only the last blocks of the tower."""

    trainable_blocks: int = Field(
        default=2,
        ge=1,
        description="Number of final transformer blocks to train (with the final norm and "
        "the head); the rest stay frozen. At most the preset's depth.",
    )


class MethodSpec(_Model):
    """How the tower is adapted."""

    type: MethodType = Field(
        default=MethodType.linear_probe,
        description="linearProbe (frozen tower, cached features, train a linear head), lora, "
        "partial (last blocks) or full fine-tuning.",
    )
    lora: LoraSpec = Field(
        default_factory=LoraSpec, description="Settings used when type is lora."
    )
    partial: PartialSpec = Field(
        default_factory=PartialSpec, description="Settings used when type is partial."
    )


# --- training --------------------------------------------------------------------------


class TrainingSpec(_Model):
    """Hyperparameters; the defaults suit a first run."""

    epochs: int = Field(default=10, ge=1, le=10000, description="Passes over the training set.")
    batch_size: int = Field(
        default=32, ge=1, le=65536, description="Images per GPU (per process) per step."
    )
    learning_rate: float = Field(
        default=1e-3, gt=0, le=10, description="Peak learning rate of the classifier head."
    )
    backbone_learning_rate: float = Field(
        default=1e-5, gt=0, le=10,
        description="Peak learning rate of trained tower parameters (lora, partial, full).",
    )
    layer_decay: float = Field(
        default=0.75, gt=0, le=1,
        description="Layer-wise learning-rate decay: block i of n gets "
        "backboneLearningRate * layerDecay^(n - i); 1 disables it.",
    )
    weight_decay: float = Field(
        default=0.05, ge=0, le=1,
        description="AdamW weight decay; never applied to norms, biases and embeddings.",
    )
    warmup_fraction: float = Field(
        default=0.1, ge=0, lt=1,
        description="Share of all steps spent warming up linearly before cosine decay.",
    )
    label_smoothing: float = Field(
        default=0.1, ge=0, lt=1, description="Label smoothing of the cross-entropy loss."
    )
    gradient_accumulation_steps: int = Field(
        default=1, ge=1, le=1024, description="Micro-batches accumulated per optimizer step."
    )
    gradient_clipping: float = Field(
        default=1.0, ge=0, description="Clip the global gradient norm to this; 0 disables it."
    )
    augment: bool = Field(
        default=True,
        description="Random resized crop and horizontal flip on training images (not used "
        "by linearProbe, whose features are computed once).",
    )
    normalize_features: bool = Field(
        default=True, description="L2-normalise embeddings before the linear head."
    )
    save_features: bool = Field(
        default=False,
        description="linearProbe: also upload the cached features under the output URI.",
    )
    seed: int = Field(default=0, ge=0, description="Seed of initialisation and data order.")


class Offload(StrEnum):
    none = "none"
    cpu = "cpu"


class DeepSpeedSpec(_Model):
    """DeepSpeed settings; the rendered config can be overridden by config."""

    zero_stage: int = Field(
        default=2, ge=0, le=3,
        description="ZeRO stage 0-3; 3 partitions weights too and is needed for the "
        "largest towers.",
    )
    offload_optimizer: Offload = Field(
        default=Offload.none, description="Keep optimizer states in host memory: none or cpu."
    )
    offload_parameters: Offload = Field(
        default=Offload.none,
        description="Keep parameters in host memory: none or cpu (ZeRO-3 only).",
    )
    activation_checkpointing: bool = Field(
        default=False, description="Recompute block activations in backward to save memory."
    )
    config: dict[str, Any] = Field(
        default_factory=dict,
        description="DeepSpeed JSON merged over the rendered config, for settings not "
        "exposed above.",
        json_schema_extra={"x-kubernetes-preserve-unknown-fields": True},
    )

    @model_validator(mode="after")
    def _offload_needs_zero(self) -> DeepSpeedSpec:
        if self.offload_optimizer == "cpu" and self.zero_stage == 0:
            raise ValueError(
                "offloadOptimizer: cpu needs zeroStage 1, 2 or 3, got 0"
            )
        if self.offload_parameters == "cpu" and self.zero_stage != 3:
            raise ValueError(
                "offloadParameters: cpu needs zeroStage 3, "
                f"got {self.zero_stage}"
            )
        return self


class CheckpointSpec(_Model):
    """When training state is saved so a restarted job resumes."""

    every_steps: int = Field(
        default=500, ge=0,
        description="Save every N optimizer steps (and at each epoch end); 0 saves at "
        "epoch ends only.",
    )
    keep_last: int = Field(default=2, ge=1, le=100, description="Checkpoints kept; older go.")


# --- resources and pods ----------------------------------------------------------------


class ResourcesSpec(_Model):
    """Where the job runs: nodes, GPUs and their memory."""

    nodes: int = Field(default=1, ge=1, le=1024, description="Pods (one per node).")
    gpus_per_node: int = Field(
        default=1, ge=0, le=16,
        description="GPUs per pod, also the processes per pod; 0 runs on CPU.",
    )
    gpu_memory_gib: float = Field(
        default=80, gt=0, le=1024,
        description="Memory of one GPU in GiB, used by the planner to check the job fits.",
    )
    cpu: str | None = _quantity_field(None, "CPU request per pod, for example '16'.")
    memory: str | None = _quantity_field(None, "Memory request per pod, e.g. '200Gi'.")
    shm_size: str = _quantity_field("16Gi", "Size of the memory-backed /dev/shm of each pod.")

    _quantities = field_validator("cpu", "memory", "shm_size")(_check_quantity)


class SecretRef(_Model):
    """A Secret holding S3 credentials; its values are never copied."""

    name: str = Field(description="Name of the Secret in the resource's namespace.")
    access_key_id_key: str = Field(
        default="AWS_ACCESS_KEY_ID", description="Key of the access key id in the Secret."
    )
    secret_access_key_key: str = Field(
        default="AWS_SECRET_ACCESS_KEY", description="Key of the secret access key."
    )
    session_token_key: str | None = Field(
        default=None, description="Key of an optional session token in the Secret."
    )


class StorageSpec(_Model):
    """How s3:// URIs are reached."""

    endpoint: str | None = Field(
        default=None,
        description="S3 endpoint URL for S3-compatible stores (MinIO, Ceph, GCS interop), "
        "http:// or https://; empty uses AWS. `evaclip run --local` starts an embedded store "
        "when empty.",
        json_schema_extra={"pattern": ENDPOINT},
    )

    @field_validator("endpoint")
    @classmethod
    def _endpoint_url(cls, v: str | None) -> str | None:
        if v is not None and not re.match(ENDPOINT, v):
            raise ValueError("use an http:// or https:// URL such as https://minio.example:9000")
        return v
    region: str = Field(default="us-east-1", description="S3 region.")
    credentials_secret: SecretRef | None = Field(
        default=None,
        description="Secret with the access keys. Empty uses the pod's workload identity "
        "(IRSA web identity) or the standard AWS credential chain.",
    )
    max_concurrency: int = Field(
        default=8, ge=1, le=64, description="Parallel parts in multipart transfers."
    )

    @model_validator(mode="before")
    @classmethod
    def _no_inline_credentials(cls, data: Any) -> Any:
        inline = {"credentials", "accessKeyId", "secretAccessKey", "sessionToken"}
        found = sorted(inline & set(data)) if isinstance(data, dict) else []
        if found:
            raise ValueError(
                f"{found[0]}: credentials are never accepted in the manifest; put them in a "
                "Secret and set storage.credentialsSecret.name (or use workload identity)"
            )
        return data


class Toleration(_Model):
    """A pod toleration, as in the core API."""

    key: str | None = Field(default=None, description="Taint key to tolerate.")
    operator: Literal["Exists", "Equal"] | None = Field(
        default=None, description="Exists or Equal (the default)."
    )
    value: str | None = Field(default=None, description="Taint value, with operator Equal.")
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = Field(
        default=None, description="NoSchedule, PreferNoSchedule or NoExecute; empty for all."
    )
    toleration_seconds: int | None = Field(
        default=None, description="Seconds a NoExecute taint is tolerated."
    )


class RuntimeSpec(_Model):
    """How the training pods are run."""

    image: str | None = Field(
        default=None,
        description="Trainer image; empty uses the platform's default. Must be in the "
        "platform's allowed list.",
    )
    service_account_name: str | None = Field(
        default=None, description="Service account of the training pods."
    )
    node_selector: dict[str, str] = Field(
        default_factory=dict, description="Node labels the training pods must match."
    )
    tolerations: list[Toleration] = Field(
        default_factory=list, description="Tolerations of the training pods."
    )
    affinity: dict[str, Any] = Field(
        default_factory=dict,
        description="Pod affinity, as in the core API.",
        json_schema_extra={"x-kubernetes-preserve-unknown-fields": True},
    )
    priority_class_name: str | None = Field(
        default=None, description="Priority class of the training pods."
    )
    queue_name: str | None = Field(
        default=None, description="Kueue LocalQueue; set as the kueue.x-k8s.io/queue-name label."
    )
    backoff_limit: int = Field(
        default=3, ge=0, le=100, description="Pod restarts allowed before the job fails."
    )
    active_deadline_seconds: int | None = Field(
        default=None, ge=1, description="Wall-clock limit of the whole job in seconds."
    )
    ttl_seconds_after_finished: int | None = Field(
        default=86400, ge=0,
        description="Seconds a finished job's pods are kept; empty keeps them.",
    )


# --- the resource ----------------------------------------------------------------------


class EvaClipFinetuneSpec(_Model):
    """A fine-tuning job of an EVA-CLIP vision tower."""

    model: ModelSpec = Field(description="The vision tower and its weights.")
    data: DataSpec = Field(description="The labelled images.")
    method: MethodSpec = Field(
        default_factory=MethodSpec, description="How the tower is adapted."
    )
    training: TrainingSpec = Field(
        default_factory=TrainingSpec, description="Training hyperparameters."
    )
    deepspeed: DeepSpeedSpec = Field(
        default_factory=DeepSpeedSpec, description="DeepSpeed settings."
    )
    checkpoint: CheckpointSpec = Field(
        default_factory=CheckpointSpec, description="Checkpoint schedule."
    )
    resources: ResourcesSpec = Field(
        default_factory=ResourcesSpec, description="Nodes, GPUs and memory."
    )
    output: str = Field(
        description="URI under which the head, metrics, adapters and checkpoints are "
        "published (s3://bucket/prefix or a local path)."
    )
    storage: StorageSpec = Field(
        default_factory=StorageSpec, description="S3 endpoint, region and credentials."
    )
    runtime: RuntimeSpec = Field(
        default_factory=RuntimeSpec, description="Pod settings of the training job."
    )
    suspend: bool = Field(
        default=False,
        description="Suspend the job: its pods are deleted and it resumes from the last "
        "checkpoint when set back to false.",
    )

    _output = field_validator("output")(lambda v: _check_uri(v, "output"))

    @model_validator(mode="after")
    def _cross_checks(self) -> EvaClipFinetuneSpec:
        preset = get_preset(self.model.preset)
        k = self.method.partial.trainable_blocks
        if self.method.type == "partial" and k > preset.depth:
            raise ValueError(
                f"method.partial.trainableBlocks: got {k}, but preset {preset.name} has "
                f"{preset.depth} blocks; use 1..{preset.depth} or method.type full"
            )
        if self.resources.gpus_per_node == 0 and self.model.precision == "fp16":
            raise ValueError(
                "model.precision: fp16 needs GPUs (resources.gpusPerNode >= 1); "
                "use bf16 or fp32 on CPU"
            )
        return self


class Condition(_Model):
    """One observation of the resource's state, as in the core API."""

    type: str = Field(description="Created, Valid, Running, Succeeded, Failed, Suspended, ...")
    status: Literal["True", "False", "Unknown"] = Field(description="True, False or Unknown.")
    reason: str = Field(default="", description="CamelCase reason of the last change.")
    message: str = Field(default="", description="Human-readable detail.")
    last_transition_time: str | None = Field(
        default=None, description="RFC 3339 time of the last status change."
    )


class Progress(_Model):
    """How far training is."""

    epoch: int = Field(default=0, description="Current epoch, from 1.")
    epochs: int = Field(default=0, description="Total epochs.")
    step: int = Field(default=0, description="Optimizer steps done.")
    total_steps: int = Field(default=0, description="Optimizer steps in the whole run.")
    percent: float = Field(default=0.0, description="Share of the run done, 0-100.")
    percent_text: str | None = Field(
        default=None, description="The same share as text for `kubectl get`, e.g. '42%'."
    )
    images_per_second: float | None = Field(default=None, description="Recent throughput.")
    eta_seconds: float | None = Field(default=None, description="Estimated seconds left.")
    stage: str | None = Field(
        default=None, description="What runs now: download, features, train, publish."
    )
    updated_at: str | None = Field(default=None, description="RFC 3339 time of this report.")


class Metrics(_Model):
    """The latest metrics."""

    train_loss: float | None = Field(default=None, description="Latest training loss.")
    val_top1: float | None = Field(default=None, description="Validation top-1 accuracy, 0-1.")
    val_top5: float | None = Field(default=None, description="Validation top-5 accuracy, 0-1.")


class Artifacts(_Model):
    """URIs of the published outputs."""

    output: str | None = Field(default=None, description="The output prefix.")
    manifest: str | None = Field(
        default=None, description="The final manifest; outputs count only once it exists."
    )
    head: str | None = Field(default=None, description="head.safetensors.")
    metrics: str | None = Field(default=None, description="metrics.json.")
    adapter: str | None = Field(default=None, description="PEFT adapter folder (lora).")
    weights: str | None = Field(default=None, description="Trained tower weights.")


class EvaClipFinetuneStatus(_Model):
    """What the operator and the trainer observed."""

    model_config = ConfigDict(extra="ignore")

    phase: Literal["Pending", "Queued", "Running", "Succeeded", "Failed", "Suspended"] | None = (
        Field(default=None, description="Pending, Queued, Running, Succeeded, Failed or Suspended.")
    )
    message: str | None = Field(default=None, description="Short explanation of the phase.")
    conditions: list[Condition] = Field(default_factory=list, description="Conditions.")
    job_name: str | None = Field(default=None, description="Name of the training job.")
    config_map_name: str | None = Field(
        default=None, description="Name of the ConfigMap holding the rendered trainer config."
    )
    start_time: str | None = Field(default=None, description="When training started.")
    completion_time: str | None = Field(default=None, description="When it finished.")
    observed_generation: int | None = Field(
        default=None, description="The spec generation this status describes."
    )
    progress: Progress | None = Field(default=None, description="Training progress.")
    metrics: Metrics | None = Field(default=None, description="Latest metrics.")
    artifacts: Artifacts | None = Field(default=None, description="Published outputs.")


class ObjectMeta(BaseModel):
    """The part of metadata the product reads."""

    model_config = ConfigDict(extra="allow")

    name: str = Field(description="Name of the resource.")
    namespace: str = Field(default="default", description="Namespace of the resource.")
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _dns_name(cls, v: str) -> str:
        if len(v) > 52 or not _DNS1123.match(v):
            raise ValueError(
                "metadata.name must be lowercase letters, digits and '-', start and end "
                f"alphanumeric, at most 52 characters; got {v!r}"
            )
        return v


class EvaClipFinetune(BaseModel):
    """A whole EvaClipFinetune manifest."""

    model_config = ConfigDict(populate_by_name=True, extra="forbid")

    api_version: Literal["training.evaclip.io/v1alpha1"] = Field(alias="apiVersion")
    kind: Literal["EvaClipFinetune"]
    metadata: ObjectMeta
    spec: EvaClipFinetuneSpec
    status: EvaClipFinetuneStatus | None = None

    @property
    def name(self) -> str:
        return self.metadata.name

    @property
    def namespace(self) -> str:
        return self.metadata.namespace
