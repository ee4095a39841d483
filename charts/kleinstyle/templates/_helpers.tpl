{{/* Names and labels shared by every template. */}}

{{- define "kleinstyle.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "kleinstyle.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "kleinstyle.labels" -}}
{{ include "kleinstyle.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "kleinstyle.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "kleinstyle.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* The operator's config file: .Values.config with the defaults that depend on the chart filled in. */}}
{{- define "kleinstyle.operatorConfig" -}}
{{- $cfg := deepCopy .Values.config -}}
{{- if not $cfg.runtimeImage -}}
{{- $_ := set $cfg "runtimeImage" (printf "ghcr.io/kleinstyle/runtime:%s" .Chart.AppVersion) -}}
{{- end -}}
{{- if not (hasKey $cfg.nodePools $cfg.defaultNodePool) -}}
{{- fail (printf "config.defaultNodePool %q is not a key of config.nodePools" $cfg.defaultNodePool) -}}
{{- end -}}
{{- toYaml $cfg -}}
{{- end -}}

{{/* Mount the artifact claim into the operator: only it can delete artifacts, and only on a PVC. */}}
{{- define "kleinstyle.mountArtifacts" -}}
{{- if and .Values.config.artifactsLocalPath (not .Values.config.artifacts.uri) -}}true{{- end -}}
{{- end -}}

{{/* Namespaces that get a Role (or the artifact claim): the watched ones, else the release namespace. */}}
{{- define "kleinstyle.namespaces" -}}
{{- toJson (.Values.watchNamespaces | default (list .Release.Namespace)) -}}
{{- end -}}

{{/*
The operator's own permissions, exactly what the operator calls (operator/kleinstyle/operator/: kube.py, the children
indexes.py watches, handlers.py's watches) and kopf; no wildcards and no Secrets (API keys reach Job pods by
secretKeyRef, which the kubelet resolves with no operator permission).
*/}}
{{- define "kleinstyle.rules" -}}
{{- $custom := list "styleboards" "styleloras" "generationjobs" "lorafusions" -}}
{{- $status := list -}}
{{- $finalizers := list -}}
{{- range $custom -}}
{{- $status = append $status (printf "%s/status" .) -}}
{{- $finalizers = append $finalizers (printf "%s/finalizers" .) -}}
{{- end -}}
# kopf lists and watches the four kinds and patches them (finalizer, progress annotations); reconcile gets the
# resources a run depends on.
- apiGroups: [kleinstyle.dev]
  resources: [{{ join ", " $custom }}]
  verbs: [get, list, watch, patch]
# kopf writes status through the /status subresource. `get` is not called, but the per-run Roles the operator creates
# grant get + patch on it, and RBAC lets a subject grant only what it holds itself.
- apiGroups: [kleinstyle.dev]
  resources: [{{ join ", " $status }}]
  verbs: [get, patch]
# Children carry ownerReferences with blockOwnerDeletion, which the OwnerReferencesPermissionEnforcement admission
# plugin (on by default in OpenShift) allows only to who may update the owner's finalizers.
- apiGroups: [kleinstyle.dev]
  resources: [{{ join ", " $finalizers }}]
  verbs: [update]
# A run's children: created once (never updated: Kueue mutates Jobs), listed and watched into in-memory indexes
# (a Job's change wakes its owner), read when a create finds one already there, deleted when stale or when their
# owner goes.
- apiGroups: [""]
  resources: [serviceaccounts, configmaps]
  verbs: [get, list, watch, create, delete]
- apiGroups: [rbac.authorization.k8s.io]
  resources: [roles, rolebindings]
  verbs: [get, list, watch, create, delete]
# A Job's annotations (never its spec) are patched to record the spec's generation it runs for. The chart's
# models-pull Jobs are listed (label-selected, never written): training and generation wait for them.
- apiGroups: [batch]
  resources: [jobs]
  verbs: [get, list, watch, create, patch, delete]
# Kueue's Workloads (one per queued Job), listed and watched into an index to mirror them into status: why a run
# waits, where it was admitted, its evictions. Harmless where Kueue is not installed (the operator checks discovery).
# `get` (here and on pods): after a watch had to list again, an indexed object the listing did not bring is read
# once to learn whether it is gone (operator/relists.py); nothing a list does not already show.
- apiGroups: [kueue.x-k8s.io]
  resources: [workloads]
  verbs: [get, list, watch]
# The runs' pods (label-selected), watched for scheduling state, start times and exit codes; the models-pull Jobs'
# pods are listed for the pull's summary (their termination message).
- apiGroups: [""]
  resources: [pods]
  verbs: [get, list, watch]
# kopf.event posts core/v1 Events.
- apiGroups: [""]
  resources: [events]
  verbs: [create]
{{- end -}}
