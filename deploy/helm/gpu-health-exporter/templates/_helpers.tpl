{{/* Chart name (also the Prometheus job label, via the ServiceMonitor's jobLabel). */}}
{{- define "gpu-health-exporter.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "gpu-health-exporter.fullname" -}}
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

{{- define "gpu-health-exporter.namespace" -}}
{{- default .Release.Namespace .Values.namespaceOverride }}
{{- end }}

{{- define "gpu-health-exporter.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "gpu-health-exporter.selectorLabels" -}}
app.kubernetes.io/name: {{ include "gpu-health-exporter.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "gpu-health-exporter.labels" -}}
helm.sh/chart: {{ include "gpu-health-exporter.chart" . }}
{{ include "gpu-health-exporter.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: gpu-health-exporter
{{- end }}

{{- define "gpu-health-exporter.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "gpu-health-exporter.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "gpu-health-exporter.image" -}}
{{- $tag := default .Chart.AppVersion .Values.image.tag }}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository $tag }}
{{- end }}
{{- end }}

{{/* "true" when the pod must run as root: the kubelet's sockets and directories are root-owned
     (PodResources socket srwxr-xr-x root; the device plugin creates its socket in
     /var/lib/kubelet/device-plugins and dials the kubelet's registration socket; so does the proxy). */}}
{{- define "gpu-health-exporter.needsRoot" -}}
{{- if or .Values.podMapping.enabled .Values.devicePlugin.enabled .Values.devicePluginProxy.enabled }}true{{ end }}
{{- end }}

{{/* "true" when the pod talks to the API server (and so needs a token and RBAC). */}}
{{- define "gpu-health-exporter.needsApi" -}}
{{- if or (and .Values.podMapping.enabled (or .Values.podMapping.enablePodLabels .Values.podMapping.dra (ne (toString .Values.processMetrics.mode) "off"))) .Values.health.nodeStatus (include "gpu-health-exporter.writesScheduler" .) }}true{{ end }}
{{- end }}

{{/* "true" when a scheduler feature writes to the API server (DeviceTaintRules, the node taint, pod
     Events). */}}
{{- define "gpu-health-exporter.writesScheduler" -}}
{{- with .Values.scheduler }}
{{- if or .draDeviceTaints.effect .nodeTaint .podEvents }}true{{ end }}
{{- end }}
{{- end }}

{{/* "true" when pod Events are posted: --kubernetes-events, or --kubernetes-node-status, which
     posts them too. */}}
{{- define "gpu-health-exporter.podEvents" -}}
{{- if or .Values.scheduler.podEvents .Values.health.nodeStatus }}true{{ end }}
{{- end }}

{{/* "true" when the DeviceTaintRule admission policy is rendered. */}}
{{- define "gpu-health-exporter.taintRulePolicy" -}}
{{- with .Values.scheduler.draDeviceTaints }}
{{- if and .effect .admissionPolicy.enabled }}true{{ end }}
{{- end }}
{{- end }}

{{/* "true" when the device plugin runs as its own container (the `device-plugin` subcommand) beside
     the exporter, rather than inside the exporter process. */}}
{{- define "gpu-health-exporter.pluginContainer" -}}
{{- if and .Values.devicePlugin.enabled (not .Values.devicePlugin.inProcess) }}true{{ end }}
{{- end }}

{{/* The pod's nodeSelector: the user's, plus the GPU Operator's deploy label for what this pod runs.
     nodeSelector (not affinity): the operator's MIG manager and driver manager look for third-party
     GPU clients by nodeSelector key (nvidia.com/gpu.deploy.client), and an exact "true" makes any
     paused-for-* value exclude the node. */}}
{{- define "gpu-health-exporter.nodeSelector" -}}
{{- $selector := deepCopy (.Values.nodeSelector | default dict) }}
{{- with .Values.gpuOperator }}
{{- if .enabled }}
{{- if or $.Values.devicePlugin.enabled $.Values.devicePluginProxy.enabled }}
{{- $_ := set $selector .devicePluginLabel "true" }}
{{- else }}
{{- $_ := set $selector .exporterLabel "true" }}
{{- end }}
{{- if .gpuClientLabel }}
{{- $_ := set $selector "nvidia.com/gpu.deploy.client" "true" }}
{{- end }}
{{- end }}
{{- end }}
{{- if $selector }}{{ toYaml $selector }}{{ end }}
{{- end }}

{{/* The pod's RuntimeClass: `runtimeClassName`, else the operator's when gpuOperator.enabled. */}}
{{- define "gpu-health-exporter.runtimeClassName" -}}
{{- if .Values.runtimeClassName }}{{ .Values.runtimeClassName }}
{{- else if .Values.gpuOperator.enabled }}{{ .Values.gpuOperator.runtimeClassName }}
{{- end }}
{{- end }}

{{/* "true" when the own-Node admission policy is rendered: a feature writes the Node (the taint, the
     node status condition) and scheduler.nodeAdmissionPolicy.enabled. */}}
{{- define "gpu-health-exporter.ownNodePolicy" -}}
{{- if and .Values.scheduler.nodeAdmissionPolicy.enabled (or .Values.scheduler.nodeTaint .Values.health.nodeStatus) }}true{{ end }}
{{- end }}

{{/* Where the web configuration and the TLS Secret are mounted (directories, no subPath: kubelet
     updates of a Secret volume swap a symlink inside the directory, which a subPath mount never sees). */}}
{{- define "gpu-health-exporter.webConfigDir" -}}/etc/gpu-health-exporter/web{{- end }}
{{- define "gpu-health-exporter.tlsDir" -}}/etc/gpu-health-exporter/tls{{- end }}

{{/* The web configuration file's path inside the containers. */}}
{{- define "gpu-health-exporter.webConfigFile" -}}
{{- $key := ternary .Values.webConfig.existingSecretKey "web-config.yml" (ne .Values.webConfig.existingSecret "") }}
{{- printf "%s/%s" (include "gpu-health-exporter.webConfigDir" .) $key }}
{{- end }}

{{/* "true" when the pod serves HTTPS. */}}
{{- define "gpu-health-exporter.tls" -}}
{{- if and .Values.webConfig.enabled .Values.webConfig.tls.enabled }}true{{ end }}
{{- end }}

{{/* The TLS Secret's name ("" without TLS). */}}
{{- define "gpu-health-exporter.tlsSecretName" -}}
{{- if include "gpu-health-exporter.tls" . }}
{{- with .Values.webConfig.tls }}
{{- if .secretName }}{{ .secretName }}
{{- else if .certManager.enabled }}{{ printf "%s-tls" (include "gpu-health-exporter.fullname" $) | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}

{{/* "true" when a request may need credentials the kubelet's probes cannot give: a required client
     certificate, basic auth users, or a user-supplied file the chart cannot read. */}}
{{- define "gpu-health-exporter.webAuth" -}}
{{- with .Values.webConfig }}
{{- if .enabled }}
{{- $certRequired := and .tls.enabled (has .tls.clientAuthType (list "RequireAnyClientCert" "RequireAndVerifyClientCert")) }}
{{- if or .existingSecret .basicAuthUsers $certRequired }}true{{ end }}
{{- end }}
{{- end }}
{{- end }}

{{/* "true" when --web-unauthenticated-probes is passed (and the probes stay HTTP GETs). */}}
{{- define "gpu-health-exporter.openProbes" -}}
{{- if and (include "gpu-health-exporter.webAuth" .) .Values.webConfig.unauthenticatedProbes }}true{{ end }}
{{- end }}

{{/* The web configuration flags, one list item per line, for every container that serves HTTP. */}}
{{- define "gpu-health-exporter.webArgs" -}}
{{- if .Values.webConfig.enabled }}
- --web-config-file={{ include "gpu-health-exporter.webConfigFile" . }}
{{- if include "gpu-health-exporter.openProbes" . }}
- --web-unauthenticated-probes
{{- end }}
{{- end }}
{{- end }}

{{/* A liveness or readiness probe on a named port: an HTTP(S) GET, or a TCP connect where the path
     would need credentials the kubelet cannot present. Call with (list $ portName path settings). */}}
{{- define "gpu-health-exporter.probe" -}}
{{- $root := index . 0 }}
{{- if and (include "gpu-health-exporter.webAuth" $root) (not (include "gpu-health-exporter.openProbes" $root)) }}
tcpSocket:
  port: {{ index . 1 }}
{{- else }}
httpGet:
  path: {{ index . 2 }}
  port: {{ index . 1 }}
  scheme: {{ ternary "HTTPS" "HTTP" (eq (include "gpu-health-exporter.tls" $root) "true") }}
{{- end }}
{{ toYaml (index . 3) }}
{{- end }}

{{/* Volume mounts of the web configuration and the TLS Secret (read-only, whole directories). */}}
{{- define "gpu-health-exporter.webMounts" -}}
{{- if .Values.webConfig.enabled }}
- name: web-config
  mountPath: {{ include "gpu-health-exporter.webConfigDir" . }}
  readOnly: true
{{- if include "gpu-health-exporter.tlsSecretName" . }}
- name: web-tls
  mountPath: {{ include "gpu-health-exporter.tlsDir" . }}
  readOnly: true
{{- end }}
{{- end }}
{{- end }}

{{/* The ServiceMonitor endpoint's scheme, tlsConfig and basicAuth (Prometheus Operator Endpoint,
     SafeTLSConfig), the same for every port of the pod. */}}
{{- define "gpu-health-exporter.monitorAuth" -}}
{{- with .Values.serviceMonitor }}
{{- if include "gpu-health-exporter.tls" $ }}
scheme: https
{{- $tls := dict "serverName" (.tlsConfig.serverName | default (printf "%s.%s.svc" (include "gpu-health-exporter.fullname" $) (include "gpu-health-exporter.namespace" $))) }}
{{- $_ := set $tls "ca" (.tlsConfig.ca | default (dict "secret" (dict "name" (include "gpu-health-exporter.tlsSecretName" $) "key" "ca.crt"))) }}
{{- with .tlsConfig.cert }}{{ $_ := set $tls "cert" . }}{{ end }}
{{- with .tlsConfig.keySecret }}{{ $_ := set $tls "keySecret" . }}{{ end }}
tlsConfig:
  {{- toYaml $tls | nindent 2 }}
{{- end }}
{{- with .basicAuth }}
basicAuth:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}
{{- end }}
