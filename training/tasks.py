"""What differs between the four trainable tasks: batches, loss, the exported graph, and post-fit steps.

The training loop (training/loop.py), export (training/export.py) and evaluation (training/evaluate.py)
are shared; each task only says what is its own here.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch import nn

from training import losses
from training.augment import modality_dropout, tumour_crop
from training.data import CLS_TASKS, CaseArrays
from training.networks import N_MODALITIES
from training.ood import statistics as ood_statistics

MC_SAMPLES = 16
MC_SEED = 20240617  # the MC-dropout masks of every exported classifier (deterministic uncertainty)


def _stack(items: list[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack(items)).float()


def _rank_batches(ids: list[str], batch: int, world: int, rank: int, rng: np.random.Generator) -> list[list[str]]:
    """This worker's batches; every worker gets the same number of steps (DDP all-reduces each step)."""
    order = list(ids)
    rng.shuffle(order)
    per_rank = max(1, int(np.ceil(len(order) / world)))
    mine = (order * world)[rank * per_rank : (rank + 1) * per_rank]  # wrap around when ids < world
    return [mine[i : i + batch] for i in range(0, len(mine), batch)]


class TaskDef:
    name = ""
    batch_size = 4
    lr = 1e-3
    default_epochs = 20
    patience = 10  # epochs without a better validation metric before training stops
    input_names = ["image", "presence"]
    output_names: list[str] = []

    def usable(self, case: CaseArrays) -> bool:
        return True

    def batches(self, cases: dict[str, CaseArrays], ids: list[str], rng, world=1, rank=0, train=True) -> Iterator[dict]:
        ids = [i for i in ids if self.usable(cases[i])]
        for group in _rank_batches(ids, self.batch_size, world, rank, rng) if train else [
            ids[i : i + self.batch_size] for i in range(0, len(ids), self.batch_size)
        ]:
            yield self.make_batch([cases[i] for i in group], rng, train)

    def make_batch(self, cases: list[CaseArrays], rng, train: bool) -> dict:
        images, presences = [], []
        for c in cases:
            image, presence = (modality_dropout(c.image, c.presence, rng) if train else (c.image, c.presence))
            images.append(image)
            presences.append(presence)
        return {"image": _stack(images), "presence": _stack(presences)}

    def loss(self, model: nn.Module, batch: dict) -> torch.Tensor:
        raise NotImplementedError

    def val_metric(self, model: nn.Module, batch: dict) -> float:
        """The validation figure that chooses the kept epoch (lower is better): the loss by default."""
        return float(self.loss(model, batch))

    def export_module(self, model: nn.Module, extras: dict) -> nn.Module:
        raise NotImplementedError

    def export_inputs(self, case: CaseArrays) -> tuple[torch.Tensor, ...]:
        return (torch.from_numpy(case.image[None]).float(), torch.from_numpy(case.presence[None]).float())

    def finalize(self, model: nn.Module, cases: dict[str, CaseArrays], split: dict) -> dict:
        """Post-fit steps on the trained model (calibration, baselines); returns serving extras."""
        return {}

    def network(self) -> nn.Module:
        from training.networks import build

        return build(self.name)

    def options(self) -> dict:
        """The task's training options (recorded with the run; the Ray workers rebuild the task from them)."""
        return {}


