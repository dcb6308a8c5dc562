"""Domain errors of the training layer."""


class TrainingError(RuntimeError):
    """A training or evaluation job could not run or finish (bad arguments, no usable cases, a failed fit)."""
