{{/* Name of the chart, or nameOverride. */}}
{{- define "modelloop.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name: release-chart, shortened to fit a DNS label. */}}
{{- define "modelloop.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "modelloop.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "modelloop.selectorLabels" -}}
app.kubernetes.io/name: {{ include "modelloop.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "modelloop.labels" -}}
helm.sh/chart: {{ include "modelloop.chart" . }}
{{ include "modelloop.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: modelloop
{{- end }}

{{- define "modelloop.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "modelloop.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The jobs' own account: no API access, no token. */}}
{{- define "modelloop.jobServiceAccountName" -}}
{{- printf "%s-job" (include "modelloop.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "modelloop.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* The serving container's: serving.image where set (the Dockerfile's serving target), else the full image. */}}
{{- define "modelloop.servingImage" -}}
{{- $tag := default .Chart.AppVersion .Values.image.tag }}
{{- printf "%s:%s" (default .Values.image.repository .Values.serving.image.repository) (default $tag .Values.serving.image.tag) }}
{{- end }}

{{- define "modelloop.registryClaim" -}}
{{- default (printf "%s-registry" (include "modelloop.fullname" .)) .Values.registry.persistence.existingClaim }}
{{- end }}

{{- define "modelloop.apiKeySecret" -}}
{{- default (printf "%s-api-key" (include "modelloop.fullname" .)) .Values.apiKey.existingSecret }}
{{- end }}

{{- define "modelloop.storeSecret" -}}
{{- default (printf "%s-store" (include "modelloop.fullname" .)) .Values.monitor.store.existingSecret }}
{{- end }}

{{/*
The sidecar's role keys: data keys `api-key`, `ingest-key`, `feedback-key`, `alertmanager-key`.
`dig`: values reused (helm upgrade --reuse-values) from a release before monitor.keys lack it.
*/}}
{{- define "modelloop.monitorKeysSecret" -}}
{{- default (printf "%s-monitor-keys" (include "modelloop.fullname" .)) (dig "keys" "existingSecret" "" .Values.monitor) }}
{{- end }}

{{/* An env entry `name` read from data key `key` of the sidecar's keys Secret. */}}
{{- define "modelloop.monitorKeyEnv" -}}
- name: {{ .name }}
  valueFrom:
    secretKeyRef:
      name: {{ include "modelloop.monitorKeysSecret" .root }}
      key: {{ .key }}
{{- end }}

{{/*
Keys belong in Secrets: a key field given among `settings` (which become the ConfigMap) stops
the render instead of being written there or silently dropped.
*/}}
{{- define "modelloop.noKeysIn" -}}
{{- $settings := .settings }}
{{- range $field := .fields }}
{{- if hasKey $settings $field }}
{{- fail (printf "values: %s.%s would put a key into the settings ConfigMap; %s" $.path $field $.instead) }}
{{- end }}
{{- end }}
{{- end }}

{{/*
A settings value as an environment string: booleans lower-case, whole numbers without an
exponent (values arrive as float64), lists and maps as JSON (pydantic-settings parses them).
*/}}
{{- define "modelloop.envValue" -}}
{{- $v := . }}
{{- if kindIs "bool" $v }}{{ ternary "true" "false" $v }}
{{- else if and (kindIs "float64" $v) (eq (float64 (int64 $v)) $v) }}{{ int64 $v }}
{{- else if or (kindIs "slice" $v) (kindIs "map" $v) }}{{ toJson $v }}
{{- else }}{{ toString $v }}
{{- end }}
{{- end }}

{{/* `prefix` + each key of `settings` upper-cased: one env var per settings field. */}}
{{- define "modelloop.settingsEnv" -}}
{{- $prefix := .prefix }}
{{- range $key, $value := .settings }}
{{- if not (kindIs "invalid" $value) }}
{{ printf "%s%s" $prefix (upper $key) }}: {{ include "modelloop.envValue" $value | quote }}
{{- end }}
{{- end }}
{{- end }}

{{/* Volumes every modelloop pod has: the registry, /tmp and the run dir. */}}
{{- define "modelloop.registryVolume" -}}
- name: registry
{{- if .Values.registry.volume }}
{{- toYaml .Values.registry.volume | nindent 2 }}
{{- else if .Values.registry.persistence.enabled }}
  persistentVolumeClaim:
    claimName: {{ include "modelloop.registryClaim" . }}
{{- else }}
  emptyDir: {}
{{- end }}
{{- end }}

{{- define "modelloop.tmpVolume" -}}
- name: tmp
  emptyDir:
    medium: Memory
    sizeLimit: {{ .Values.tmpSizeLimit }}
{{- end }}

{{- define "modelloop.jobPodSpec" -}}
serviceAccountName: {{ include "modelloop.jobServiceAccountName" . }}
automountServiceAccountToken: false
restartPolicy: Never
securityContext:
  {{- toYaml .Values.podSecurityContext | nindent 2 }}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
volumes:
  {{- include "modelloop.registryVolume" . | nindent 2 }}
  {{- include "modelloop.tmpVolume" . | nindent 2 }}
{{- end }}

{{/* The container fields every job shares; the caller adds name and args. */}}
{{- define "modelloop.jobContainer" -}}
image: {{ include "modelloop.image" . }}
imagePullPolicy: {{ .Values.image.pullPolicy }}
envFrom:
  - configMapRef:
      name: {{ include "modelloop.fullname" . }}-settings
securityContext:
  {{- toYaml .Values.securityContext | nindent 2 }}
resources:
  {{- toYaml .Values.jobs.resources | nindent 2 }}
volumeMounts:
  - name: registry
    mountPath: /var/lib/modelloop
  - name: tmp
    mountPath: /tmp
{{- end }}

{{/* Non-empty when the sidecar starts retraining Jobs through the Kubernetes API. */}}
{{- define "modelloop.sidecarUsesApi" -}}
{{- if and .Values.monitor.enabled (eq (toString (default "" .Values.monitor.settings.trigger)) "kubernetes") }}true{{ end }}
{{- end }}

{{/* The sidecars behind the Service: where jobs in other pods fetch labelled data. */}}
{{- define "modelloop.sidecarServiceUrl" -}}
{{- printf "http://%s.%s.svc:%v" (include "modelloop.fullname" .) .Release.Namespace .Values.service.monitorPort }}
{{- end }}
