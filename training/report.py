"""Run artifacts for people: plots (calibration, Kaplan-Meier by risk group, segmentation overlay) and
the model card."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from imaging.labels import CLASS_TO_LABEL  # noqa: E402
from imaging.postprocess import heatmap_to_box, probabilities_to_labels  # noqa: E402
from training.data import CLS_TASKS, CaseArrays  # noqa: E402

FLAIR = 3


def calibration_plot(per_case: list[dict], out: Path, temperature: list[float] | None = None) -> Path:
    """Reliability diagram per marker on the test cases: after temperature scaling and, given the
    temperatures, before it."""
    from training.calibration import uncalibrated

    fig, axes = plt.subplots(1, len(CLS_TASKS), figsize=(4 * len(CLS_TASKS), 4))
    for i, (ax, task) in enumerate(zip(axes, CLS_TASKS)):
        rows = [r for r in per_case if r[f"label_{task}"] >= 0]
        ax.plot([0, 1], [0, 1], "k--", lw=1)
        if rows:
            p = np.array([r[f"p_{task}"] for r in rows])
            y = np.array([r[f"label_{task}"] for r in rows])
            ax.plot(*_calibration_points(p, y), "o-", label="calibrated")
            if temperature is not None and temperature[i] != 1.0:
                ax.plot(*_calibration_points(uncalibrated(p, temperature[i]), y), "s:", label=f"before (T={temperature[i]:.2f})")
            ax.legend(loc="upper left", fontsize=8)
        ax.set(title=f"{task} (n={len(rows)})", xlabel="predicted probability", ylabel="observed frequency", xlim=(0, 1), ylim=(0, 1))
    fig.tight_layout()
    fig.savefig(out, dpi=80)
    plt.close(fig)
    return out


def km_plot(per_case: list[dict], threshold: float, out: Path) -> Path:
    from lifelines import KaplanMeierFitter

    fig, ax = plt.subplots(figsize=(5, 4))
    for name, sel in (("high risk", lambda r: r["risk"] >= threshold), ("low risk", lambda r: r["risk"] < threshold)):
        rows = [r for r in per_case if sel(r)]
        if rows:
            km = KaplanMeierFitter(label=f"{name} (n={len(rows)})")
            km.fit([r["os_days"] for r in rows], [r["os_event"] for r in rows])
            km.plot_survival_function(ax=ax, ci_show=False)
    ax.set(xlabel="days", ylabel="survival probability", title="Kaplan-Meier by predicted risk group (test)")
    fig.tight_layout()
    fig.savefig(out, dpi=80)
    plt.close(fig)
    return out


def overlay_plot(case: CaseArrays, prediction: np.ndarray, out: Path, heatmap: np.ndarray | None = None) -> Path:
    """FLAIR slice through the tumour with true (left) and predicted (right) labels, or the predicted box."""
    truth = CLASS_TO_LABEL[case.seg_classes] if case.seg_classes is not None else np.zeros(case.image.shape[1:], np.uint8)
    z = int(np.argmax((truth > 0).sum(axis=(0, 1)))) if truth.any() else case.image.shape[3] // 2
    fig, axes = plt.subplots(1, 2, figsize=(8, 4))
    for ax, labels, title in ((axes[0], truth, "reference"), (axes[1], prediction, "model")):
        ax.imshow(case.image[FLAIR, :, :, z].T, cmap="gray", origin="lower")
        masked = np.ma.masked_where(labels[:, :, z] == 0, labels[:, :, z])
        ax.imshow(masked.T, cmap="viridis", alpha=0.5, origin="lower", vmin=0, vmax=4)
        ax.set_title(f"{title} ({case.case_id}, z={z})")
        ax.axis("off")
    if heatmap is not None:
        loc = heatmap_to_box(heatmap)
        x0, y0, _, x1, y1, _ = loc.bbox_vox * 2
        axes[1].add_patch(plt.Rectangle((x0, y0), x1 - x0 + 2, y1 - y0 + 2, fill=False, color="red", lw=2))
    fig.tight_layout()
    fig.savefig(out, dpi=80)
    plt.close(fig)
    return out


def segmentation_prediction(sess, case: CaseArrays, extras: dict) -> np.ndarray:
    from training.evaluate import segment

    return probabilities_to_labels(segment(sess, case.image, extras).probabilities)


def model_card(task: str, version_info: dict, evaluation: dict, data: dict) -> str:
    calibration = version_info.get("calibration")
    if isinstance(calibration, dict):
        calibration = "; ".join(f"{marker} T = {c['temperature']:.3f} ({c['why']})" for marker, c in calibration.items())
    calibration_line = f"- Calibration (temperature scaling on the validation split): {calibration}\n" if calibration else ""
    ood = version_info.get("ood")
    ood_line = (f"- OOD score: Mahalanobis distance of the input's statistics (brain share; per sequence spread, "
                f"skewness, kurtosis; correlations between sequences) from the {ood['n_train']} training cases "
                f"(Ledoit-Wolf covariance; training.ood); flagged above {ood['threshold']:.3f} (the {ood['rule']}). Measured below as "
                f"`ood_auroc*` against out-of-distribution versions of the test cases (not a brain, sequences in the wrong "
                f"channels, corrupted, intensity-shifted).\n") if ood else ""  # fmt: skip
    window = version_info.get("inference")
    window_line = (f"- Inference: a patch network ({'x'.join(map(str, window['roi']))} voxels at {window['spacing_mm']} mm, "
                   f"{window['output']} outputs, augmentation {window['augmentation']}) run as a sliding window over the model "
                   f"grid (overlap {window['overlap']}, {window['blend']} blending; imaging.sliding_window, as serving runs it). "
                   f"`dice_*` / `hd95_*` are on each test case's own grid against its ground truth as stored (probabilities "
                   f"resampled there, then labelled); `model_grid/*` on the 2 mm grid.\n") if window else ""  # fmt: skip
    baseline_line = (f"- Baselines (survival), on the same test cases: c-index {evaluation['c_index']:.3f} against age alone "
                     f"{evaluation['c_index_age_only']:.3f} and a clinical Cox model (age, grade, IDH; fitted on the training "
                     f"split) {evaluation.get('c_index_clinical_only', float('nan')):.3f}; the differences are the images' added "
                     f"value (`c_index_over_*`, with their bootstrap intervals). The hazard is a Cox model of age and image "
                     f"findings (marker probabilities, tumour volume, multifocality) that the network learns from their own "
                     f"labels; hazard weights: {_hazard_fit(version_info.get('hazard_fit'))}.\n"
                     ) if task == "survival" and "c_index_age_only" in evaluation else ""  # fmt: skip
    metric_lines = "\n".join(
        f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in sorted(evaluation.items())
    )
    return f"""# Model card: oncoserve `{task}`

