output "bucket_names" {
  description = "artifacts, models and data bucket names."
  value       = { for k, b in module.bucket : k => b.id }
}

output "bucket_arns" {
  description = "artifacts, models and data bucket ARNs."
  value       = { for k, b in module.bucket : k => b.arn }
}
