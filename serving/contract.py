"""The serving contract: what a model must accept and return for the platform to serve it.

Every task model takes the preprocessed 2 mm model-grid tensor (segmentation, a patch network, takes
windows of it); the gateway preprocesses once for all.
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


# A segmentation version may be a patch network (run as a sliding window over the grid): its image input
# is (4, px, py, pz) with each p at most the grid's and a multiple of the U-Net's stride, and its output is
# class (4) or region (3) probabilities over the same patch.
PATCH_TASKS = {"segmentation": {"input": "image", "output": "probabilities", "channels": (4, 3), "stride": 8}}

# Outputs a version may have (checked when present): the classifier's OOD score came with training.ood.
OPTIONAL_OUTPUTS: dict[str, dict[str, list[int]]] = {"classification": {"ood_score": [1]}}


def signature_problems(task: str, signature: dict) -> list[str]:
    """Differences between a version's ONNX signature and the serving contract (empty when compatible).

    Concrete sizes must match; a symbolic size (a string) is accepted where the contract fixes one only on
    the batch axis, which must be dynamic so the server can batch.
    """
    if task not in CONTRACT:
        return [f"no serving contract for task {task!r}"]
    if task in PATCH_TASKS:
        return _patch_problems(task, signature)
    return _fixed_problems(task, signature)


def _tensor_problems(name: str, tensor: dict) -> tuple[list[str], list]:
    shape = tensor.get("shape", [])
    problems = []
    if tensor.get("datatype") != "FLOAT":
        problems.append(f"{name}: datatype {tensor.get('datatype')} (expected FLOAT)")
    if not shape or isinstance(shape[0], int):
        problems.append(f"{name}: batch axis is not dynamic")
    return problems, list(shape[1:])


def _patch_problems(task: str, signature: dict) -> list[str]:
    rule = PATCH_TASKS[task]
    inputs = {t["name"]: t for t in signature.get("inputs", [])}
    outputs = {t["name"]: t for t in signature.get("outputs", [])}
    if set(inputs) != {rule["input"]}:
        return [f"inputs {sorted(inputs)} (expected [{rule['input']!r}])"]
    if rule["output"] not in outputs:
        return [f"output {rule['output']!r} missing"]
    problems, dims = _tensor_problems(rule["input"], inputs[rule["input"]])
    out_problems, out_dims = _tensor_problems(rule["output"], outputs[rule["output"]])
    problems += out_problems
    grid = GRID[1:]
    if len(dims) != 4 or dims[0] != GRID[0] or not all(isinstance(d, int) for d in dims[1:]):
        return problems + [f"{rule['input']}: shape {dims} (expected [{GRID[0]}, px, py, pz])"]
    patch = dims[1:]
    if any(p > g for p, g in zip(patch, grid)):
        problems.append(f"{rule['input']}: patch {patch} larger than the model grid {grid}")
    if any(p % rule["stride"] for p in patch) and patch != grid:
        problems.append(f"{rule['input']}: patch {patch} is not a multiple of {rule['stride']}")
    if len(out_dims) != 4 or out_dims[0] not in rule["channels"] or out_dims[1:] != patch:
        problems.append(f"{rule['output']}: shape {out_dims} (expected [4 classes or 3 regions, *{patch}])")
    return problems


def _fixed_problems(task: str, signature: dict) -> list[str]:
    problems = []
    for kind in ("inputs", "outputs"):
        have = {t["name"]: t for t in signature.get(kind, [])}
        optional = OPTIONAL_OUTPUTS.get(task, {}) if kind == "outputs" else {}
        for name, dims in {**CONTRACT[task][kind], **{k: v for k, v in optional.items() if k in have}}.items():
            tensor = have.get(name)
            if tensor is None:
                problems.append(f"{kind[:-1]} {name!r} missing")
                continue
            found, shape = _tensor_problems(name, tensor)
            problems += found
            if shape != dims:
                problems.append(f"{name}: shape {shape} (expected {dims})")
    return problems
