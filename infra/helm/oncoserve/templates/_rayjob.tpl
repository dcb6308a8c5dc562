{{/* A RayJob running one `oncoserve` command on its own short-lived Ray cluster (the same command as on
one machine). The entrypoint runs as the job's driver on the head, so the head mounts the data too.
args: root (the chart context), name, entrypoint, workers, gpu, dataClaim, configMap (optional: mounted
at /etc/oncoserve/pipeline). */}}
{{- define "oncoserve.rayJob" -}}
{{- $root := .root -}}
{{- $mounts := list (dict "name" "data" "mountPath" "/data" "readOnly" true) -}}
{{- $volumes := list (dict "name" "data" "persistentVolumeClaim" (dict "claimName" .dataClaim "readOnly" true)) -}}
{{- if .configMap }}
{{- $mounts = append $mounts (dict "name" "pipeline-config" "mountPath" "/etc/oncoserve/pipeline" "readOnly" true) -}}
{{- $volumes = append $volumes (dict "name" "pipeline-config" "configMap" (dict "name" .configMap)) -}}
{{- end }}
{{- $mounts = append $mounts (dict "name" "tokens" "mountPath" "/var/lib/oncoserve/auth" "readOnly" true) -}}
{{- $volumes = append $volumes (dict "name" "tokens" "secret" (dict "secretName" $root.Values.auth.tokensSecret)) -}}
apiVersion: ray.io/v1
kind: RayJob
metadata:
  name: {{ include "oncoserve.fullname" $root }}-{{ .name }}
  namespace: {{ $root.Release.Namespace }}
  labels: {{- include "oncoserve.labels" $root | nindent 4 }}
spec:
  entrypoint: {{ .entrypoint | quote }}
  shutdownAfterJobFinishes: true
  ttlSecondsAfterFinished: 3600
  activeDeadlineSeconds: 86400
  submitterPodTemplate:
    spec:
      restartPolicy: Never
      serviceAccountName: {{ include "oncoserve.serviceAccount" $root }}
      automountServiceAccountToken: false
      securityContext: {{- include "oncoserve.podSecurity" $root | nindent 8 }}
      containers:
        - name: submitter
          image: {{ include "oncoserve.image" $root }}
          resources:
            requests: {cpu: 200m, memory: 512Mi}
            limits: {cpu: 500m, memory: 1Gi}
          securityContext: {{- include "oncoserve.containerSecurity" $root | nindent 12 }}
          volumeMounts: {{- include "oncoserve.scratchMounts" $root | nindent 12 }}
      volumes: {{- include "oncoserve.scratchVolumes" $root | nindent 8 }}
  rayClusterSpec:
    rayVersion: {{ $root.Values.ray.version | quote }}
    headGroupSpec:
      rayStartParams: {port: {{ $root.Values.ray.headPort | quote }}, num-cpus: "0"}
      template:
        spec:
          serviceAccountName: {{ include "oncoserve.serviceAccount" $root }}
          automountServiceAccountToken: false
          securityContext: {{- include "oncoserve.podSecurity" $root | nindent 12 }}
          containers:
            - name: ray-head
              image: {{ include "oncoserve.image" $root }}
              env:
                {{- include "oncoserve.env" $root | nindent 16 }}
                {{- include "oncoserve.mlflowAccount" (dict "root" $root "account" "training") | nindent 16 }}
                - name: ONCOSERVE_TOKEN
                  valueFrom: {secretKeyRef: {name: {{ $root.Values.auth.jobTokenSecret }}, key: token}}
                # The entrypoint is this cluster's Ray job driver: it joins the cluster it runs in (RAY_ADDRESS).
                - {name: ONCOSERVE_RAY_CLUSTER, value: auto}
                # Each node is a pod with its own disk: Ray Train's checkpoints go to the object store.
                - {name: ONCOSERVE_RAY_STORAGE, value: s3}
                - {name: ONCOSERVE_SIGNING_PUBLIC_KEY, value: /etc/oncoserve/trust/signing.pub}
              resources: {{- toYaml $root.Values.ray.head.resources | nindent 16 }}
              securityContext: {{- include "oncoserve.containerSecurity" $root | nindent 16 }}
              volumeMounts:
                {{- include "oncoserve.scratchMounts" $root | nindent 16 }}
                {{- include "oncoserve.trustMounts" $root | nindent 16 }}
                {{- toYaml $mounts | nindent 16 }}
          volumes:
            {{- include "oncoserve.scratchVolumes" $root | nindent 12 }}
            {{- include "oncoserve.trustVolumes" $root | nindent 12 }}
            {{- toYaml $volumes | nindent 12 }}
    workerGroupSpecs:
      - groupName: train
        replicas: {{ .workers }}
        minReplicas: {{ .workers }}
        maxReplicas: {{ .workers }}
        rayStartParams: {}
        template:
          spec:
            serviceAccountName: {{ include "oncoserve.serviceAccount" $root }}
            automountServiceAccountToken: false
            securityContext: {{- include "oncoserve.podSecurity" $root | nindent 14 }}
            {{- if .gpu }}
            nodeSelector: {{- toYaml $root.Values.ray.gpuWorkers.nodeSelector | nindent 14 }}
            tolerations: {{- toYaml $root.Values.ray.gpuWorkers.tolerations | nindent 14 }}
            {{- end }}
            containers:
              - name: ray-worker
                image: {{ include "oncoserve.image" $root }}
                env:
                  {{- include "oncoserve.env" $root | nindent 18 }}
                  {{- include "oncoserve.mlflowAccount" (dict "root" $root "account" "training") | nindent 18 }}
                  # The checkpoint a resumed run starts from is read here, from the object store.
                  - {name: ONCOSERVE_RAY_STORAGE, value: s3}
                  - {name: ONCOSERVE_SIGNING_PUBLIC_KEY, value: /etc/oncoserve/trust/signing.pub}
                {{- $res := $root.Values.ray.cpuWorkers.resources }}
                {{- if .gpu }}
                {{- $gpu := dict "nvidia.com/gpu" 1 }}
                {{- $res = dict "requests" (merge (dict) $gpu $root.Values.ray.gpuWorkers.resources.requests) "limits" (merge (dict) $gpu $root.Values.ray.gpuWorkers.resources.limits) }}
                {{- end }}
                resources: {{- toYaml $res | nindent 18 }}
                securityContext: {{- include "oncoserve.containerSecurity" $root | nindent 18 }}
                volumeMounts:
                  {{- include "oncoserve.scratchMounts" $root | nindent 18 }}
                  {{- include "oncoserve.trustMounts" $root | nindent 18 }}
                  - {name: data, mountPath: /data, readOnly: true}
            volumes:
              {{- include "oncoserve.scratchVolumes" $root | nindent 14 }}
              {{- include "oncoserve.trustVolumes" $root | nindent 14 }}
              - name: data
                persistentVolumeClaim: {claimName: {{ .dataClaim }}, readOnly: true}
{{- end -}}
