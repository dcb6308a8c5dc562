variable "name" {
  description = "Cluster name."
  type        = string
}

variable "kubernetes_version" {
  description = "EKS version."
  type        = string
}

variable "vpc_id" {
  description = "VPC id."
  type        = string
}

variable "subnet_ids" {
  description = "Private subnets for the control plane ENIs and the nodes."
  type        = list(string)
}

variable "api_allowed_cidrs" {
  description = "CIDRs for the public API endpoint; empty keeps the endpoint private."
  type        = list(string)
}

variable "kms_key_arn" {
  description = "KMS key for Kubernetes secrets and the control-plane log group."
  type        = string
}

variable "system_node_group" {
  description = "CPU node group sizes and instance types."
  type = object({
    instance_types = list(string)
    min_size       = number
    max_size       = number
    desired_size   = number
  })
}

variable "gpu_node_group" {
  description = "GPU node group (scales from zero)."
  type = object({
    instance_types = list(string)
    max_size       = number
    gpus_per_node  = number
  })
}
