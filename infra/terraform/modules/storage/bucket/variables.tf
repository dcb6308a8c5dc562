variable "name" {
  description = "Bucket name."
  type        = string
}

variable "kms_key_arn" {
  description = "KMS key for default encryption."
  type        = string
}

variable "log_bucket" {
  description = "Access-log target bucket id (null for the log bucket itself)."
  type        = string
  default     = null
}

variable "log_prefix" {
  description = "Prefix of this bucket's access logs in the log bucket."
  type        = string
  default     = ""
}
