# Buckets: artifacts (MLflow), models (the Triton model repository), data (studies and datasets), and
# the access-log bucket they log to. Each one is a `bucket` module with the same safe settings.

locals {
  buckets = {
    artifacts = "${var.prefix}-artifacts"
    models    = "${var.prefix}-models"
    data      = "${var.prefix}-data"
  }
}

module "logs" {
  source      = "./bucket"
  name        = "${var.prefix}-access-logs"
  kms_key_arn = var.kms_key_arn
}

module "bucket" {
  source      = "./bucket"
  for_each    = local.buckets
  name        = each.value
  kms_key_arn = var.kms_key_arn
  log_bucket  = module.logs.id
  log_prefix  = "${each.key}/"
}