## Model
- Task: {task}; network and training settings: {version_info.get('params')}
- ONNX opset {version_info.get('opset')}, dynamic batch axis; parity with torch: max abs diff
  {version_info.get('parity_max_abs_diff'):.2e}
- Preprocessing: {data['preprocessing']} (the same `imaging.preprocess` code path serving uses)
- Code: git {version_info.get('git_commit')}
- Training: {version_info.get('epochs_run', '?')} epochs ran; kept {version_info.get('kept_because', 'the last epoch')}
{calibration_line}{ood_line}{window_line}{baseline_line}
## Data
- Dataset hash {data['dataset_hash']} ({data['n_cases']} cases); split by case, stratified by grade x IDH,
  seed {data['seed']}: train {data['n_train']}, validation {data['n_val']}, test {data['n_test']}.
- Validation cases choose the kept epoch (early stopping) and fit calibration; the metrics below are on the **test** cases,
  which the model never saw in training or calibration.

## Metrics (held-out test split, onnxruntime on the exported model)
| metric | value |
|---|---|
{metric_lines}

## Intended use
Research and platform development on neuro-oncology MRI. Not a medical device; outputs are decision
support for trained readers, never a diagnosis, and treatment plans are for the treating team.

## Limitations
- Trained on the data above only; when that data is synthetic (oncoserve phantoms), the figures say how
  well the model learns the phantom generator, not how it performs on patients.
