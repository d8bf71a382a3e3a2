{{/*
Expand the name of the chart.
*/}}
{{- define "dstream-fleet.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Create a default fully qualified app name, truncated to leave room for the longest
suffix ("-coordinator") within the 63 characters of a DNS label.
If release name contains chart name it will be used as a full name.
*/}}
{{- define "dstream-fleet.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 50 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 50 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 50 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Create chart name and version as used by the chart label.
*/}}
{{- define "dstream-fleet.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Common labels
*/}}
{{- define "dstream-fleet.labels" -}}
helm.sh/chart: {{ include "dstream-fleet.chart" . }}
{{ include "dstream-fleet.selectorLabels" . }}
{{- if .Chart.AppVersion }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: {{ include "dstream-fleet.name" . }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
Selector labels (the whole release: coordinator and workers)
*/}}
{{- define "dstream-fleet.selectorLabels" -}}
app.kubernetes.io/name: {{ include "dstream-fleet.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
Per-component names, labels and selector labels. Call with (dict "ctx" $ "component" "worker").
*/}}
{{- define "dstream-fleet.componentName" -}}
{{- printf "%s-%s" (include "dstream-fleet.fullname" .ctx) .component }}
{{- end }}

{{- define "dstream-fleet.componentLabels" -}}
{{ include "dstream-fleet.labels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "dstream-fleet.componentSelectorLabels" -}}
{{ include "dstream-fleet.selectorLabels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/*
Create the name of the service account to use
*/}}
{{- define "dstream-fleet.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "dstream-fleet.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
The container image
*/}}
{{- define "dstream-fleet.image" -}}
{{- $tag := default .Chart.AppVersion .Values.image.tag }}
{{- if .Values.image.registry }}
{{- printf "%s/%s:%s" .Values.image.registry .Values.image.repository $tag }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository $tag }}
{{- end }}
{{- end }}

{{/*
Object names shared by several templates
*/}}
{{- define "dstream-fleet.appConfigMapName" -}}
{{- if .Values.app.existingConfigMap }}
{{- .Values.app.existingConfigMap }}
{{- else }}
{{- printf "%s-app" (include "dstream-fleet.fullname" .) }}
{{- end }}
{{- end }}

{{- define "dstream-fleet.appConfigMapKey" -}}
{{- if .Values.app.existingConfigMap }}
{{- .Values.app.existingConfigMapKey }}
{{- else -}}
app.py
{{- end }}
{{- end }}

{{- define "dstream-fleet.settingsConfigMapName" -}}
{{- printf "%s-settings" (include "dstream-fleet.fullname" .) }}
{{- end }}

{{- define "dstream-fleet.rpcSecretName" -}}
{{- if .Values.rpc.existingSecret }}
{{- .Values.rpc.existingSecret }}
{{- else }}
{{- printf "%s-rpc" (include "dstream-fleet.fullname" .) }}
{{- end }}
{{- end }}

{{- define "dstream-fleet.coordinatorAddress" -}}
{{- printf "%s.%s.svc:%v" (include "dstream-fleet.componentName" (dict "ctx" . "component" "coordinator")) .Release.Namespace .Values.coordinator.ports.rpc }}
{{- end }}

{{- define "dstream-fleet.workerHeadlessName" -}}
{{- printf "%s-headless" (include "dstream-fleet.componentName" (dict "ctx" . "component" "worker")) }}
{{- end }}

{{/*
Environment shared by the coordinator and the workers: settings ConfigMap, secrets, TLS.
*/}}
{{- define "dstream-fleet.commonEnvFrom" -}}
- configMapRef:
    name: {{ include "dstream-fleet.settingsConfigMapName" . }}
{{- end }}

{{- define "dstream-fleet.commonEnv" -}}
- name: DSTREAM_SECRET
  valueFrom:
    secretKeyRef:
      name: {{ include "dstream-fleet.rpcSecretName" . }}
      key: {{ .Values.rpc.existingSecretKey }}
{{- if .Values.kafka.existingSecret }}
- name: DSTREAM_KAFKA_CONFIG
  valueFrom:
    secretKeyRef:
      name: {{ .Values.kafka.existingSecret }}
      key: {{ .Values.kafka.existingSecretKey }}
{{- end }}
{{- if .Values.redis.existingSecret }}
- name: DSTREAM_REDIS_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ .Values.redis.existingSecret }}
      key: {{ .Values.redis.existingSecretKey }}
{{- end }}
{{- if .Values.rpc.tls.enabled }}
- name: DSTREAM_TLS_CERT
  value: /etc/dstream/tls/{{ .Values.rpc.tls.certKey }}
