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

{{/* The service account: exactly serviceAccount.name, the name infra/terraform's IRSA role trusts
(variable service_account; both default to oncoserve). */}}
{{- define "oncoserve.serviceAccount" -}}
{{- .Values.serviceAccount.name -}}
{{- end -}}

{{/* In-cluster URLs of the platform's Services. */}}
{{- define "oncoserve.mlflowUrl" -}}
{{- printf "http://%s-mlflow:%v" (include "oncoserve.fullname" .) .Values.mlflow.port -}}
{{- end -}}
{{- define "oncoserve.platformUrl" -}}
{{- printf "http://%s-platform:%v" (include "oncoserve.fullname" .) .Values.platformApi.port -}}
{{- end -}}

{{/* The URL browsers reach the platform API at: platformApi.publicUrl, else the Ingress host, else the
in-cluster Service (reachable from pods only: set one of the others for the console). */}}
{{- define "oncoserve.platformPublicUrl" -}}
{{- if .Values.platformApi.publicUrl -}}{{ .Values.platformApi.publicUrl }}
{{- else if and .Values.platformApi.ingress.enabled .Values.platformApi.ingress.host -}}{{ printf "%s://%s" (ternary "https" "http" (ne .Values.platformApi.ingress.tlsSecret "")) .Values.platformApi.ingress.host }}
{{- else -}}{{ include "oncoserve.platformUrl" . }}{{- end -}}
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
- {name: ONCOSERVE_MLFLOW_URI, value: {{ include "oncoserve.mlflowUrl" . | quote }}}
- {name: ONCOSERVE_PLATFORM_PORT, value: {{ .Values.platformApi.port | quote }}}
- {name: ONCOSERVE_PLATFORM_PUBLIC_URL, value: {{ include "oncoserve.platformPublicUrl" . | quote }}}
# In-cluster callers (the pipeline job's gates, compile and promotion) reach the platform API by its Service.
- {name: ONCOSERVE_PLATFORM_API_URL, value: {{ printf "http://%s-platform:%v" (include "oncoserve.fullname" .) .Values.platformApi.port | quote }}}
- {name: ONCOSERVE_GATEWAY_URL, value: {{ printf "http://%s-gateway:%v" (include "oncoserve.fullname" .) .Values.serve.httpPort | quote }}}
{{- if .Values.serve.publicUrl }}
- {name: ONCOSERVE_CORS_ORIGINS, value: {{ list .Values.serve.publicUrl | toJson | quote }}}
{{- end }}
- name: ONCOSERVE_DEID_SALT
  valueFrom: {secretKeyRef: {name: {{ .Values.deidentification.saltSecret }}, key: salt}}
- {name: ONCOSERVE_S3_EXTERNAL_ENDPOINT, value: {{ .Values.s3.endpoint | quote }}}
- {name: ONCOSERVE_S3_SECURE, value: {{ .Values.s3.secure | quote }}}
- {name: ONCOSERVE_BUCKET_ARTIFACTS, value: {{ .Values.s3.buckets.artifacts | quote }}}
- {name: ONCOSERVE_BUCKET_MODELS, value: {{ .Values.s3.buckets.models | quote }}}
- {name: ONCOSERVE_BUCKET_DATA, value: {{ .Values.s3.buckets.data | quote }}}
- {name: ONCOSERVE_TRITON_REPO_PREFIX, value: {{ .Values.s3.tritonRepoPrefix | quote }}}
- {name: ONCOSERVE_SERVE_MAX_REQUEST_MB, value: {{ .Values.serve.maxRequestMb | quote }}}
- {name: AWS_DEFAULT_REGION, value: {{ .Values.s3.region | quote }}}
- {name: ONCOSERVE_AUDIT_DIR, value: /var/lib/oncoserve-audit}
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

{{/* What the platform API and the DICOM receiver containers share (one pod): image, settings, the
MLflow account named (args: root, account), and the home with its durable state (signing key, job table, spool). */}}
{{- define "oncoserve.platformContainerBase" -}}
{{- $account := .account -}}
{{- with .root -}}
image: {{ include "oncoserve.image" . }}
imagePullPolicy: {{ .Values.image.pullPolicy }}
env:
  {{- include "oncoserve.env" . | nindent 2 }}
  {{- include "oncoserve.mlflowAccount" (dict "root" . "account" $account) | nindent 2 }}
  # Bind the pod's interfaces (the NetworkPolicies decide who may connect), not the embedded 127.0.0.1.
  - {name: ONCOSERVE_HOST, value: 0.0.0.0}
  {{- if .Values.dicom.enabled }}
  - {name: ONCOSERVE_DICOM_AE_TITLE, value: {{ .Values.dicom.aeTitle | quote }}}
  - {name: ONCOSERVE_DICOM_PORT, value: {{ .Values.dicom.port | quote }}}
  - {name: ONCOSERVE_DICOM_ALLOWED_AES, value: {{ toJson .Values.dicom.allowedAes | quote }}}
  {{- if .Values.dicom.pacsDestination }}
  - {name: ONCOSERVE_PACS_DESTINATION, value: {{ .Values.dicom.pacsDestination | quote }}}
  {{- end }}
  {{- end }}
  {{- if and (eq $account "platform") .Values.platformApi.gates }}
  - {name: ONCOSERVE_GATES_FILE, value: /etc/oncoserve/gates/gates.toml}
  {{- end }}
securityContext: {{- include "oncoserve.containerSecurity" . | nindent 2 }}
volumeMounts:
  {{- if and (eq $account "platform") .Values.platformApi.gates }}
  - {name: gates, mountPath: /etc/oncoserve/gates, readOnly: true}
  {{- end }}
  - {name: tmp, mountPath: /tmp}
  - {name: home, mountPath: /var/lib/oncoserve}
  # The signing key and the job table (with its spool) outlive the pod; the rest of the home is scratch.
  - {name: state, mountPath: /var/lib/oncoserve/platform, subPath: platform}
  - {name: state, mountPath: /var/lib/oncoserve/jobs, subPath: jobs}
  - {name: tokens, mountPath: /var/lib/oncoserve/auth, readOnly: true}
  - {name: audit, mountPath: /var/lib/oncoserve-audit}
{{- end -}}
{{- end -}}

{{/* The verified Triton repository sync (args: root, every: seconds between passes, 0 = one pass). */}}
{{- define "oncoserve.tritonSync" -}}
image: {{ include "oncoserve.image" .root }}
imagePullPolicy: {{ .root.Values.image.pullPolicy }}
command: [oncoserve, models, sync-triton, --dest, /models{{ if .every }}, --every, {{ .every | quote }}{{ end }}, --report, /tmp/sync.json]
env:
  {{- include "oncoserve.env" .root | nindent 2 }}
  {{- include "oncoserve.mlflowAccount" (dict "root" .root "account" "reader") | nindent 2 }}
resources:
  requests: {cpu: 100m, memory: 256Mi}
  limits: {cpu: 500m, memory: 1Gi}
securityContext: {{- include "oncoserve.containerSecurity" .root | nindent 2 }}
volumeMounts:
  - {name: models, mountPath: /models}
  - {name: tmp, mountPath: /tmp}
  - {name: home, mountPath: /var/lib/oncoserve}
{{- end -}}
