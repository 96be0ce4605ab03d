{{- define "tsgpu.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "tsgpu.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "tsgpu.selectorLabels" -}}
app.kubernetes.io/name: {{ include "tsgpu.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "tsgpu.labels" -}}
{{ include "tsgpu.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{/* Token auth may only be off with a stated reason: the APIs listen beyond loopback in the pod. */}}
{{- define "tsgpu.checkSecurity" -}}
{{- if and (not .Values.security.tokenAuth.enabled) (not .Values.security.tokenAuth.disabledReason) -}}
{{- fail "security.tokenAuth.enabled=false: set security.tokenAuth.disabledReason to say what protects the APIs instead (TorchServe binds beyond loopback in the pod)" -}}
{{- end -}}
{{- if and (eq .Values.modelStore.source "image") (not .Values.modelStore.image.repository) -}}
{{- fail "modelStore.source=image needs modelStore.image.repository (an image holding the .mar files under modelStore.image.path)" -}}
{{- end -}}
{{- if and (eq .Values.modelStore.source "objectStorage") (or (not .Values.modelStore.objectStorage.image) (not .Values.modelStore.objectStorage.command)) -}}
{{- fail "modelStore.source=objectStorage needs modelStore.objectStorage.image and .command (which writes the archives into $MODEL_STORE)" -}}
{{- end -}}
{{- if not (has .Values.modelStore.source (list "pvc" "image" "objectStorage")) -}}
{{- fail (printf "modelStore.source=%q: use pvc, image or objectStorage" .Values.modelStore.source) -}}
{{- end -}}
{{- if and (or .Values.autoscaling.hpa.enabled .Values.autoscaling.keda.enabled) (not .Values.autoscaling.model) -}}
{{- fail "autoscaling needs autoscaling.model: the model whose queue drives the number of pods" -}}
{{- end -}}
{{- if and .Values.autoscaling.hpa.enabled .Values.autoscaling.keda.enabled -}}
{{- fail "autoscaling.hpa.enabled and autoscaling.keda.enabled: choose one (KEDA creates its own HPA)" -}}
{{- end -}}
{{- end -}}