- name: DSTREAM_TLS_KEY
  value: /etc/dstream/tls/{{ .Values.rpc.tls.keyKey }}
- name: DSTREAM_TLS_CA
  value: /etc/dstream/tls/{{ .Values.rpc.tls.caKey }}
{{- end }}
{{- end }}

{{- define "dstream-fleet.volumeMounts" -}}
- name: app
  mountPath: /app
  readOnly: true
- name: tmp
  mountPath: /tmp
{{- if .Values.rpc.tls.enabled }}
- name: tls
  mountPath: /etc/dstream/tls
  readOnly: true
{{- end }}
{{- with .Values.extraVolumeMounts }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "dstream-fleet.volumes" -}}
- name: app
  configMap:
    name: {{ include "dstream-fleet.appConfigMapName" . }}
    items:
      - key: {{ include "dstream-fleet.appConfigMapKey" . }}
        path: app.py
- name: tmp
  emptyDir:
    {{- with .Values.tmpVolume.sizeLimit }}
    sizeLimit: {{ . }}
    {{- end }}
{{- if .Values.rpc.tls.enabled }}
- name: tls
  secret:
    secretName: {{ required "rpc.tls.existingSecret is required when rpc.tls.enabled is true" .Values.rpc.tls.existingSecret }}
    defaultMode: 0440
    items:
      - key: {{ .Values.rpc.tls.certKey }}
        path: {{ .Values.rpc.tls.certKey }}
      - key: {{ .Values.rpc.tls.keyKey }}
        path: {{ .Values.rpc.tls.keyKey }}
      - key: {{ .Values.rpc.tls.caKey }}
        path: {{ .Values.rpc.tls.caKey }}
{{- end }}
{{- with .Values.extraVolumes }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
Pod annotations that roll the pods when the app file or the settings change.
*/}}
{{- define "dstream-fleet.checksumAnnotations" -}}
checksum/settings: {{ include (print .Template.BasePath "/configmap-settings.yaml") . | sha256sum }}
{{- if not .Values.app.existingConfigMap }}
checksum/app: {{ include (print .Template.BasePath "/configmap-app.yaml") . | sha256sum }}
{{- end }}
{{- end }}

{{/*
Egress ports derived from the configured addresses, as a comma-separated list (first seen
first, no duplicates), followed by networkPolicy.<kafka|redis>.extraPorts.
Kafka: the port of every host:port in kafka.bootstrap (librdkafka's default 9092 when an
entry has none). Redis: the port of redis.url (6379 for redis:// and rediss:// without
one; nothing for unix://, a local socket).
*/}}
{{- define "dstream-fleet.kafkaPorts" -}}
{{- $ports := list }}
{{- range splitList "," .Values.kafka.bootstrap }}
{{- $entry := trim . }}
{{- if $entry }}
{{- $port := regexFind ":[0-9]+$" $entry | trimPrefix ":" }}
{{- $ports = append $ports (default "9092" $port) }}
{{- end }}
{{- end }}
{{- range .Values.networkPolicy.kafka.extraPorts }}
{{- $ports = append $ports (toString .) }}
{{- end }}
{{- $ports | uniq | join "," }}
{{- end }}

{{- define "dstream-fleet.redisPorts" -}}
{{- $ports := list }}
{{- $url := urlParse .Values.redis.url }}
{{- if has $url.scheme (list "redis" "rediss") }}
{{- $port := regexFind ":[0-9]+$" $url.host | trimPrefix ":" }}
{{- $ports = append $ports (default "6379" $port) }}
{{- end }}
{{- range .Values.networkPolicy.redis.extraPorts }}
{{- $ports = append $ports (toString .) }}
{{- end }}
{{- $ports | uniq | join "," }}
{{- end }}

{{/*
The optional startupProbe on the http port; liveness and readiness probes start only once it
has passed. Call with the role's startupProbe values (timings; "enabled" is left out).
*/}}
{{- define "dstream-fleet.startupProbe" -}}
startupProbe:
  httpGet:
    path: /livez
    port: http
  {{- toYaml (omit . "enabled") | nindent 2 }}
{{- end }}
