{{/*
Helpers of the tollgate chart: names, labels, images, the rendered tollgate
config, and the shutdown arithmetic that ties the pod's grace period to
tollgate's drain settings.
*/}}

{{/* The chart name, or nameOverride. */}}
{{- define "tollgate.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/*
The full name of the release's resources: fullnameOverride, else
<release>-<name> (just <release> when it already contains the name).
*/}}
{{- define "tollgate.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* name-version, for the helm.sh/chart label. */}}
{{- define "tollgate.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Labels of every resource. */}}
{{- define "tollgate.labels" -}}
helm.sh/chart: {{ include "tollgate.chart" . }}
{{ include "tollgate.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: tollgate
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Labels that select the pods (immutable in a Deployment: never add to them). */}}
{{- define "tollgate.selectorLabels" -}}
app.kubernetes.io/name: {{ include "tollgate.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* The ServiceAccount the pods run as. */}}
{{- define "tollgate.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "tollgate.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* An image reference; call with (dict "image" .Values.image.tollgate "root" $). */}}
{{- define "tollgate.image" -}}
{{- printf "%s:%s" .image.repository (default .root.Chart.AppVersion .image.tag | toString) -}}
{{- end -}}

{{/* The ConfigMap holding tollgate.yaml. */}}
{{- define "tollgate.configMapName" -}}
{{- default (printf "%s-config" (include "tollgate.fullname" .)) .Values.tollgate.existingConfigMap -}}
{{- end -}}

{{/* The Secret the chart makes for a database URL given in values (non-SQLite). */}}
{{- define "tollgate.databaseSecretName" -}}
{{- printf "%s-database" (include "tollgate.fullname" .) -}}
{{- end -}}

{{/* "true" when the backend's database is SQLite given in values. */}}
{{- define "tollgate.sqlite" -}}
{{- if and (not .Values.backend.database.existingSecret) (hasPrefix "sqlite:" .Values.backend.database.url) -}}
true
{{- end -}}
{{- end -}}

{{/*
Whole seconds (rounded up) of a duration written as tollgate writes them:
one or more <number><unit>, unit ms, s, m or min, h, d, w (e.g. 5s, 1m30s,
500ms). values.schema.json holds the chart to this form where it computes.
*/}}
{{- define "tollgate.seconds" -}}
{{- $text := toString . | trim -}}
{{- if not (regexMatch "^([0-9]+(ms|min|s|m|h|d|w))+$" $text) -}}
{{- fail (printf "tollgate: %q is not a duration the chart can read; write e.g. 500ms, 5s, 1m30s" $text) -}}
{{- end -}}
{{- $ms := 0 -}}
{{- range regexFindAll "[0-9]+(ms|min|s|m|h|d|w)" $text -1 -}}
{{- $n := regexFind "^[0-9]+" . -}}
{{- $unit := trimPrefix $n . -}}
{{- $factor := get (dict "ms" 1 "s" 1000 "m" 60000 "min" 60000 "h" 3600000 "d" 86400000 "w" 604800000) $unit -}}
{{- $ms = add $ms (mul (atoi $n) $factor) -}}
{{- end -}}
{{- div (add $ms 999) 1000 -}}
{{- end -}}

{{/* tollgate's listener.drain_delay in seconds (tollgate's default: 0s). */}}
{{- define "tollgate.drainDelaySeconds" -}}
{{- $listener := default (dict) .Values.tollgate.config.listener -}}
{{- include "tollgate.seconds" (default "0s" $listener.drain_delay) -}}
{{- end -}}

{{/* tollgate's listener.drain_timeout in seconds (tollgate's default: 20s). */}}
{{- define "tollgate.drainTimeoutSeconds" -}}
{{- $listener := default (dict) .Values.tollgate.config.listener -}}
{{- include "tollgate.seconds" (default "20s" $listener.drain_timeout) -}}
{{- end -}}

{{/*
How long the backend keeps serving after it is told to stop.
classic: both containers get SIGTERM together, and tollgate goes on
  forwarding calls for drain_delay (new connections) plus drain_timeout
  (calls in flight): the backend must outlast both, plus a second for the
  two signals to land.
native: the backend is stopped first while tollgate still accepts; it
  keeps serving for drain_delay, the same window tollgate allows for the
  endpoint removal to reach every client, before it stops taking calls.
*/}}
{{- define "tollgate.backendHoldSeconds" -}}
{{- $delay := include "tollgate.drainDelaySeconds" . | int -}}
{{- $timeout := include "tollgate.drainTimeoutSeconds" . | int -}}
{{- if eq .Values.sidecar.mode "native" -}}
{{- $delay -}}
{{- else -}}
{{- add $delay $timeout 1 -}}
{{- end -}}
{{- end -}}

{{/*
The pod's grace period, unless set: the backend's hold and drain, and in
native mode tollgate's own drain after it, plus 5 s of slack before SIGKILL.
*/}}
{{- define "tollgate.terminationGracePeriodSeconds" -}}
{{- if not (kindIs "invalid" .Values.terminationGracePeriodSeconds) -}}
{{- .Values.terminationGracePeriodSeconds | int -}}
{{- else -}}
{{- $hold := include "tollgate.backendHoldSeconds" . | int -}}
{{- $backendDrain := include "tollgate.seconds" .Values.backend.shutdown.drainTimeout | int -}}
{{- $total := add $hold $backendDrain 5 -}}
{{- if eq .Values.sidecar.mode "native" -}}
{{- $total = add $total (include "tollgate.drainDelaySeconds" . | int) (include "tollgate.drainTimeoutSeconds" . | int) -}}
{{- end -}}
{{- $total -}}
{{- end -}}
{{- end -}}

{{/*
The tollgate config file: tollgate.config with what the chart owns filled
in (listener and admin addresses, listener TLS, the backend upstream's
address). Rendered key by key so the file reads in the order of
config/dev.yaml.
*/}}
{{- define "tollgate.configFile" -}}
{{- $cfg := deepCopy .Values.tollgate.config -}}
{{- $listener := default (dict) $cfg.listener -}}
{{- $_ := set $listener "address" (printf "0.0.0.0:%d" (int .Values.tollgate.ports.grpc)) -}}
{{- if and .Values.tollgate.tls.enabled (not $listener.tls) -}}
{{- $tls := dict "cert" (printf "%s/tls.crt" .Values.tollgate.tls.mountPath) "key" (printf "%s/tls.key" .Values.tollgate.tls.mountPath) -}}
{{- if .Values.tollgate.tls.clientCA -}}
{{- $_ := set $tls "client_ca" (printf "%s/ca.crt" .Values.tollgate.tls.mountPath) -}}
{{- end -}}
{{- $_ := set $listener "tls" $tls -}}
{{- end -}}
{{- $upstreams := default (dict) $cfg.upstreams -}}
{{- $backend := default (dict) (get $upstreams "payment-backend") -}}
{{- if not $backend.addresses -}}
{{- $_ := set $backend "addresses" (list (printf "127.0.0.1:%d" (int .Values.backend.ports.grpc))) -}}
{{- end -}}
{{- $_ := set $upstreams "payment-backend" $backend -}}
# tollgate's config, rendered by the {{ include "tollgate.chart" . }} chart from
# .Values.tollgate.config. Edit the values (helm upgrade) or this ConfigMap:
# tollgate reloads it within seconds, and keeps the last good config when
# the new one is invalid (tollgate_config_reloads_total{result="failure"}).
listener:
{{- toYaml $listener | nindent 2 }}
admin:
  address: {{ printf "0.0.0.0:%d" (int .Values.tollgate.ports.admin) | quote }}
upstreams:
{{- toYaml $upstreams | nindent 2 }}
{{- with $cfg.limiter }}
limiter:
{{- toYaml . | nindent 2 }}
{{- end }}
{{- with $cfg.routes }}
routes:
{{- range . }}
{{- include "tollgate.orderedItem" (dict "map" . "first" (list "name" "match" "upstream" "timeout") "last" (list "limits")) | trim | nindent 2 }}
{{- range .limits }}
{{- include "tollgate.orderedItem" (dict "map" . "first" (list "name" "key" "rate" "algorithm") "last" (list)) | trim | nindent 6 }}
{{- end }}
{{- end }}
{{- end }}
{{- end -}}

{{/*
One list item of a map, keys in a reading order: "first" in that order,
then the others sorted, leaving out the "last" keys, which end the item as
a bare "key:" line for the caller to fill (a route's limits). Values are
plain YAML scalars, or flow-style JSON for maps and lists (YAML reads it the
same):
  - name: create-per-merchant
    key: [{"header":"x-merchant-id"}]
*/}}
{{- define "tollgate.orderedItem" -}}
{{- $map := .map -}}
{{- $keys := list -}}
{{- range .first -}}
{{- if hasKey $map . -}}
{{- $keys = append $keys . -}}
{{- end -}}
{{- end -}}
{{- $skip := concat .first .last -}}
{{- range (keys $map | sortAlpha) -}}
{{- if not (has . $skip) -}}
{{- $keys = append $keys . -}}
{{- end -}}
{{- end -}}
{{- range $i, $k := $keys }}
{{- $v := get $map $k }}
{{ if eq $i 0 }}- {{ else }}  {{ end }}{{ $k }}: {{ if or (kindIs "map" $v) (kindIs "slice" $v) }}{{ toJson $v }}{{ else }}{{ toYaml $v | trim }}{{ end }}
{{- end }}
{{- range .last }}
{{- if get $map . }}
  {{ . }}:
{{- end }}
{{- end }}
{{- end -}}

{{/*
Checks of value combinations the schema cannot express; each fails the
render with what to change.
*/}}
{{- define "tollgate.validateValues" -}}
{{- if and (eq .Values.sidecar.mode "native") (not (semverCompare ">=1.29.0-0" .Capabilities.KubeVersion.Version)) -}}
{{- fail (printf "sidecar.mode=native needs Kubernetes 1.29 or later (init containers with restartPolicy: Always); this cluster is %s: use sidecar.mode=classic" .Capabilities.KubeVersion.Version) -}}
{{- end -}}
{{- if and (eq .Values.backend.shutdown.holdWith "preStopSleep") (not (semverCompare ">=1.30.0-0" .Capabilities.KubeVersion.Version)) -}}
{{- fail (printf "backend.shutdown.holdWith=preStopSleep needs Kubernetes 1.30 or later (the preStop sleep action); this cluster is %s: use shutdownDelay" .Capabilities.KubeVersion.Version) -}}
{{- end -}}
{{- if and .Values.tollgate.tls.enabled (not .Values.tollgate.tls.secretName) -}}
{{- fail "tollgate.tls.enabled needs tollgate.tls.secretName: a kubernetes.io/tls Secret with tls.crt and tls.key" -}}
{{- end -}}
{{- $redis := .Values.tollgate.redis -}}
{{- if and (or $redis.urlKey $redis.usernameKey $redis.passwordKey) (not $redis.existingSecret) -}}
{{- fail "tollgate.redis.urlKey/usernameKey/passwordKey name keys of tollgate.redis.existingSecret: set it too" -}}
{{- end -}}
{{- if and $redis.existingSecret (not (or $redis.urlKey $redis.usernameKey $redis.passwordKey)) -}}
{{- fail "tollgate.redis.existingSecret is set but none of urlKey, usernameKey, passwordKey: name the key(s) that hold the credentials" -}}
{{- end -}}
{{- if and (not .Values.tollgate.existingConfigMap) (not .Values.tollgate.config.routes) -}}
{{- fail "tollgate.config.routes is empty: every call would be UNIMPLEMENTED; keep at least `- match: {}` with `upstream: payment-backend`" -}}
{{- end -}}
{{- if and (not .Values.backend.database.existingSecret) (not .Values.backend.database.url) -}}
{{- fail "backend.database: set url (sqlite://… or postgres://…) or existingSecret" -}}
{{- end -}}
{{- if and .Values.monitoring.podMonitor.enabled (not .Values.declareContainerPorts) -}}
{{- fail "monitoring.podMonitor scrapes the container ports by name: it needs declareContainerPorts: true" -}}
{{- end -}}
{{- $ports := list (int .Values.tollgate.ports.grpc) (int .Values.tollgate.ports.admin) (int .Values.backend.ports.grpc) (int .Values.backend.ports.metrics) -}}
{{- if ne (len (uniq $ports)) 4 -}}
{{- fail (printf "tollgate.ports.grpc, tollgate.ports.admin, backend.ports.grpc and backend.ports.metrics share the pod's network: they must differ, got %v" $ports) -}}
{{- end -}}
{{- end -}}
