variable "name" {
  description = "Name prefix."
  type        = string
}

variable "oidc_provider_arn" {
  description = "The cluster's OIDC provider."
  type        = string
}

variable "oidc_issuer" {
  description = "OIDC issuer without scheme."
  type        = string
}

variable "namespace" {
  description = "Namespace of the chart."
  type        = string
}

variable "service_account" {
  description = "Service account of the chart."
  type        = string
}

variable "bucket_arns" {
  description = "Map artifacts/models/data -> bucket ARN."
  type        = map(string)
}

variable "kms_key_arn" {
  description = "KMS key of the buckets."
  type        = string
}
