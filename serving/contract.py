"""The serving contract: what a model must accept and return for the platform to serve it.

Every task model takes the preprocessed 2 mm model-grid tensor; the gateway preprocesses once for all.
Promotion refuses a version whose ONNX signature or preprocessing version breaks this contract.
"""

from __future__ import annotations

GRID = [4, 96, 112, 96]  # channels x model grid, without the batch axis
# v2's fast path is v1's steps on BraTS-style (skull-stripped, zero-background) studies: v1 models stay servable.
SUPPORTED_PREPROCESSING = {"1.0/2mm/96x112x96", "2.0/2mm/96x112x96"}

CONTRACT: dict[str, dict[str, dict[str, list[int]]]] = {
    "segmentation": {"inputs": {"image": GRID}, "outputs": {"probabilities": [4, 96, 112, 96]}},
    "localization": {"inputs": {"image": GRID}, "outputs": {"heatmap": [1, 48, 56, 48]}},
    "classification": {
        "inputs": {"image": GRID, "presence": [4]},
        "outputs": {"probabilities": [4], "mc_mean": [4], "mc_std": [4]},
    },
    "survival": {"inputs": {"image": GRID, "presence": [4], "age": [1]}, "outputs": {"risk": [1]}},
}


# Outputs a version may have (checked when present): the classifier's OOD score came with training.ood.
OPTIONAL_OUTPUTS: dict[str, dict[str, list[int]]] = {"classification": {"ood_score": [1]}}


def signature_problems(task: str, signature: dict) -> list[str]:
    """Differences between a version's ONNX signature and the serving contract (empty when compatible).

    Concrete sizes must match; a symbolic size (a string) is accepted where the contract fixes one only on
    the batch axis, which must be dynamic so the server can batch.
    """
    if task not in CONTRACT:
        return [f"no serving contract for task {task!r}"]
    problems = []
    for kind in ("inputs", "outputs"):
        have = {t["name"]: t for t in signature.get(kind, [])}
        optional = OPTIONAL_OUTPUTS.get(task, {}) if kind == "outputs" else {}
        for name, dims in {**CONTRACT[task][kind], **{k: v for k, v in optional.items() if k in have}}.items():
            tensor = have.get(name)
            if tensor is None:
                problems.append(f"{kind[:-1]} {name!r} missing")
                continue
            shape = tensor.get("shape", [])
            if tensor.get("datatype") != "FLOAT":
                problems.append(f"{name}: datatype {tensor.get('datatype')} (expected FLOAT)")
            if not shape or isinstance(shape[0], int):
                problems.append(f"{name}: batch axis is not dynamic")
            if [d for d in shape[1:]] != dims:
                problems.append(f"{name}: shape {shape[1:]} (expected {dims})")
    return problems
