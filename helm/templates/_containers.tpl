{{/*
The two containers of the pod. deployment.yaml places tollgate among the
containers (sidecar.mode=classic) or first among the init containers with
restartPolicy: Always (sidecar.mode=native).
*/}}

{{/* A probe's timings; call with the probe's values. */}}
{{- define "tollgate.probeTimings" -}}
initialDelaySeconds: {{ .initialDelaySeconds }}
periodSeconds: {{ .periodSeconds }}
timeoutSeconds: {{ .timeoutSeconds }}
failureThreshold: {{ .failureThreshold }}
successThreshold: {{ .successThreshold }}
{{- end -}}

{{/* The tollgate container. */}}
{{- define "tollgate.tollgateContainer" -}}
{{- $t := .Values.tollgate -}}
- name: tollgate
  image: {{ include "tollgate.image" (dict "image" .Values.image.tollgate "root" .) | quote }}
  imagePullPolicy: {{ .Values.image.pullPolicy }}
  {{- if eq .Values.sidecar.mode "native" }}
  # A native sidecar: started before the backend (once its startupProbe
  # passes) and stopped after it.
  restartPolicy: Always
  {{- end }}
  args: ["run"]
  env:
    - name: TOLLGATE_CONFIG
      value: /etc/tollgate/tollgate.yaml
    - name: TOLLGATE_LISTEN
      value: {{ printf "0.0.0.0:%d" (int $t.ports.grpc) | quote }}
    # Set explicitly: tollgate binds its admin server to loopback unless told.
    - name: TOLLGATE_ADMIN_LISTEN
      value: {{ printf "0.0.0.0:%d" (int $t.ports.admin) | quote }}
    - name: TOLLGATE_LOG
      value: {{ $t.log.level | quote }}
    - name: TOLLGATE_LOG_FORMAT
      value: {{ $t.log.format | quote }}
    {{- with $t.redis }}
    {{- if .urlKey }}
    - name: TOLLGATE_REDIS_URL
      valueFrom:
        secretKeyRef:
          name: {{ .existingSecret | quote }}
          key: {{ .urlKey | quote }}
    {{- end }}
    {{- if .usernameKey }}
    - name: TOLLGATE_REDIS_USERNAME
      valueFrom:
        secretKeyRef:
          name: {{ .existingSecret | quote }}
          key: {{ .usernameKey | quote }}
    {{- end }}
    {{- if .passwordKey }}
    - name: TOLLGATE_REDIS_PASSWORD
      valueFrom:
        secretKeyRef:
          name: {{ .existingSecret | quote }}
          key: {{ .passwordKey | quote }}
    {{- end }}
    {{- end }}
    {{- with $t.extraEnv }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- if .Values.declareContainerPorts }}
  ports:
    - name: grpc
      containerPort: {{ $t.ports.grpc }}
      protocol: TCP
    - name: admin
      containerPort: {{ $t.ports.admin }}
      protocol: TCP
  {{- end }}
  {{- with $t.startupProbe }}
  {{- if .enabled }}
  startupProbe:
    httpGet:
      path: /ready
      port: {{ $t.ports.admin }}
    {{- include "tollgate.probeTimings" . | nindent 4 }}
  {{- end }}
  {{- end }}
  {{- with $t.livenessProbe }}
  {{- if .enabled }}
  livenessProbe:
    httpGet:
      path: /live
      port: {{ $t.ports.admin }}
    {{- include "tollgate.probeTimings" . | nindent 4 }}
  {{- end }}
  {{- end }}
  {{- with $t.readinessProbe }}
  {{- if .enabled }}
  readinessProbe:
    httpGet:
      path: /ready
      port: {{ $t.ports.admin }}
    {{- include "tollgate.probeTimings" . | nindent 4 }}
  {{- end }}
  {{- end }}
  # No preStop hook: at SIGTERM tollgate itself fails /ready and keeps
  # accepting for listener.drain_delay (what a `preStop: sleep` does for
  # other servers), then sends GOAWAY and waits up to listener.drain_timeout.
  {{- with $t.resources }}
  resources:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $t.securityContext }}
  securityContext:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  volumeMounts:
    # A directory, never a subPath: Kubernetes swaps the ConfigMap's ..data
    # symlink on every edit and tollgate follows it (hot reload).
    - name: tollgate-config
      mountPath: /etc/tollgate
      readOnly: true
    {{- if $t.tls.enabled }}
    - name: tollgate-tls
      mountPath: {{ $t.tls.mountPath }}
      readOnly: true
    {{- end }}
    {{- with $t.extraVolumeMounts }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
{{- end -}}

{{/* The payment-backend container. */}}
{{- define "tollgate.backendContainer" -}}
{{- $b := .Values.backend -}}
{{- $hold := include "tollgate.backendHoldSeconds" . | int -}}
{{- $health := list "payment-backend" "health" "--address" (printf "127.0.0.1:%d" (int $b.ports.grpc)) -}}
- name: payment-backend
  image: {{ include "tollgate.image" (dict "image" .Values.image.backend "root" .) | quote }}
  imagePullPolicy: {{ .Values.image.pullPolicy }}
  args: ["serve"]
  env:
    # Loopback only: nothing outside the pod reaches the backend but
    # through tollgate.
    - name: PAYMENT_BACKEND_LISTEN
      value: {{ printf "127.0.0.1:%d" (int $b.ports.grpc) | quote }}
    - name: PAYMENT_BACKEND_METRICS_LISTEN
      value: {{ printf "0.0.0.0:%d" (int $b.ports.metrics) | quote }}
    - name: PAYMENT_BACKEND_DATABASE_URL
    {{- if $b.database.existingSecret }}
      valueFrom:
        secretKeyRef:
          name: {{ $b.database.existingSecret | quote }}
          key: {{ $b.database.existingSecretKey | quote }}
    {{- else if include "tollgate.sqlite" . }}
      value: {{ $b.database.url | quote }}
    {{- else }}
      valueFrom:
        secretKeyRef:
          name: {{ include "tollgate.databaseSecretName" . | quote }}
          key: database-url
    {{- end }}
    - name: PAYMENT_BACKEND_DATABASE_MAX_CONNECTIONS
      value: {{ $b.database.maxConnections | int | toString | quote }}
    {{- if $b.kafka.existingSecret }}
    - name: PAYMENT_BACKEND_KAFKA_BROKERS
      valueFrom:
        secretKeyRef:
          name: {{ $b.kafka.existingSecret | quote }}
          key: {{ $b.kafka.existingSecretKey | quote }}
    {{- else if $b.kafka.brokers }}
    - name: PAYMENT_BACKEND_KAFKA_BROKERS
      value: {{ $b.kafka.brokers | quote }}
    {{- end }}
    # shutdownDelay: keeps serving this long after SIGTERM (health
    # NOT_SERVING meanwhile), so that calls tollgate still forwards while it
    # drains find the backend. preStopSleep: 0s, the sleep holds SIGTERM back.
    - name: PAYMENT_BACKEND_SHUTDOWN_DELAY
      value: {{ ternary (printf "%ds" $hold) "0s" (eq $b.shutdown.holdWith "shutdownDelay") | quote }}
    - name: PAYMENT_BACKEND_DRAIN_TIMEOUT
      value: {{ $b.shutdown.drainTimeout | quote }}
    - name: PAYMENT_BACKEND_LOG_FORMAT
      value: {{ $b.log.format | quote }}
    {{- with $b.extraEnv }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- if .Values.declareContainerPorts }}
  ports:
    # The gRPC port is not declared: it is bound to 127.0.0.1.
    - name: metrics
      containerPort: {{ $b.ports.metrics }}
      protocol: TCP
  {{- end }}
  # kubelet's grpc probe dials the pod IP, where the backend does not
  # listen; `payment-backend health` asks grpc.health.v1 on loopback from
  # inside the container (the images have no shell: exec of the binary).
  {{- with $b.startupProbe }}
  {{- if .enabled }}
  startupProbe:
    exec:
      command: {{ toJson $health }}
    {{- include "tollgate.probeTimings" . | nindent 4 }}
  {{- end }}
  {{- end }}
  {{- with $b.livenessProbe }}
  {{- if .enabled }}
  # Not grpc.health.v1: it follows the database, and a restart does not
  # bring a database back.
  livenessProbe:
    httpGet:
      path: /metrics
      port: {{ $b.ports.metrics }}
    {{- include "tollgate.probeTimings" . | nindent 4 }}
  {{- end }}
  {{- end }}
  {{- with $b.readinessProbe }}
  {{- if .enabled }}
  readinessProbe:
    exec:
      command: {{ toJson $health }}
    {{- include "tollgate.probeTimings" . | nindent 4 }}
  {{- end }}
  {{- end }}
  {{- if and (eq $b.shutdown.holdWith "preStopSleep") (gt $hold 0) }}
  # SIGTERM reaches the backend only after this sleep (no shell needed).
  lifecycle:
    preStop:
      sleep:
        seconds: {{ $hold }}
  {{- end }}
  {{- with $b.resources }}
  resources:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $b.securityContext }}
  securityContext:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  volumeMounts:
    - name: backend-data
      mountPath: {{ $b.dataVolume.mountPath }}
    - name: backend-tmp
      mountPath: /tmp
    {{- with $b.extraVolumeMounts }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
{{- end -}}
