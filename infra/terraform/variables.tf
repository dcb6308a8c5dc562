variable "name" {
  description = "Prefix for every resource (cluster name, bucket names, roles)."
  type        = string
  default     = "oncoserve"

  validation {
    condition     = can(regex("^[a-z][a-z0-9-]{2,20}$", var.name))
    error_message = "name: 3-21 characters, lower-case letters, digits and '-', starting with a letter."
  }
}

variable "environment" {
  description = "Environment label (dev, staging, prod); part of bucket names."
  type        = string
  default     = "dev"

  validation {
    condition     = contains(["dev", "staging", "prod"], var.environment)
    error_message = "environment must be dev, staging or prod."
  }
}

variable "region" {
  description = "AWS region."
  type        = string
  default     = "us-east-1"
}

variable "tags" {
  description = "Extra tags on every resource."
  type        = map(string)
  default     = {}
}

variable "vpc_cidr" {
  description = "CIDR of the VPC; split into public and private subnets across availability zones."
  type        = string
  default     = "10.40.0.0/16"

  validation {
    condition     = can(cidrhost(var.vpc_cidr, 0)) && tonumber(split("/", var.vpc_cidr)[1]) <= 20
    error_message = "vpc_cidr must be a valid IPv4 CIDR of /20 or larger."
  }
}

variable "availability_zones" {
  description = "How many availability zones to spread subnets and nodes over."
  type        = number
  default     = 3

  validation {
    condition     = var.availability_zones >= 2 && var.availability_zones <= 4
    error_message = "availability_zones must be between 2 and 4."
  }
}

variable "kubernetes_version" {
  description = "EKS Kubernetes version."
  type        = string
  default     = "1.31"

  validation {
    condition     = can(regex("^1\\.(2[89]|3[0-9])$", var.kubernetes_version))
    error_message = "kubernetes_version must be 1.28 or newer (the chart's kubeVersion)."
  }
}

variable "api_allowed_cidrs" {
  description = "CIDRs allowed to reach the public Kubernetes API endpoint (empty: private endpoint only)."
  type        = list(string)
  default     = []
}

variable "system_node_group" {
  description = "CPU node group for system pods, the Ray head, CPU workers and MLflow."
  type = object({
    instance_types = list(string)
    min_size       = number
    max_size       = number
    desired_size   = number
  })
  default = {
    instance_types = ["m6i.2xlarge"]
    min_size       = 2
    max_size       = 10
    desired_size   = 3
  }

  validation {
    condition     = var.system_node_group.min_size >= 1 && var.system_node_group.min_size <= var.system_node_group.desired_size && var.system_node_group.desired_size <= var.system_node_group.max_size
    error_message = "system_node_group: need 1 <= min_size <= desired_size <= max_size."
  }
}

variable "gpu_node_group" {
  description = "GPU node group for Triton and Ray GPU workers; scales from zero (cluster-autoscaler)."
  type = object({
    instance_types = list(string)
    max_size       = number
    gpus_per_node  = number
  })
  default = {
    instance_types = ["g5.xlarge"]
    max_size       = 4
    gpus_per_node  = 1
  }

  validation {
    condition     = var.gpu_node_group.max_size >= 1 && var.gpu_node_group.gpus_per_node >= 1
    error_message = "gpu_node_group: max_size and gpus_per_node must be at least 1."
  }
}

variable "database" {
  description = "RDS PostgreSQL for MLflow."
  type = object({
    instance_class        = string
    allocated_storage_gb  = number
    max_storage_gb        = number
    multi_az              = bool
    backup_retention_days = number
  })
  default = {
    instance_class        = "db.t4g.medium"
    allocated_storage_gb  = 50
    max_storage_gb        = 500
    multi_az              = true
    backup_retention_days = 14
  }

  validation {
    condition     = var.database.backup_retention_days >= 7 && var.database.max_storage_gb >= var.database.allocated_storage_gb
    error_message = "database: keep at least 7 days of backups; max_storage_gb must be >= allocated_storage_gb."
  }
}

variable "namespace" {
  description = "Kubernetes namespace the Helm chart is installed in (IRSA trust is scoped to it)."
  type        = string
  default     = "oncoserve"
}

variable "service_account" {
  description = "Kubernetes service account of the chart (IRSA trust is scoped to it)."
  type        = string
  default     = "oncoserve"
}
