variable "name" {
  description = "Name prefix."
  type        = string
}

variable "cidr" {
  description = "VPC CIDR."
  type        = string
}

variable "availability_zones" {
  description = "Availability zones to use."
  type        = list(string)
}

variable "cluster_name" {
  description = "EKS cluster name (subnet discovery tags for load balancers)."
  type        = string
}

variable "kms_key_arn" {
  description = "KMS key for the flow-log group."
  type        = string
}
