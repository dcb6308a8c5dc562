# oncoserve on AWS: a VPC, an EKS cluster with a CPU system node group and a GPU node group that scales
# from zero, S3 buckets for artifacts / the model repository / data, IRSA roles, RDS PostgreSQL for MLflow.
# The Helm chart (infra/helm/oncoserve) is installed into the cluster afterwards with these outputs.

locals {
  prefix = "${var.name}-${var.environment}"
}

data "aws_availability_zones" "available" {
  #checkov:skip=CKV_AWS_394:Only the first var.availability_zones names are used (slice below); a zone AWS adds later is not picked up.
  state = "available"
}

resource "aws_kms_key" "main" {
  description             = "${local.prefix}: EKS secrets, S3 buckets, RDS, logs"
  deletion_window_in_days = 30
  enable_key_rotation     = true
  policy                  = data.aws_iam_policy_document.kms.json
}

resource "aws_kms_alias" "main" {
  name          = "alias/${local.prefix}"
  target_key_id = aws_kms_key.main.key_id
}

data "aws_caller_identity" "current" {}

data "aws_iam_policy_document" "kms" {
  #checkov:skip=CKV_AWS_111:This is a KMS key policy: "*" means this key, and the account-root statement is AWS's default delegation to IAM.
  #checkov:skip=CKV_AWS_356:Same: in a key policy the only resource is the key itself.
  #checkov:skip=CKV_AWS_109:Same: key administration is delegated to the account's IAM policies, as in AWS's default key policy.
  statement {
    sid       = "AccountAdministers"
    actions   = ["kms:*"]
    resources = ["*"]
    principals {
      type        = "AWS"
      identifiers = ["arn:aws:iam::${data.aws_caller_identity.current.account_id}:root"]
    }
  }
  statement {
    sid       = "CloudWatchLogs"
    actions   = ["kms:Encrypt*", "kms:Decrypt*", "kms:ReEncrypt*", "kms:GenerateDataKey*", "kms:Describe*"]
    resources = ["*"]
    principals {
      type        = "Service"
      identifiers = ["logs.${var.region}.amazonaws.com"]
    }
  }
}

module "network" {
  source             = "./modules/network"
  name               = local.prefix
  cidr               = var.vpc_cidr
  availability_zones = slice(data.aws_availability_zones.available.names, 0, var.availability_zones)
  cluster_name       = local.prefix
  kms_key_arn        = aws_kms_key.main.arn
}

module "cluster" {
  source             = "./modules/cluster"
  name               = local.prefix
  kubernetes_version = var.kubernetes_version
  vpc_id             = module.network.vpc_id
  subnet_ids         = module.network.private_subnet_ids
  api_allowed_cidrs  = var.api_allowed_cidrs
  kms_key_arn        = aws_kms_key.main.arn
  system_node_group  = var.system_node_group
  gpu_node_group     = var.gpu_node_group
}

module "storage" {
  source      = "./modules/storage"
  prefix      = local.prefix
  kms_key_arn = aws_kms_key.main.arn
}

module "iam" {
  source            = "./modules/iam"
  name              = local.prefix
  oidc_provider_arn = module.cluster.oidc_provider_arn
  oidc_issuer       = module.cluster.oidc_issuer
  namespace         = var.namespace
  service_account   = var.service_account
  bucket_arns       = module.storage.bucket_arns
  kms_key_arn       = aws_kms_key.main.arn
}

module "database" {
  source                    = "./modules/database"
  name                      = local.prefix
  vpc_id                    = module.network.vpc_id
  subnet_ids                = module.network.private_subnet_ids
  allowed_security_group_id = module.cluster.node_security_group_id
  kms_key_arn               = aws_kms_key.main.arn
  settings                  = var.database
}