- Small CPU networks at 2-4 mm resolution; thin structures and small enhancing foci are under-resolved.
- Molecular markers (IDH, 1p/19q, MGMT) are predicted from imaging alone; MGMT carries little imaging
  signal and its figures are expected to be near chance.
- Figures on few test cases have wide confidence intervals.
"""


def _hazard_fit(fit: dict | None) -> str:
    if not fit:
        return "as trained"
    weights = ", ".join(f"{name} {value:+.3f}" for name, value in (fit.get("coefficients") or {}).items())
    return f"{fit['why']}" + (f" ({weights})" if weights else "")


def _calibration_points(p: np.ndarray, y: np.ndarray, bins: int = 5) -> tuple[list[float], list[float]]:
    edges = np.linspace(0, 1, bins + 1)
    centres, rates = [], []
    for lo, hi in zip(edges[:-1], edges[1:]):
        sel = (p >= lo) & (p < hi if hi < 1 else p <= hi)
        if sel.any():
            centres.append(float(p[sel].mean()))
            rates.append(float(y[sel].mean()))
    return centres, rates


def comparison_plots(task: str, rows_a: list[dict] | None, rows_b: list[dict], labels: tuple[str | None, str], out_dir: Path) -> list[Path]:
    """Plots for a two-version comparison on paired cases: calibration curves of both (classification)
    and the per-case figure of one version against the other (the diagonal = no change). Without A
    (a first version): its calibration curves and the distribution of its per-case figure."""
    out_dir.mkdir(parents=True, exist_ok=True)
    plots = []
    if task == "classification":
        fig, axes = plt.subplots(1, len(CLS_TASKS), figsize=(4 * len(CLS_TASKS), 4))
        for ax, marker in zip(axes, CLS_TASKS):
            ax.plot([0, 1], [0, 1], "k--", lw=1)
            for rows, label in ((rows_a, labels[0]), (rows_b, labels[1])):
                if rows is None:
                    continue
                known = [r for r in rows if r[f"label_{marker}"] >= 0]
                if known:
                    xs, ys = _calibration_points(np.array([r[f"p_{marker}"] for r in known]), np.array([r[f"label_{marker}"] for r in known]))
                    ax.plot(xs, ys, "o-", label=label)
            ax.set(title=f"{marker} calibration", xlabel="predicted probability", ylabel="observed frequency", xlim=(0, 1), ylim=(0, 1))
            ax.legend(loc="upper left", fontsize=8)
        fig.tight_layout()
        fig.savefig(out_dir / "calibration.png", dpi=80)
        plt.close(fig)
        plots.append(out_dir / "calibration.png")
    column = {"segmentation": "dice_WT", "localization": "box_iou", "classification": "p_grade", "survival": "risk"}[task]
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    if rows_a is None:
        ax.hist([r[column] for r in rows_b if np.isfinite(r[column])], bins=10)
        ax.set(xlabel=column, ylabel="cases", title=f"{task} {labels[1]}: per-case {column}")
        fig.tight_layout()
        fig.savefig(out_dir / f"per_case_{column}.png", dpi=80)
        plt.close(fig)
        return plots + [out_dir / f"per_case_{column}.png"]
    xs = [r[column] for r in rows_a]
    ys = [r[column] for r in rows_b]
    ax.scatter(xs, ys, s=18)
    finite = [v for v in xs + ys if np.isfinite(v)] or [0.0, 1.0]
    lo, hi = min(finite), max(finite)
    ax.plot([lo, hi], [lo, hi], "k--", lw=1)
    ax.set(xlabel=f"{column}, {labels[0]}", ylabel=f"{column}, {labels[1]}", title=f"{task}: per-case {column}")
    fig.tight_layout()
    fig.savefig(out_dir / f"per_case_{column}.png", dpi=80)
    plt.close(fig)
    plots.append(out_dir / f"per_case_{column}.png")
    return plots