# -- segmentation ------------------------------------------------------------------------------------
class Segmentation(TaskDef):
    """A patch network (nnU-Net style): trained on `crop`^3 tumour-centred patches with spatial and
    intensity augmentation, exported at that patch size, and run as a sliding window over the whole
    model grid by serving and evaluation alike (imaging.sliding_window). `regions=True` trains sigmoid
    outputs for the nested regions WT, TC, ET instead of softmax classes (BraTS' own evaluation units)."""

    name = "segmentation"
    batch_size = 2
    default_epochs = 25
    crop = 64
    crops_per_case = 2
    input_names = ["image"]
    output_names = ["probabilities"]

    def __init__(self, regions: bool = False, augment: str = "standard", overlap: float = 0.25) -> None:
        from training.augment import AUGMENTATIONS, PatchAugmentation

        if augment not in AUGMENTATIONS:
            raise ValueError(f"augmentation must be one of {', '.join(AUGMENTATIONS)}, not {augment!r}")
        self.regions, self.augment, self.overlap = regions, augment, overlap
        self.criterion = losses.RegionLoss() if regions else losses.segmentation_loss()
        self._augmentation = PatchAugmentation() if augment == "standard" else None

    def network(self) -> nn.Module:
        from training.networks import segmentation_net

        return segmentation_net(out_channels=3 if self.regions else 4)

    def options(self) -> dict:
        return {"regions": self.regions, "augment": self.augment, "overlap": self.overlap}

    def usable(self, case):
        return case.seg_classes is not None

    def make_batch(self, cases, rng, train):
        images, segs = [], []
        for c in cases * (self.crops_per_case if train else 1):
            image = modality_dropout(c.image, c.presence, rng, p=0.2)[0] if train else c.image
            img, seg = tumour_crop(image, c.seg_classes, self.crop, rng if train else np.random.default_rng(0))
            if train and self._augmentation is not None:
                img, seg = self._augmentation(img, seg, rng)
            images.append(img)
            segs.append(seg[None])
        return {"image": _stack(images), "seg": torch.from_numpy(np.stack(segs)).long()}

    def loss(self, model, batch):
        target = losses.classes_to_regions(batch["seg"]) if self.regions else batch["seg"]
        return self.criterion(model(batch["image"]), target)

    def finalize(self, model, cases, split):
        """How the version is run (its window) and the region volumes (mL) it trained on: serving flags a
        study far outside them."""
        from imaging.labels import CLASS_TO_LABEL
        from imaging.postprocess import volumes_ml

        spacing = next(iter(cases.values())).spacing_mm
        extras = {"inference": {"roi": [self.crop] * 3, "overlap": self.overlap, "blend": "gaussian",
                                "output": "regions" if self.regions else "classes", "spacing_mm": spacing,
                                "augmentation": self.augment}}  # fmt: skip
        rows = [volumes_ml(CLASS_TO_LABEL[c.seg_classes], c.spacing_mm**3 / 1000.0)
                for i in split["train"] if self.usable(c := cases[i])]  # fmt: skip
        if rows:
            extras["training_volumes_ml"] = {r: [min(x[r] for x in rows), max(x[r] for x in rows)] for r in ("WT", "TC", "ET")}
        return extras

    def export_module(self, model, extras):
        return _ActivatedGraph(model, "sigmoid" if self.regions else "softmax")

    def export_inputs(self, case):
        """The patch the network runs on (the sliding window's), around the case's tumour."""
        seg = case.seg_classes if case.seg_classes is not None else np.zeros(case.image.shape[1:], np.int64)
        patch, _ = tumour_crop(case.image, seg, self.crop, np.random.default_rng(0))
        return (torch.from_numpy(np.ascontiguousarray(patch[None])).float(),)


class _ActivatedGraph(nn.Module):
    """The served graph of a dense task: the network followed by its output activation."""

    def __init__(self, net, activation: str):
        super().__init__()
        self.net, self.activation = net, activation

    def forward(self, image):
        logits = self.net(image)
        return torch.softmax(logits, dim=1) if self.activation == "softmax" else torch.sigmoid(logits)


# -- localization ------------------------------------------------------------------------------------
class Localization(TaskDef):
    name = "localization"
    default_epochs = 25
    input_names = ["image"]
    output_names = ["heatmap"]

    def __init__(self) -> None:
        self.criterion = losses.localization_loss()

    def usable(self, case):
        return case.seg_classes is not None

    def make_batch(self, cases, rng, train):
        batch = super().make_batch(cases, rng, train)
        # The target is the whole tumour on the 4 mm grid (a voxel is tumour if any of its 8 children is).
        wt = _stack([(c.seg_classes > 0).astype(np.float32)[None] for c in cases])
        batch["target"] = nn.functional.max_pool3d(wt, 2)
        return batch

    def loss(self, model, batch):
        return self.criterion(model(batch["image"]), batch["target"])

    def export_module(self, model, extras):
        return _ActivatedGraph(model, "sigmoid")

    def export_inputs(self, case):
        return (torch.from_numpy(case.image[None]).float(),)


