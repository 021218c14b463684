{{- define "medplum-operator.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "medplum-operator.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "medplum-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "medplum-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "medplum-operator.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* Rules on the namespaced kinds and what they touch; a ClusterRole or one Role per watched namespace. */}}
{{- define "medplum-operator.namespacedRules" -}}
- apiGroups: [medplum.com]
  resources: [medplumconnections, clientapplications, accesspolicies, projectusers, medplumprojects]
  verbs: [get, list, watch, patch]
- apiGroups: [medplum.com]
  resources: [medplumconnections/status, clientapplications/status, accesspolicies/status, projectusers/status, medplumprojects/status]
  verbs: [patch]
# Credentials Secrets: written with server-side apply; watched metadata-only with a label selector.
- apiGroups: [""]
  resources: [secrets]
  verbs: [get, list, watch, create, patch]
- apiGroups: [""]
  resources: [configmaps]
  verbs: [get]
# Restart targets.
- apiGroups: [apps]
  resources: [deployments, statefulsets, daemonsets]
  verbs: [get, patch]
- apiGroups: [events.k8s.io]
  resources: [events]
  verbs: [create, patch]
{{- end -}}

{{/* Rules on cluster-scoped kinds; always a ClusterRole. */}}
{{- define "medplum-operator.clusterRules" -}}
- apiGroups: [medplum.com]
  resources: [clustermedplumconnections]
  verbs: [get, list, watch, patch]
- apiGroups: [medplum.com]
  resources: [clustermedplumconnections/status]
  verbs: [patch]
- apiGroups: [medplum.com]
  resources: [domainconfigurations]
  verbs: [get, list, watch, patch]
- apiGroups: [medplum.com]
  resources: [domainconfigurations/status]
  verbs: [patch]
# allowedNamespaces selectors match namespace labels; deletions check whether a namespace is terminating.
- apiGroups: [""]
  resources: [namespaces]
  verbs: [get]
{{- end -}}
