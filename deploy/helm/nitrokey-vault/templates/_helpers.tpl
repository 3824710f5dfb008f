{{- /* The device plugin's image (no smart-card stack). */ -}}
{{- define "nitrokey-vault.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{- /* unseal-init's image (OpenSC, pcscd, CCID driver). */ -}}
{{- define "nitrokey-vault.unsealInitImage" -}}
{{ .Values.unsealInit.image.repository }}:{{ .Values.unsealInit.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{- define "nitrokey-vault.labels" -}}
app.kubernetes.io/part-of: nitrokey-vault
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- /* The device plugin's namespace: its own, not the release's (see values.yaml). */ -}}
{{- define "nitrokey-vault.devicePluginNamespace" -}}
{{ .Values.devicePlugin.namespace.name | default .Release.Namespace }}
{{- end -}}