# -- classification ----------------------------------------------------------------------------------
class Classification(TaskDef):
    name = "classification"
    default_epochs = 30
    output_names = ["probabilities", "mc_mean", "mc_std", "ood_score"]

    def usable(self, case):
        return bool((case.cls >= 0).any())

    def make_batch(self, cases, rng, train):
        batch = super().make_batch(cases, rng, train)
        batch["cls"] = torch.from_numpy(np.stack([c.cls for c in cases])).long()
        return batch

    def loss(self, model, batch):
        logits = model(batch["image"], batch["presence"])
        per_task, present = losses.masked_task_losses(logits, batch["cls"])
        net = model.module if hasattr(model, "module") else model
        return losses.uncertainty_weighted(per_task, present.float(), net.log_sigma)

    def val_metric(self, model, batch):
        """Mean BCE over the markers labelled in the batch, unweighted: the learned task weights make
        the training loss move for reasons that are not accuracy."""
        per_task, present = losses.masked_task_losses(model(batch["image"], batch["presence"]), batch["cls"])
        return float(per_task[present].mean()) if present.any() else float("nan")

    def finalize(self, model, cases, split):
        """Temperature scaling per task on the validation split (never on test), where it has enough cases."""
        from training.calibration import fit_temperatures

        model.eval()
        logits, targets = [], []
        with torch.no_grad():
            for batch in self.batches(cases, split["val"], np.random.default_rng(0), train=False):
                logits.append(model(batch["image"], batch["presence"]))
                targets.append(batch["cls"])
        ood = self._fit_ood(cases, split)
        if not logits:
            return {"temperature": [1.0] * 4, "calibration": "no validation case: left uncalibrated", "ood": ood}
        fits = fit_temperatures(torch.cat(logits), torch.cat(targets))
        temps = [f.temperature for f in fits]
        model.temperature.copy_(torch.tensor(temps))
        return {"temperature": temps, "calibration": {marker: f.record() for marker, f in zip(CLS_TASKS, fits)}, "ood": ood}

    def _fit_ood(self, cases, split) -> dict | None:
        """The OOD score's Gaussian on the training split's input statistics, its threshold on validation."""
        from training import ood

        def stats(ids):
            usable = [cases[i] for i in ids if self.usable(cases[i])]
            return ood.case_statistics([c.image for c in usable], [c.presence for c in usable])

        return ood.fit(stats(split["train"]), stats(split["val"]))

    def export_module(self, model, extras):
        return _ClassificationGraph(model, MC_SAMPLES, ood=extras.get("ood"))


class _ClassificationGraph(nn.Module):
    """Calibrated probabilities, plus MC-dropout mean and std, in one ONNX call.

    The MC samples drop units of the encoder's features and of the hidden layer with masks drawn once,
    from a fixed seed, when the graph is built: the same study always gets the same uncertainty (masks
    drawn inside the graph, RandomUniformLike, were unseeded and changed it on every call), and every
    sample is a fixed thinned sub-network, as MC-dropout's ensemble reading has it.
    """

    def __init__(self, net, samples, seed: int = MC_SEED, ood: dict | None = None):
        super().__init__()
        self.net, self.samples = net, samples
        width = ood_statistics(torch.zeros(1, N_MODALITIES, 2, 2, 2), torch.ones(1, N_MODALITIES))[0].shape[1]
        # Without a fitted OOD Gaussian the score is the plain norm of the statistics (mean 0, identity);
        # serving then has no threshold for it and reports the MC-dropout score instead.
        mean = torch.tensor(ood["mean"], dtype=torch.float32) if ood else torch.zeros(width)
        whiten = torch.tensor(ood["whiten"], dtype=torch.float32) if ood else torch.eye(width)
        self.register_buffer("ood_mean", mean)
        self.register_buffer("ood_whiten", whiten)
        generator = torch.Generator().manual_seed(seed)

        def masks(width: int, p: float) -> torch.Tensor:
            return (torch.rand(samples, 1, width, generator=generator) >= p).float() / (1 - p)

        self.register_buffer("feature_keep", masks(net.encoder.out_features, net.feature_dropout_p))
        self.register_buffer("hidden_keep", masks(net.heads.in_features, net.dropout_p))

    def forward(self, image, presence):
        encoded = self.net.encoder(image, presence)  # (B, F)
        temperature = self.net.temperature
        deterministic = torch.sigmoid(self.net.heads(self.net.hidden(encoded)) / temperature)
        hidden = self.net.hidden(encoded.unsqueeze(0) * self.feature_keep)  # (S, B, H)
        mc = torch.sigmoid(self.net.heads(hidden * self.hidden_keep) / temperature)
        values, defined = ood_statistics(image, presence)
        values = defined * values + (1 - defined) * self.ood_mean  # a missing sequence is not foreign
        whitened = (values - self.ood_mean) @ self.ood_whiten
        ood_score = torch.sqrt((whitened * whitened).sum(dim=1, keepdim=True))  # Mahalanobis (training.ood)
        return deterministic, mc.mean(0), mc.std(0), ood_score


