{{/*
evaclip-operator.name: the chart name, or nameOverride, cut to 63 characters.
*/}}
{{- define "evaclip-operator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
evaclip-operator.fullname: the prefix of every resource name, "<release>-<name>" unless the
release name already contains the name, or fullnameOverride; at most 63 characters.
*/}}
{{- define "evaclip-operator.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := include "evaclip-operator.name" . }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/*
evaclip-operator.selectorLabels: the two labels that select the operator pod; they never
change between releases, so the Deployment selector stays valid on upgrade.
*/}}
{{- define "evaclip-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "evaclip-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
evaclip-operator.labels: the recommended Kubernetes labels every object of the release carries.
*/}}
{{- define "evaclip-operator.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "evaclip-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: evaclip
{{- end }}

{{/*
evaclip-operator.serviceAccountName: the name of the operator's service account.
*/}}
{{- define "evaclip-operator.serviceAccountName" -}}
{{- default (include "evaclip-operator.fullname" .) .Values.serviceAccount.name }}
{{- end }}

{{/*
evaclip-operator.trainerServiceAccountName: the name of the training pods' service account,
the same in every trainer namespace.
*/}}
{{- define "evaclip-operator.trainerServiceAccountName" -}}
{{- default (printf "%s-trainer" (include "evaclip-operator.fullname" . | trunc 55 | trimSuffix "-")) .Values.trainer.serviceAccount.name }}
{{- end }}

{{/*
evaclip-operator.clusterWide: "true" when watchNamespaces is empty (the operator watches every
namespace), otherwise the empty string; use as `if include ...`.
*/}}
{{- define "evaclip-operator.clusterWide" -}}
{{- if not .Values.watchNamespaces }}true{{ end }}
{{- end }}

{{/*
evaclip-operator.trainerNamespaces: a JSON list of the namespaces that get the trainer service
account, Role and RoleBinding: the watched namespaces, or in cluster-wide mode
trainer.namespaces (the release namespace when empty).
*/}}
{{- define "evaclip-operator.trainerNamespaces" -}}
{{- if .Values.watchNamespaces }}
{{- .Values.watchNamespaces | uniq | toJson }}
{{- else if .Values.trainer.namespaces }}
{{- .Values.trainer.namespaces | uniq | toJson }}
{{- else }}
{{- list .Release.Namespace | toJson }}
{{- end }}
{{- end }}

{{/*
evaclip-operator.image: the operator image reference "<repository>:<tag>", the tag defaulting
to the chart's appVersion; fails when the repository is empty.
*/}}
{{- define "evaclip-operator.image" -}}
{{- if not .Values.image.repository }}
{{- fail "image.repository must be a non-empty image reference such as ghcr.io/evaclip/evaclip-operator, got \"\"" }}
{{- end }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/*
evaclip-operator.validate: checks across values the schema cannot express; renders nothing
and fails with a "must be ..., got ..." message naming the key.
*/}}
{{- define "evaclip-operator.validate" -}}
{{- if not .Values.trainer.image }}
{{- fail "trainer.image must be a non-empty image reference such as ghcr.io/evaclip/evaclip-trainer:0.1.0, got \"\"" }}
{{- end }}
{{- range $i, $img := .Values.trainer.allowedImages }}
{{- if not $img }}
{{- fail (printf "trainer.allowedImages[%d] must be a non-empty image reference, got \"\"" $i) }}
{{- end }}
{{- end }}
{{- range $i, $ns := .Values.watchNamespaces }}
{{- if not (regexMatch "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$" $ns) }}
{{- fail (printf "watchNamespaces[%d] must be a namespace name (lowercase letters, digits and '-'), got %q" $i $ns) }}
{{- end }}
{{- end }}
{{- if and (not .Values.serviceAccount.create) (not .Values.serviceAccount.name) }}
{{- fail "serviceAccount.name must name an existing service account when serviceAccount.create is false, got \"\"" }}
{{- end }}
{{- if and (not .Values.trainer.serviceAccount.create) (not .Values.trainer.serviceAccount.name) }}
{{- fail "trainer.serviceAccount.name must name a service account that exists in every trainer namespace (for example default) when trainer.serviceAccount.create is false, got \"\"" }}
{{- end }}
{{- $managed := include "evaclip-operator.managedEnv" . | fromJsonArray }}
{{- range $i, $var := .Values.extraEnv }}
{{- if has $var.name $managed }}
{{- fail (printf "extraEnv[%d].name must not be a variable the chart sets from its values (%s), got %s" $i (join ", " $managed) $var.name) }}
{{- end }}
{{- end }}
{{- if and .Values.watchNamespaces .Values.trainer.namespaces }}
{{- fail (printf "trainer.namespaces must be empty when watchNamespaces is set (trainer pods run in the watched namespaces), got %v" .Values.trainer.namespaces) }}
{{- end }}
{{- end }}

{{/*
evaclip-operator.operatorRules: the RBAC rules of the operator, the same for the ClusterRole
(cluster-wide mode) and each namespaced Role. They list exactly the API calls the operator
makes; tests/chart/test_rbac.py derives those calls from the operator code and compares.
There is no delete: a resource's PyTorchJob and ConfigMap carry owner references, so
Kubernetes garbage collection removes them with it.
*/}}
{{- define "evaclip-operator.operatorRules" -}}
- apiGroups: ["training.evaclip.io"]
  resources: ["evaclipfinetunes"]
  verbs: ["get", "list", "watch", "patch"]
- apiGroups: ["training.evaclip.io"]
  resources: ["evaclipfinetunes/status"]
  verbs: ["patch"]
- apiGroups: ["kubeflow.org"]
  resources: ["pytorchjobs"]
  verbs: ["get", "list", "watch", "create", "patch"]
- apiGroups: [""]
  resources: ["configmaps"]
  verbs: ["get", "create", "patch"]
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create"]
{{- end }}

{{/*
evaclip-operator.trainerRules: the RBAC rules of the training pods: rank 0 patches the status
of its EvaClipFinetune to report progress and metrics (trainer/k8s_status.py), nothing else.
*/}}
{{- define "evaclip-operator.trainerRules" -}}
- apiGroups: ["training.evaclip.io"]
  resources: ["evaclipfinetunes/status"]
  verbs: ["patch"]
{{- end }}

{{/*
evaclip-operator.managedEnv: a JSON list of the environment variables the Deployment sets
from the values; extraEnv may not set them again.
*/}}
{{- define "evaclip-operator.managedEnv" -}}
{{- list "EVACLIP_WATCH_NAMESPACES" "EVACLIP_ALL_NAMESPACES" "EVACLIP_LIVENESS_ENDPOINT" "EVACLIP_METRICS_PORT" "EVACLIP_TRAINER_IMAGE" "EVACLIP_ALLOWED_TRAINER_IMAGES" "EVACLIP_TRAINER_SERVICE_ACCOUNT" "EVACLIP_GPU_RESOURCE_NAME" "EVACLIP_DEFAULT_NODE_SELECTOR" "EVACLIP_DEFAULT_TOLERATIONS" "EVACLIP_ALLOW_REMOTE_CODE" "EVACLIP_S3_ENDPOINT" "EVACLIP_S3_REGION" "EVACLIP_S3_CREDENTIALS_SECRET" "TMPDIR" | toJson }}
{{- end }}
