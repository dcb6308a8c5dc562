output "serving_role_arn" {
  description = "Role for the chart's service account."
  value       = aws_iam_role.serving.arn
}