# -- survival ----------------------------------------------------------------------------------------
class Survival(TaskDef):
    name = "survival"
    batch_size = 8
    default_epochs = 30
    lr = 5e-4
    input_names = ["image", "presence", "age"]
    output_names = ["risk"]
    findings_weight = 1.0  # the findings' supervision beside the Cox loss (networks.SURVIVAL_FINDINGS)

    def usable(self, case):
        return case.os_event >= 0 and np.isfinite(case.os_days) and np.isfinite(case.age)

    def make_batch(self, cases, rng, train):
        batch = super().make_batch(cases, rng, train)
        batch["age"] = torch.tensor([[c.age] for c in cases]).float()
        batch["days"] = torch.tensor([c.os_days for c in cases]).float()
        batch["event"] = torch.tensor([c.os_event for c in cases]).float()
        batch["cls"] = torch.from_numpy(np.stack([c.cls for c in cases])).long()
        batch["burden"] = torch.tensor([tumour_burden(c) for c in cases]).float()
        return batch

    def loss(self, model, batch):
        """Cox partial likelihood (Efron ties) plus the image findings' own losses: BCE on the markers a
        case is labelled with, squared error on the tumour's log volume and BCE on multifocality where
        the case has a segmentation; an unknown label adds nothing."""
        net = model.module if hasattr(model, "module") else model
        risk, findings, _ = net.parts(batch["image"], batch["presence"], batch["age"])
        cox = losses.cox_partial_likelihood(risk, batch["days"], batch["event"])
        per_task, present = losses.masked_task_losses(findings[:, :4], batch["cls"])
        supervised = [per_task[present].mean()] if present.any() else []
        volume, multifocal = batch["burden"][:, 0], batch["burden"][:, 1]
        segmented = torch.isfinite(volume)
        if segmented.any():
            supervised += [nn.functional.mse_loss(findings[segmented, 4], volume[segmented]),
                           nn.functional.binary_cross_entropy_with_logits(findings[segmented, 5], multifocal[segmented])]  # fmt: skip
        return cox + self.findings_weight * sum(supervised, risk.sum() * 0.0)

    def export_module(self, model, extras):
        return model

    def export_inputs(self, case):
        return (*super().export_inputs(case), torch.tensor([[case.age]]).float())

    def finalize(self, model, cases, split):
        """The hazard refitted on the training split (below), then the Breslow baseline hazard and the
        risk-group threshold from the same cases."""
        from imaging.postprocess import breslow_baseline

        model.eval()
        covariates, days, events = [], [], []
        with torch.no_grad():
            for batch in self.batches(cases, split["train"], np.random.default_rng(0), train=False):
                covariates.append(model.parts(batch["image"], batch["presence"], batch["age"])[2])
                days.append(batch["days"])
                events.append(batch["event"])
        x, day, event = (torch.cat(v).numpy() for v in (covariates, days, events))
        hazard_fit = refit_hazard(model, x, day, event)
        with torch.no_grad():
            risk = model.head(torch.from_numpy(x)).flatten().numpy()
        times, hazard = breslow_baseline(day, event, risk)
        train = [cases[i] for i in split["train"] if self.usable(cases[i])]
        return {"baseline_days": times.tolist(), "baseline_hazard": hazard.tolist(), "hazard_fit": hazard_fit,
                "risk_threshold": float(np.median(risk)), "clinical_baseline": fit_clinical_baseline(train)}  # fmt: skip


MIN_REFIT_EVENTS = 10


def refit_hazard(model, covariates: np.ndarray, days: np.ndarray, events: np.ndarray) -> dict:
    """The hazard head as the Cox model of its covariates that fits the training split best (lifelines,
    Efron ties, ridge 0.1), written into the network, so the exported graph computes it.

    Gradient steps leave a 7-weight linear head short of its optimum on a small cohort (lr 5e-4, a few
    hundred steps); the encoder's findings are what training is for. A covariate that does not vary gets 0.
    With fewer than MIN_REFIT_EVENTS events, or if the fit fails, the head stays as trained; the record says which."""
    import pandas as pd
    from lifelines import CoxPHFitter

    names = list(model.COVARIATES)
    n_events = int(events.sum())
    if n_events < MIN_REFIT_EVENTS:
        return {"refitted": False, "why": f"{n_events} events in the training split (< {MIN_REFIT_EVENTS}): as trained"}
    keep = [i for i in range(len(names)) if covariates[:, i].std() > 1e-6]
    frame = pd.DataFrame(covariates[:, keep], columns=[names[i] for i in keep]).assign(T=days, E=events)
    try:
        fitted = CoxPHFitter(penalizer=0.1).fit(frame, "T", "E")
    except Exception as exc:  # lifelines' ConvergenceError and numerical failures: keep the trained head
        return {"refitted": False, "why": f"Cox fit failed ({type(exc).__name__}): as trained"}
    coef = np.zeros(len(names))
    coef[keep] = [fitted.params_[names[i]] for i in keep]
    with torch.no_grad():
        model.head.weight.copy_(torch.tensor(coef, dtype=torch.float32)[None])
        model.head.bias.fill_(float(-(covariates.mean(axis=0) @ coef)))  # risks centred on the training cases
    return {"refitted": True, "why": f"lifelines Cox (ridge 0.1) on {len(days)} training cases, {n_events} events",
            "coefficients": dict(zip(names, coef.round(4).tolist()))}  # fmt: skip


