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
{{- if or (and .Values.podMapping.enabled (or .Values.podMapping.enablePodLabels .Values.podMapping.dra)) .Values.health.nodeStatus (include "gpu-health-exporter.writesScheduler" .) }}true{{ end }}
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
