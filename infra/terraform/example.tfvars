# terraform plan -var-file=example.tfvars
name               = "oncoserve"
environment        = "dev"
region             = "eu-west-1"
vpc_cidr           = "10.40.0.0/16"
availability_zones = 3
kubernetes_version = "1.31"
api_allowed_cidrs  = ["203.0.113.0/24"]

system_node_group = {
  instance_types = ["m6i.2xlarge"]
  min_size       = 2
  max_size       = 8
  desired_size   = 3
}

gpu_node_group = {
  instance_types = ["g5.xlarge", "g5.2xlarge"]
  max_size       = 4
  gpus_per_node  = 1
}

database = {
  instance_class        = "db.t4g.medium"
  allocated_storage_gb  = 50
  max_storage_gb        = 500
  multi_az              = true
  backup_retention_days = 14
}

tags = {
  owner = "platform-team"
}