# A lesion counts towards multifocality from this size (the generator's satellites are >= 0.9 mL).
MIN_FOCUS_ML = 0.1


def tumour_burden(case: CaseArrays) -> tuple[float, float]:
    """(log of the whole tumour's volume in mL / 30, 1.0 if it has two or more separate foci) from the
    case's segmentation on the model grid; (nan, nan) without one."""
    from scipy import ndimage

    if case.seg_classes is None:
        return float("nan"), float("nan")
    tumour = case.seg_classes > 0
    voxel_ml = case.spacing_mm**3 / 1000.0
    components, _ = ndimage.label(tumour)
    sizes = np.bincount(components.ravel())[1:] * voxel_ml
    return float(np.log(max(tumour.sum() * voxel_ml, 1.0) / 30.0)), float((sizes >= MIN_FOCUS_ML).sum() >= 2)


CLINICAL_COLUMNS = ("age", "grade", "idh")


def _clinical_rows(cases: list[CaseArrays]) -> np.ndarray:
    """(age, HGG, IDH-mutant) per case; an unknown label is nan."""
    return np.array([[c.age, c.cls[0] if c.cls[0] >= 0 else np.nan, c.cls[1] if c.cls[1] >= 0 else np.nan]
                     for c in cases], dtype=float).reshape(-1, len(CLINICAL_COLUMNS))  # fmt: skip


def fit_clinical_baseline(train: list[CaseArrays]) -> dict | None:
    """A Cox model on clinical data alone (age, grade, IDH; lifelines, ridge 0.1), fitted on the training
    split: the baseline the image model has to beat. An unknown grade/IDH takes the training mean."""
    import pandas as pd
    from lifelines import CoxPHFitter

    rows = _clinical_rows(train)
    if len(train) < 5 or sum(c.os_event for c in train) < 2:
        return None
    means = np.nanmean(rows, axis=0)
    means = np.where(np.isfinite(means), means, 0.0)
    filled = np.where(np.isnan(rows), means, rows)
    frame = pd.DataFrame(filled, columns=CLINICAL_COLUMNS)
    keep = [c for c in CLINICAL_COLUMNS if frame[c].std() > 0]  # a constant column has no coefficient
    frame = frame[keep].assign(T=[c.os_days for c in train], E=[c.os_event for c in train])
    fitted = CoxPHFitter(penalizer=0.1).fit(frame, "T", "E")
    return {"columns": keep, "coef": [float(fitted.params_[c]) for c in keep],
            "fill": {c: float(m) for c, m in zip(CLINICAL_COLUMNS, means)}}  # fmt: skip


def clinical_risk(baseline: dict, cases: list[CaseArrays]) -> np.ndarray:
    """The clinical baseline's log-hazard (up to a constant) for each case."""
    rows = _clinical_rows(cases)
    fill = np.array([baseline["fill"][c] for c in CLINICAL_COLUMNS])
    filled = np.where(np.isnan(rows), fill, rows)
    index = [CLINICAL_COLUMNS.index(c) for c in baseline["columns"]]
    return filled[:, index] @ np.array(baseline["coef"]) if index else np.zeros(len(cases))


TASKS: dict[str, type[TaskDef]] = {
    "localization": Localization,
    "segmentation": Segmentation,
    "classification": Classification,
    "survival": Survival,
}


def get(task: str, options: dict | None = None) -> TaskDef:
    """The task, with its training options (only segmentation has any: regions, augment, overlap)."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; trainable tasks: {', '.join(TASKS)}")
    options = {k: v for k, v in (options or {}).items() if v is not None}
    if options and task != "segmentation":
        raise ValueError(f"{task} takes no training options ({', '.join(sorted(options))} apply to segmentation)")
    return TASKS[task](**options)
