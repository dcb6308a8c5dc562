{{/* Names and labels. */}}
{{- define "oncoserve.fullname" -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 40 | trimSuffix "-" -}}
{{- end -}}

{{- define "oncoserve.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "oncoserve.selector" -}}
app.kubernetes.io/name: {{ .root.Chart.Name }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "oncoserve.serviceAccount" -}}
{{- if .Values.serviceAccount.create -}}{{ default (include "oncoserve.fullname" .) .Values.serviceAccount.name }}{{- else -}}{{ default "default" .Values.serviceAccount.name }}{{- end -}}
{{- end -}}

{{- define "oncoserve.image" -}}
{{- if .Values.image.digest -}}{{ .Values.image.repository }}@{{ .Values.image.digest }}{{- else -}}{{ .Values.image.repository }}:{{ .Values.image.tag }}{{- end -}}
{{- end -}}

{{/* checkov findings accepted on purpose, with the reason next to each (rendered as annotations). */}}
{{- define "oncoserve.checkovImage" -}}
checkov.io/skip1: CKV_K8S_43=Images are pinned by immutable release tag; set image.digest to pin by digest
checkov.io/skip2: CKV_K8S_15=IfNotPresent with immutable tags; Always adds a registry round trip to every GPU node scale-up
{{- end -}}

{{/* Non-root, read-only root filesystem, no privilege escalation: every pod and container. */}}
{{- define "oncoserve.podSecurity" -}}
runAsNonRoot: true
runAsUser: 10001
runAsGroup: 10001
fsGroup: 10001
seccompProfile: {type: RuntimeDefault}
{{- end -}}

{{- define "oncoserve.containerSecurity" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
runAsNonRoot: true
capabilities: {drop: [ALL]}
{{- end -}}

{{/* The platform's settings for pods (ONCOSERVE_* environment; see oncoserve/settings.py). */}}
{{- define "oncoserve.env" -}}
- {name: ONCOSERVE_HOME, value: /var/lib/oncoserve}
- {name: ONCOSERVE_MLFLOW_URI, value: {{ printf "http://%s-mlflow:%v" (include "oncoserve.fullname" .) .Values.mlflow.port | quote }}}
- {name: ONCOSERVE_S3_EXTERNAL_ENDPOINT, value: {{ .Values.s3.endpoint | quote }}}
- {name: ONCOSERVE_S3_SECURE, value: {{ .Values.s3.secure | quote }}}
- {name: ONCOSERVE_BUCKET_ARTIFACTS, value: {{ .Values.s3.buckets.artifacts | quote }}}
- {name: ONCOSERVE_BUCKET_MODELS, value: {{ .Values.s3.buckets.models | quote }}}
- {name: ONCOSERVE_BUCKET_DATA, value: {{ .Values.s3.buckets.data | quote }}}
- {name: ONCOSERVE_TRITON_REPO_PREFIX, value: {{ .Values.s3.tritonRepoPrefix | quote }}}
- {name: ONCOSERVE_SERVE_MAX_REQUEST_MB, value: {{ .Values.serve.maxRequestMb | quote }}}
- {name: AWS_DEFAULT_REGION, value: {{ .Values.s3.region | quote }}}
- {name: PROMETHEUS_MULTIPROC_DIR, value: /var/lib/oncoserve/serve/metrics}
- {name: ONCOSERVE_AUDIT_DIR, value: /var/lib/oncoserve-audit}
- {name: ONCOSERVE_SIGNING_PUBLIC_KEY, value: /etc/oncoserve/trust/signing.pub}
{{- if .Values.s3.credentialsSecret }}
- name: ONCOSERVE_S3_ACCESS_KEY
  valueFrom: {secretKeyRef: {name: {{ .Values.s3.credentialsSecret }}, key: AWS_ACCESS_KEY_ID}}
- name: ONCOSERVE_S3_SECRET_KEY
  valueFrom: {secretKeyRef: {name: {{ .Values.s3.credentialsSecret }}, key: AWS_SECRET_ACCESS_KEY}}
{{- end }}
{{- end -}}

{{/* The MLflow account a pod talks to the registry as (MLflow basic-auth; from the accounts Secret):
args: root, account (platform | training | reader). */}}
{{- define "oncoserve.mlflowAccount" -}}
- name: MLFLOW_TRACKING_USERNAME
  valueFrom: {secretKeyRef: {name: {{ .root.Values.mlflow.auth.secretName }}, key: {{ printf "%s-username" .account }}}}
- name: MLFLOW_TRACKING_PASSWORD
  valueFrom: {secretKeyRef: {name: {{ .root.Values.mlflow.auth.secretName }}, key: {{ printf "%s-password" .account }}}}
{{- end -}}

{{/* What the trust chain needs in a pod: the audit log on its persistent claim (never an emptyDir),
the platform's public key that replicas verify promotions with, and the token store. */}}
{{- define "oncoserve.trustMounts" -}}
- {name: audit, mountPath: /var/lib/oncoserve-audit}
- {name: trust, mountPath: /etc/oncoserve/trust, readOnly: true}
{{- end -}}
{{- define "oncoserve.trustVolumes" -}}
- name: audit
  persistentVolumeClaim: {claimName: {{ include "oncoserve.fullname" . }}-audit}
- name: trust
  configMap: {name: {{ include "oncoserve.fullname" . }}-trust}
{{- end -}}

{{/* Writable scratch for a read-only root filesystem: Ray's /tmp and the platform home. */}}
{{- define "oncoserve.scratchMounts" -}}
- {name: tmp, mountPath: /tmp}
- {name: home, mountPath: /var/lib/oncoserve}
{{- end -}}
{{- define "oncoserve.scratchVolumes" -}}
- {name: tmp, emptyDir: {sizeLimit: 8Gi}}
- {name: home, emptyDir: {sizeLimit: 4Gi}}
{{- end -}}

{{/* serveConfigV2, rendered from files/deployments.yaml (the file `oncoserve serve up` deploys). */}}
{{- define "oncoserve.serveConfig" -}}
{{- $cfg := .Files.Get "files/deployments.yaml" | fromYaml -}}
{{- $args := dict "config" $cfg -}}
{{- if eq .Values.serve.modelBackend "triton" -}}
{{- $_ := set $args "backend" (dict "kind" "triton" "triton_url" (printf "%s-triton:8001" (include "oncoserve.fullname" .)) "fallback_to_embedded" .Values.serve.tritonFallbackToEmbedded) -}}
{{- else if ne .Values.serve.modelBackend "auto" -}}
{{- $_ := set $args "backend" (dict "kind" .Values.serve.modelBackend) -}}
{{- end -}}
http_options:
  host: 0.0.0.0
  port: {{ .Values.serve.httpPort }}
grpc_options:
  port: {{ .Values.serve.grpcPort }}
  grpc_servicer_functions: [services.grpc_servicers.add_servicers]
applications:
  - name: {{ $cfg.application }}
    route_prefix: /
    import_path: services.app:app_builder
    args: {{ toJson $args }}
    deployments:
    {{- range $name, $d := $cfg.deployments }}
      - name: {{ $name }}
        max_ongoing_requests: {{ $d.max_ongoing_requests }}
        autoscaling_config: {{ toJson $d.autoscaling }}
        ray_actor_options: {num_cpus: {{ $d.num_cpus }}}
        logging_config: {encoding: JSON}
    {{- end }}
{{- end -}}
