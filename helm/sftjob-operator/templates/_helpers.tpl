{{- define "sftjob.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "sftjob.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "sftjob.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "sftjob.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "sftjob.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "sftjob.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{- /*
The operator's NetworkPolicy settings (SFTJOB_NETWORK_POLICY, render/network_policy.py): the operator's own
pods (progress reads) and networkPolicy.metricsFrom on the trainer metrics port; DNS; egress to s3Cidrs (any
address when empty) on s3Ports, except egressExcept and apiServerCidrs.
*/ -}}
{{- define "sftjob.networkPolicy" -}}
{{- $np := .Values.networkPolicy -}}
{{- $operator := dict "namespaceSelector" (dict "matchLabels" (dict "kubernetes.io/metadata.name" .Release.Namespace)) "podSelector" (dict "matchLabels" (include "sftjob.selectorLabels" . | fromYaml)) -}}
{{- $cfg := dict "metricsFrom" (prepend $np.metricsFrom $operator) "dnsTo" $np.dnsTo "egressPorts" $np.s3Ports "egressExcept" (concat $np.egressExcept $np.apiServerCidrs) -}}
{{- with $np.s3Cidrs }}{{- $_ := set $cfg "egressCidrs" . -}}{{- end -}}
{{- toJson $cfg -}}
{{- end -}}

{{/*
The admin policy on SFTJobs as one JSON object (sftjob_api/policy.py): inlined into the
ValidatingAdmissionPolicy's CEL and passed to the operator, which checks the same rules. The chart's trainer
image and trainer ServiceAccount are always allowed.
*/ -}}
{{- define "sftjob.admissionPolicy" -}}
{{- $p := .Values.admissionPolicy -}}
{{- $cfg := dict "uriPrefixes" $p.uriPrefixes "modelCacheNames" $p.modelCacheNames "images" (append $p.images .Values.trainerImage | uniq) "serviceAccounts" (append $p.serviceAccounts .Values.trainerServiceAccount.name | uniq) "priorityClasses" $p.priorityClasses "secretNames" $p.secretNames "hosts" $p.hosts "podLabelKeys" $p.podLabelKeys "podAnnotationKeys" $p.podAnnotationKeys -}}
{{- toJson $cfg -}}
{{- end -}}
