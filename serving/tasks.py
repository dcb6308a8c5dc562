"""The platform's tasks, named once: every model task the registry, serving and pipelines know."""

from __future__ import annotations

# One served model each; the study gateway fans a study out to all four.
MODEL_TASKS = ("localization", "segmentation", "classification", "survival")
# Registered models: the model tasks and the report generator.
REGISTERED = (*MODEL_TASKS, "reporting")
