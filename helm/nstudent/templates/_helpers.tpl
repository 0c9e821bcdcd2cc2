{{/* Names: at most 63 characters, the DNS-1123 label limit. */}}
{{- define "nstudent.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "nstudent.fullname" -}}
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

{{- define "nstudent.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "nstudent.labels" -}}
helm.sh/chart: {{ include "nstudent.chart" . }}
{{ include "nstudent.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "nstudent.selectorLabels" -}}
app.kubernetes.io/name: {{ include "nstudent.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "nstudent.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "nstudent.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
The RayCluster's name. KubeRay names the head's Service <name>-head-svc and shortens names over 50
characters, so the name stays within 41 characters and the Service name is known in advance.
*/}}
{{- define "nstudent.rayClusterName" -}}
{{- printf "%s-raycluster" (include "nstudent.fullname" .) | trunc 41 | trimSuffix "-" }}
{{- end }}

{{/* The Ray dashboard URL (Jobs API) that the control plane talks to: RAY_ADDRESS. */}}
{{- define "nstudent.rayAddress" -}}
{{- if .Values.ray.enabled }}
{{- printf "http://%s-head-svc.%s.svc:8265" (include "nstudent.rayClusterName" .) .Release.Namespace }}
{{- else }}
{{- required "ray.existingAddress is required when ray.enabled is false" .Values.ray.existingAddress }}
{{- end }}
{{- end }}

{{- define "nstudent.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{- define "nstudent.gpuImage" -}}
{{- $g := .Values.ray.gpuWorkers.image }}
{{- printf "%s:%s" (default .Values.image.repository $g.repository) (default (default .Chart.AppVersion .Values.image.tag) $g.tag) }}
{{- end }}

{{/* Secrets: the chart's own, unless the user names one of theirs. */}}
{{- define "nstudent.secretName" -}}
{{- include "nstudent.fullname" . }}
{{- end }}

{{- define "nstudent.authSecretName" -}}
{{- default (include "nstudent.secretName" .) .Values.auth.existingSecret }}
{{- end }}

{{- define "nstudent.databaseSecretName" -}}
{{- default (include "nstudent.secretName" .) .Values.database.existingSecret }}
{{- end }}

{{- define "nstudent.rayAuthSecretName" -}}
{{- default (printf "%s-ray-auth" (include "nstudent.fullname" .)) .Values.ray.auth.existingSecret }}
{{- end }}

{{- define "nstudent.storageSecretName" -}}
{{- default (printf "%s-storage" (include "nstudent.fullname" .)) .Values.storage.existingSecret }}
{{- end }}

{{- define "nstudent.hasStorageCredentials" -}}
{{- if or .Values.storage.existingSecret (and .Values.storage.accessKeyId .Values.storage.secretAccessKey) }}true{{ end }}
{{- end }}

{{- define "nstudent.usesSqlite" -}}
{{- if not (or .Values.database.url .Values.database.existingSecret) }}true{{ end }}
{{- end }}

{{/*
A value kept across upgrades: the one already in the release's Secret (looked up in the cluster), or a new
random one at install. Arguments: (list $ secretName key length).
*/}}
{{- define "nstudent.keptRandom" -}}
{{- $top := index . 0 }}
{{- $existing := lookup "v1" "Secret" $top.Release.Namespace (index . 1) }}
{{- if and $existing $existing.data (hasKey $existing.data (index . 2)) }}
{{- index $existing.data (index . 2) | b64dec }}
{{- else }}
{{- randAlphaNum (index . 3) }}
{{- end }}
{{- end }}

{{/*
The storage environment, the same for the control plane and every Ray container: the standard AWS
variables that service/storage.py reads in every process.
*/}}
{{- define "nstudent.storageEnv" -}}
{{- if .Values.storage.endpointUrl }}
- name: AWS_ENDPOINT_URL
  value: {{ .Values.storage.endpointUrl | quote }}
{{- end }}
{{- if .Values.storage.region }}
- name: AWS_REGION
  value: {{ .Values.storage.region | quote }}
{{- end }}
{{- if include "nstudent.hasStorageCredentials" . }}
- name: AWS_ACCESS_KEY_ID
  valueFrom:
    secretKeyRef:
      name: {{ include "nstudent.storageSecretName" . }}
      key: AWS_ACCESS_KEY_ID
- name: AWS_SECRET_ACCESS_KEY
  valueFrom:
    secretKeyRef:
      name: {{ include "nstudent.storageSecretName" . }}
      key: AWS_SECRET_ACCESS_KEY
- name: AWS_SESSION_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ include "nstudent.storageSecretName" . }}
      key: AWS_SESSION_TOKEN
      optional: true
{{- end }}
{{- end }}

{{/* Ray token authentication, for every Ray container and the autoscaler. */}}
{{- define "nstudent.rayAuthEnv" -}}
{{- if .Values.ray.auth.enabled }}
- name: RAY_AUTH_MODE
  value: token
- name: RAY_AUTH_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ include "nstudent.rayAuthSecretName" . }}
      key: {{ .Values.ray.auth.existingSecretKey }}
{{- end }}
{{- end }}
