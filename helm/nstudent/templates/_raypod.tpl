{{/*
The pod template of a Ray node (head or worker): the project's image, Ray token authentication, and the
storage environment that the jobs' Ray Data and Ray Train workers read.
Arguments: dict with top, group (the values of the group), component, container, image, resources, head.
*/}}
{{- define "nstudent.rayPodTemplate" -}}
{{- $top := .top }}
{{- $ray := $top.Values.ray }}
metadata:
  labels:
    {{- include "nstudent.selectorLabels" $top | nindent 4 }}
    app.kubernetes.io/component: {{ .component }}
spec:
  {{- with $ray.serviceAccountName }}
  serviceAccountName: {{ . }}
  {{- end }}
  {{- with $top.Values.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $ray.podSecurityContext }}
  securityContext:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  containers:
    - name: {{ .container }}
      image: {{ .image | quote }}
      imagePullPolicy: {{ $top.Values.image.pullPolicy }}
      {{- if .head }}
      ports:
        - name: gcs-server
          containerPort: 6379
        - name: dashboard
          containerPort: 8265
        - name: client
          containerPort: 10001
      {{- end }}
      {{- $env := printf "%s\n%s" (include "nstudent.rayAuthEnv" $top | trim) (include "nstudent.storageEnv" $top | trim) | trim }}
      {{- if or $env $ray.extraEnv }}
      env:
        {{- with $env }}
        {{- . | nindent 8 }}
        {{- end }}
        {{- with $ray.extraEnv }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      {{- end }}
      {{- with .resources }}
      resources:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      securityContext:
        allowPrivilegeEscalation: false
        capabilities:
          drop: ["ALL"]
  {{- with .group.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .group.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .group.affinity }}
  affinity:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end }}
