{{/* Refuse combinations of values that cannot work, with a message that says what to change. */}}
{{- define "nstudent.validate" -}}
{{- if and (include "nstudent.usesSqlite" .) (gt (int .Values.controlPlane.replicas) 1) }}
{{- fail "controlPlane.replicas > 1 needs PostgreSQL: set database.url or database.existingSecret (SQLite serves one replica)" }}
{{- end }}
{{- if and (not .Values.storage.existingSecret) (or .Values.storage.accessKeyId .Values.storage.secretAccessKey) (not (and .Values.storage.accessKeyId .Values.storage.secretAccessKey)) }}
{{- fail "storage.accessKeyId and storage.secretAccessKey go together" }}
{{- end }}
{{- if and .Values.ray.enabled .Values.ray.existingAddress }}
{{- fail "ray.existingAddress is used only with ray.enabled=false" }}
{{- end }}
{{- if and .Values.ray.enabled (not .Values.ray.cpuWorkers.enabled) (not .Values.ray.gpuWorkers.enabled) }}
{{- fail "ray.enabled needs at least one worker group (ray.cpuWorkers or ray.gpuWorkers)" }}
{{- end }}
{{- range $group := list "cpuWorkers" "gpuWorkers" }}
{{- $g := index $.Values.ray $group }}
{{- if and $g.enabled (or (gt (int $g.minReplicas) (int $g.maxReplicas)) (lt (int $g.replicas) (int $g.minReplicas)) (gt (int $g.replicas) (int $g.maxReplicas))) }}
{{- fail (printf "ray.%s: need minReplicas <= replicas <= maxReplicas" $group) }}
{{- end }}
{{- end }}
{{- end }}
