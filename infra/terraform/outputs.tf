output "cluster_name" {
  description = "EKS cluster name (aws eks update-kubeconfig --name ...)."
  value       = module.cluster.name
}

output "cluster_endpoint" {
  description = "Kubernetes API endpoint."
  value       = module.cluster.endpoint
}

output "buckets" {
  description = "Bucket names for the chart's s3.buckets values (artifacts, models, data)."
  value       = module.storage.bucket_names
}

output "serving_role_arn" {
  description = "IRSA role for the chart's service account (serviceAccount.annotations eks.amazonaws.com/role-arn)."
  value       = module.iam.serving_role_arn
}

output "database_endpoint" {
  description = "RDS PostgreSQL endpoint for MLflow (the chart's mlflow.database secret holds the URI)."
  value       = module.database.endpoint
}

output "database_master_secret_arn" {
  description = "Secrets Manager secret holding the RDS master credentials (managed by RDS)."
  value       = module.database.master_secret_arn
}

output "gpu_node_labels" {
  description = "Labels and taint of the GPU pool (match the chart's nodeSelector / tolerations)."
  value       = module.cluster.gpu_node_labels
}

output "helm_values" {
  description = "Chart values this stack decides (helm install -f values-aws.json, from terraform output -json helm_values): the service account the IRSA role trusts, named once here, with its role; the buckets and region."
  value = {
    serviceAccount = {
      create      = true
      name        = var.service_account
      annotations = { "eks.amazonaws.com/role-arn" = module.iam.serving_role_arn }
    }
    s3 = {
      region  = var.region
      buckets = module.storage.bucket_names
    }
  }
}
