variable "name" {
  description = "Name prefix."
  type        = string
}

variable "vpc_id" {
  description = "VPC id."
  type        = string
}

variable "subnet_ids" {
  description = "Private subnets."
  type        = list(string)
}

variable "allowed_security_group_id" {
  description = "Only this security group (the cluster's nodes) may connect."
  type        = string
}

variable "kms_key_arn" {
  description = "KMS key for storage and Performance Insights."
  type        = string
}

variable "settings" {
  description = "Instance class, storage, multi-AZ and backups."
  type = object({
    instance_class        = string
    allocated_storage_gb  = number
    max_storage_gb        = number
    multi_az              = bool
    backup_retention_days = number
  })
}
