# RDS PostgreSQL for MLflow's tracking and registry store: private, encrypted, reachable only from the
# cluster's nodes, master password generated and rotated by RDS in Secrets Manager.

resource "aws_db_subnet_group" "this" {
  name       = "${var.name}-mlflow"
  subnet_ids = var.subnet_ids
}

resource "aws_security_group" "this" {
  name        = "${var.name}-mlflow-db"
  description = "PostgreSQL for MLflow: from the EKS nodes only"
  vpc_id      = var.vpc_id

  ingress {
    description     = "PostgreSQL from the cluster nodes"
    from_port       = 5432
    to_port         = 5432
    protocol        = "tcp"
    security_groups = [var.allowed_security_group_id]
  }
}

resource "aws_db_parameter_group" "this" {
  name   = "${var.name}-mlflow-pg16"
  family = "postgres16"

  parameter {
    name  = "log_min_duration_statement"
    value = "1000"
  }
  parameter {
    name  = "rds.force_ssl"
    value = "1"
  }
  parameter {
    name  = "log_statement"
    value = "ddl"
  }
}

resource "aws_db_instance" "this" {
  #checkov:skip=CKV2_AWS_30:Query logging is set in the parameter group (slow statements and DDL); logging every statement would log registry payloads.
  identifier                          = "${var.name}-mlflow"
  engine                              = "postgres"
  engine_version                      = "16"
  instance_class                      = var.settings.instance_class
  allocated_storage                   = var.settings.allocated_storage_gb
  max_allocated_storage               = var.settings.max_storage_gb
  storage_type                        = "gp3"
  storage_encrypted                   = true
  kms_key_id                          = var.kms_key_arn
  db_name                             = "mlflow"
  username                            = "mlflow"
  manage_master_user_password         = true
  iam_database_authentication_enabled = true
  db_subnet_group_name                = aws_db_subnet_group.this.name
  vpc_security_group_ids              = [aws_security_group.this.id]
  parameter_group_name                = aws_db_parameter_group.this.name
  multi_az                            = var.settings.multi_az
  publicly_accessible                 = false
  backup_retention_period             = var.settings.backup_retention_days
  deletion_protection                 = true
  skip_final_snapshot                 = false
  final_snapshot_identifier           = "${var.name}-mlflow-final"
  copy_tags_to_snapshot               = true
  auto_minor_version_upgrade          = true
  performance_insights_enabled        = true
  performance_insights_kms_key_id     = var.kms_key_arn
  monitoring_interval                 = 60
  monitoring_role_arn                 = aws_iam_role.monitoring.arn
  enabled_cloudwatch_logs_exports     = ["postgresql", "upgrade"]
}

data "aws_iam_policy_document" "monitoring_assume" {
  statement {
    actions = ["sts:AssumeRole"]
    principals {
      type        = "Service"
      identifiers = ["monitoring.rds.amazonaws.com"]
    }
  }
}

resource "aws_iam_role" "monitoring" {
  name               = "${var.name}-rds-monitoring"
  assume_role_policy = data.aws_iam_policy_document.monitoring_assume.json
}

resource "aws_iam_role_policy_attachment" "monitoring" {
  role       = aws_iam_role.monitoring.name
  policy_arn = "arn:aws:iam::aws:policy/service-role/AmazonRDSEnhancedMonitoringRole"
}
