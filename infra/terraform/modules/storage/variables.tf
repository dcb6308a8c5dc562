variable "prefix" {
  description = "Bucket name prefix (name-environment)."
  type        = string
}

variable "kms_key_arn" {
  description = "KMS key for bucket encryption."
  type        = string
}
